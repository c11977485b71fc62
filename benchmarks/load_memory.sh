#!/usr/bin/env bash
# Peak anonymous resident memory of each rank when 2 CPU processes load a saved Pythia-1.4B-shape model (bf16
# safetensors, random weights) at tp=2 and evaluate it. Target: at most the model's bf16 size + 2 GiB.
#   bash benchmarks/load_memory.sh [WORK_DIR]      (needs ~6 GB of disk, ~12 GB of RAM, a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/autotp-load-memory}
mkdir -p "$work"
if [ ! -f "$work/model/model.safetensors" ]; then
  python - "$work" <<'PY'
import sys, torch, autotp_custom_patterns as S
work = sys.argv[1]
args = S.parse_args(["--model_name", "builtin:pythia-1.4b"])
model = S.AutoModelForCausalLM.from_config(S.load_config(args), dtype=torch.bfloat16)
model.save_pretrained(f"{work}/model")
S.train_bpe_tokenizer(S.load_text(args)["train"], "text", 8192, args.cache_dir).save_pretrained(f"{work}/model")
PY
fi
python -c "print(' '.join(['the quick brown fox jumps over the lazy dog'] * 60))" > "$work/val.txt"
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py --model_name "$work/model" \
  --tp_size 2 --num_steps 0 --seq_length 128 --validation_file "$work/val.txt" --output_dir "$work/out"
python - "$work" <<'PY'
import json, os, sys
work = sys.argv[1]
size = os.path.getsize(f"{work}/model/model.safetensors") / 2 ** 30
peaks = json.load(open(f"{work}/out/results.json"))["host_memory_gib_per_rank"]
print(f"bf16 safetensors {size:.2f} GiB; peak anonymous resident memory per rank {', '.join(f'{p:.2f}' for p in peaks)} GiB; "
      f"target {size + 2:.2f} GiB: {'met' if max(peaks) <= size + 2 else 'NOT met'}")
PY
