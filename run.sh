#!/usr/bin/env bash
# Set up once, then run on whatever this machine has: every GPU, or the CPU (tiny model, embedded text).
#   ./run.sh                     install into .venv and train with the defaults
#   ./run.sh --num_steps 200 ... extra arguments go to autotp_custom_patterns.py (the last one given wins)
#   ./run.sh test [pytest args]  install and run the test suite
# TORCH_PIP_SPEC picks the torch to install when the venv has none (e.g. "torch --index-url <CPU wheel index>").
# Everything else is installed at the exact versions in constraints.txt, the ones the test suite passed with,
# so that a set-up today and one next month give the same numbers (requirements.txt holds the minimums).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q -c constraints.txt ${TORCH_PIP_SPEC:-torch==2.13.0}
python -m pip install -q -r requirements.txt -c constraints.txt

if [ "${1:-}" = test ]; then
  shift
  # DeepSpeed's CPU Adam (the offloaded optimizer's) compiles once, on first use, and is cached: build it here,
  # at set-up, rather than inside the first test that offloads
  python -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('CPUAdamBuilder').load()" \
    > /dev/null
  exec python -m pytest -q "$@"
fi
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 0 ]; then
  exec deepspeed --num_gpus "$gpus" autotp_custom_patterns.py "$@"
fi
# CPU: 4 processes on DeepSpeed's CPU accelerator (gloo), 2-way TP x 2-way DP. The tiny random model
# needs a larger learning rate than the default to show its loss falling within the default 50 steps.
exec torchrun --standalone --nproc_per_node 4 autotp_custom_patterns.py --tp_size 2 --dp_size 2 \
  --learning_rate 2e-3 "$@"
