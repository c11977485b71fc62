#!/usr/bin/env bash
# Start-up of the Pythia-6.9B shape on 2 GPUs: seconds to the first step and peak anonymous host memory per rank,
# each line stamped with the seconds since the launch began. Writes OUT/startup_STAGE.json and OUT/startup_STAGE.log.
#   bash benchmarks/startup.sh OUT random       random weights at tp 2 (batch 8) and tp 1 x dp 2 (batch 4), then
#                                               --shard_on_load at tp 2 (peak GPU memory while loading)
#   bash benchmarks/startup.sh OUT checkpoint [BEFORE.py]
#                                               writes a 6.9B bf16 safetensors checkpoint (random weights), loads it
#                                               at tp 2 and tp 1 x dp 2 with this script and, if given, BEFORE.py
#                                               (the script as it was before 8614cde, loading the whole model on the
#                                               host; its host memory is ru_maxrss), same losses?
#                                               Then evaluation-only loads (no optimizer) staged and --shard_on_load
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1 stage=$2 before=${3:-}
work=${WORK:-/tmp/autotp-startup}
mkdir -p "$out" "$work"
common=(--seq_length 2048 --log_interval 1 --eval_interval 0 --skip_export)
stamp() { python3 -u -c 'import sys, time
t = time.time()
for line in sys.stdin: print(f"{time.time() - t:7.1f} {line}", end="", flush=True)'; }
run() {  # run NAME SCRIPT ARGS...: 2 processes, log stamped, results in $work/NAME
  local name=$1 script=$2; shift 2
  echo "=== $name: $script $*" | tee -a "$out/startup_$stage.log"
  torchrun --standalone --nproc_per_node 2 "$script" "${common[@]}" "$@" --output_dir "$work/$name" 2>&1 | stamp \
    | grep -v "^ *[0-9.]* \[" >> "$out/startup_$stage.log" || true
  grep -h "start-up\|^ *[0-9.]* step\|error" "$out/startup_$stage.log" | tail -4
}
if [ "$stage" = random ]; then
  run tp2 autotp_custom_patterns.py --model_name builtin:pythia-6.9b --tp_size 2 --batch_size 8 --num_steps 5
  run tp1_dp2 autotp_custom_patterns.py --model_name builtin:pythia-6.9b --tp_size 1 --dp_size 2 --batch_size 4 --num_steps 5
  run tp2_shard_on_load autotp_custom_patterns.py --model_name builtin:pythia-6.9b --tp_size 2 --batch_size 8 \
    --num_steps 2 --no-compile --shard_on_load
  runs=(tp2 tp1_dp2 tp2_shard_on_load)
else
  if [ ! -f "$work/model/model.safetensors.index.json" ]; then
    python3 - "$work" <<'PY' 2>&1 | stamp | tee -a "$out/startup_$stage.log"
import sys, time, torch, autotp_custom_patterns as S
work, start = sys.argv[1], time.time()
args = S.parse_args(["--model_name", "builtin:pythia-6.9b"])
with torch.device("cuda"):
    model = S.AutoModelForCausalLM.from_config(S.load_config(args), dtype=torch.bfloat16)
model.save_pretrained(f"{work}/model")
S.train_bpe_tokenizer(S.load_text(args)["train"], "text", 8192, args.cache_dir).save_pretrained(f"{work}/model")
print(f"wrote {work}/model in {time.time() - start:.1f} s")
PY
  fi
  runs=()
  for script in autotp_custom_patterns.py $before; do  # BEFORE.py only when given
    tag=$([ "$script" = "$before" ] && echo before || echo now)
    run ckpt_tp2_$tag "$script" --model_name "$work/model" --tp_size 2 --batch_size 8 --num_steps 3 --no-compile
    run ckpt_tp1_dp2_$tag "$script" --model_name "$work/model" --tp_size 1 --dp_size 2 --batch_size 4 --num_steps 3 \
      --no-compile
    runs+=(ckpt_tp2_$tag ckpt_tp1_dp2_$tag)
  done
  # evaluation only (no optimizer states): the GPU memory peak of loading itself, staged vs --shard_on_load
  run ckpt_eval_staged autotp_custom_patterns.py --model_name "$work/model" --tp_size 2 --batch_size 8 --num_steps 0
  run ckpt_eval_shard_on_load autotp_custom_patterns.py --model_name "$work/model" --tp_size 2 --batch_size 8 \
    --num_steps 0 --shard_on_load
  runs+=(ckpt_eval_staged ckpt_eval_shard_on_load)
fi
python3 - "$work" "$out/startup_$stage.json" "${runs[@]}" <<'PY'
import json, os, sys
work, target, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
summary = {}
for name in runs:
    path = f"{work}/{name}/results.json"
    if not os.path.exists(path):
        summary[name] = None
        continue
    r = json.load(open(path))
    # host_memory_gib_per_rank: the script's peak anonymous resident memory (RssAnon), one value per rank, GiB.
    # BEFORE.py (the script before 8614cde) has no start-up phases and measured ru_maxrss instead, under
    # peak_host_memory_gib_per_rank; that key is read for its runs only, kept apart since the two measure
    # different things (ru_maxrss counts the mapped checkpoint's pages too).
    before = name.endswith("_before")
    summary[name] = {"startup": r.get("startup"), "losses": [x["loss"] for x in r["train"]],
                     "eval": r["eval"][-1]["loss"] if r["eval"] else None,
                     "host_memory_gib_per_rank": None if before else r["host_memory_gib_per_rank"],
                     "ru_maxrss_gib_per_rank": r.get("peak_host_memory_gib_per_rank") if before else None,
                     "throughput": r["throughput"], "batch_size": r["args"]["batch_size"]}
json.dump(summary, open(target, "w"), indent=1)
for name, s in summary.items():
    print(name, s and {k: s[k] for k in ("startup", "losses", "host_memory_gib_per_rank", "ru_maxrss_gib_per_rank")
                       if s[k] is not None})
PY
