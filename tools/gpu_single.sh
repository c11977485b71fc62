#!/usr/bin/env bash
# One-GPU checks behind the README's GPU figures, on a machine with no network: the wheels from
# ../shared/tools/gpu-wheels in .whl (the pinned transformers, tokenizers, datasets and deepspeed); writes logs and
# JSON to $OUT. Each part is one argument, run in the order given:
#   default    the GPU default run: what ./run.sh launches with no arguments (deepspeed --num_gpus 1 ...), timed
#   bench      benchmarks/bench_single_gpu.py, Pythia-1.4B shape, micro-batch 10: the compiled plain loop, the
#              script, and the script with the DeepSpeed settings tried against its optimizer step
#   tp         benchmarks/bench_tp.py on this one GPU (tp=1 only: the smoke run of the TP sweep)
#   bash tools/gpu_single.sh default tp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH || exit 1
export PYTHONUNBUFFERED=1 HF_DATASETS_CACHE=/tmp/hfds TORCH_CUDA_ARCH_LIST=9.0 OUT=${OUT:-/tmp/out}
nvidia-smi -L; python3 -c "import torch,transformers,deepspeed,datasets;print('versions', torch.__version__, transformers.__version__, deepspeed.__version__, datasets.__version__)" 2>&1 | grep versions
t0=$(date +%s)
for part in "$@"; do
  case $part in
  default)
    start=$(date +%s)
    deepspeed --num_gpus 1 autotp_custom_patterns.py --output_dir $OUT/default > $OUT/default.log 2>&1; echo "default rc=$? wall $(( $(date +%s) - start ))s"
    grep -E "^(step|eval|batch|model|device|torch.compile|wrote|error)|Error" $OUT/default.log | cut -c1-200
    cp $OUT/default/results.json $OUT/default_results.json 2>/dev/null ;;
  bench)
    python3 benchmarks/bench_single_gpu.py --shape pythia-1.4b --batch_size 10 --seq_length 2048 --runs plain_compiled,script \
      --variant zero1="--zero_stage 1" --variant autocast="--precision fp32 --deepspeed_config benchmarks/ds_torch_autocast.json" \
      --out $OUT/bench_1.4b_bs10.json 2>&1 | tail -8 ;;
  tp)
    python3 benchmarks/bench_tp.py --shape pythia-410m --global_batch 16 --out $OUT/bench_tp_1gpu.json 2>&1 | tail -4 ;;
  esac
  echo "elapsed $(( $(date +%s) - t0 ))s"
done
