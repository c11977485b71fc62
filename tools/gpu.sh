#!/usr/bin/env bash
# The GPU checks and measurements behind the README's GPU figures, on a lent machine with no network:
#   bash tools/gpu.sh PART...        run from the project root; the parts run in the order given
#
# The machine has python3 with torch and its own transformers, but not deepspeed or datasets: they travel as
# wheels in .whl (git-ignored). Fill it once, here, from the project root, inside the venv (it has torch):
#   . .venv/bin/activate && ../shared/tools/gpu-wheels
#   EXTRA="transformers==5.24.0 tokenizers==0.23.3" ../shared/tools/gpu-wheels   # also transformers and tokenizers
#                                                                 # at the versions of constraints.txt, not the image's
# Then one device call, carrying .whl (kind nvidia-h200 will do for the one-GPU parts):
#   run(kind="nvidia-h200-x2", carry=[".whl"], command="bash tools/gpu.sh check smoke")
# Every output line is stamped with the seconds since the start. Each part writes its logs and JSON under
# $OUT/PART/ (OUT defaults to /tmp/out); the command's output shows each part's summary lines.
#
# Parts (2 GPUs unless marked 1):
#   check          tests/parity_worker.py at tp 2 against the unsharded model (tiny fp32; Pythia-160M shape fp32
#                  and bf16), then the script through the deepspeed launcher on the Pythia-1.4B and 6.9B shapes
#   smoke          the script after a change to how it is built: the 6.9B random tp 2 run of benchmarks/startup.sh
#                  (same flags: its step-1 loss and grad norm must match that earlier log), the default run with
#                  no flags, and bad values (each must end in one "error:" line)
#   accelerations  tests/parity_worker.py at tp 2, Pythia-160M shape in fp32 and bf16, for the defaults,
#                  --no-vocab_parallel, --tp_overlap_comm, --deepcompile and activation checkpointing (the
#                  upstream `shape` spec is run by every launch and must fail); then DeepCompile against the
#                  plain shards on the 1.4B shape in bf16
#   resume         1.4B shape (or $SHAPE, e.g. SHAPE=pythia-410m), bf16: 12 steps at tp 2 x dp 1; resumed from
#                  step 6 at tp 1 x dp 2; resumed from that run's step 9 at tp 2 x dp 1 again; the losses against
#                  the uninterrupted run
#   default        (1) the GPU default run, what ./run.sh launches with no arguments (deepspeed --num_gpus 1), timed
#   bench          (1) benchmarks/bench_single_gpu.py, Pythia-1.4B shape, micro-batch 10: the compiled plain loop,
#                  the script, and the script with the DeepSpeed settings tried against its optimizer step
#   bench_tp       (1) benchmarks/bench_tp.py on one GPU (tp 1 only: the smoke run of the TP sweep)
#   perf           (1) the script against the reference loop (../shared/bench/plain_compiled.py, copied to the
#                  git-ignored .ref/ and carried), Pythia-1.4B shape, seq 2048, micro-batch 10, in one call; then
#                  benchmarks/step_bench.py (each loop's phases, DeepSpeed's settings and ds_fast_step.py), the GPU
#                  default run, and benchmarks/liger_bench.py (Liger's fused linear cross-entropy)
#   fit            (1) peak memory against the estimate: the 1.4B shape at ZeRO-2, ZeRO-3 and ZeRO-2 with the
#                  optimizer offloaded; the 6.9B shape refused without offload, then trained with it (pinned host
#                  memory off: 128 GiB of host memory)
set -o pipefail
cd "$(dirname "$0")/.."
PARTS="check smoke accelerations resume default bench bench_tp perf fit"

stamp() {  # prefix each line with the seconds since this filter started
  python3 -u -c 'import sys, time
t = time.time()
for line in sys.stdin: print(f"{time.time() - t:7.1f} {line}", end="", flush=True)'
}
mark() { echo "--- $*"; }

parity_summary() {  # the JSON files of tests/parity_worker.py, one line per variant and optimizer
  python3 - "$@" <<'PY'
import json, sys
for path in sys.argv[1:]:
    try:
        r = json.load(open(path))
    except OSError as exc:
        print(path.split("/")[-1], "missing:", exc.strerror)
        continue
    print(path.split("/")[-1], "wrong specs: step-0 logits", f"{r['wrong_specs']['step0_logits_max_diff']:.3g}")
    for variant, v in r["variants"].items():
        for opt in ("adamw", "sgd"):
            x = v[opt]
            losses = max(abs(a - b) for a, b in zip(x["losses"], x["reference_losses"]))
            norms = [abs(a - b) / b for a, b in zip(x["grad_norms"], x["reference_grad_norms"]) if a is not None]
            print(f"  {variant or '(defaults)':45s} {opt:5s} logits {x['step0_logits_max_diff']:.2e} losses {losses:.2e} "
                  f"grad norm rel {max(norms) if norms else float('nan'):.2e} replicated identical "
                  f"{x['replicated_identical']} final weights {x['final_weights_max_diff']:.2e}")
PY
}

# ---- the parts -------------------------------------------------------------------------------------------

check() {
  for spec in "tiny fp32 64" "pythia-160m fp32 128" "pythia-160m bf16 128"; do
    set -- $spec
    torchrun --standalone --nproc_per_node 2 tests/parity_worker.py $OUT/parity_$1_$2.json --tp_size 2 \
      --model_name builtin:$1 --precision $2 --seq_length $3 > $OUT/parity_$1_$2.log 2>&1 || tail -20 $OUT/parity_$1_$2.log
    parity_summary $OUT/parity_$1_$2.json; mark "parity $1 $2"
  done
  deepspeed --num_gpus 2 autotp_custom_patterns.py --model_name builtin:pythia-1.4b --tp_size 2 --seq_length 512 \
    --num_steps 20 --output_dir $OUT/ds_1.4b > $OUT/ds_1.4b.log 2>&1; echo rc=$?
  grep -E "^(step|eval|layout|batch|model|device|versions|error)|AutoTP|Error" $OUT/ds_1.4b.log | grep -v "^\[rank1" \
    | cut -c1-220
  mark "deepspeed launcher, 1.4B"
  timeout 300 deepspeed --num_gpus 2 autotp_custom_patterns.py --model_name builtin:pythia-6.9b --tp_size 2 \
    --seq_length 512 --num_steps 20 --log_interval 5 --output_dir $OUT/ds_6.9b > $OUT/ds_6.9b.log 2>&1; echo rc=$?
  grep -E "^(step|eval|layout|batch|model|error)|Error" $OUT/ds_6.9b.log | grep -v "^\[rank1" | cut -c1-220
  mark "deepspeed launcher, 6.9B"
}

smoke() {
  echo "=== 6.9B tp 2 (as benchmarks/startup.sh random)"
  torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py --seq_length 2048 --log_interval 1 --eval_interval 0 \
    --skip_export --model_name builtin:pythia-6.9b --tp_size 2 --batch_size 8 --num_steps 5 --output_dir /tmp/o69 2>&1 \
    | stamp | grep -v "^ *[0-9.]* \[" > $OUT/tp2_6.9b.log; grep "start-up\|step \|error\|AutoTP\|batch:" $OUT/tp2_6.9b.log
  cp /tmp/o69/results.json $OUT/tp2_6.9b.json
  mark "6.9B tp 2"
  echo "=== default run, no flags (2 GPUs)"
  torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py --num_steps 20 --log_interval 5 --output_dir /tmp/od \
    2>&1 | stamp | grep -v "^ *[0-9.]* \[" > $OUT/default.log; grep -v "it/s\|s/it" $OUT/default.log | tail -40
  cp /tmp/od/results.json $OUT/default.json
  mark "default run, 2 GPUs"
  echo "=== bad values"
  for bad in "--batch_size 0" "--deepcompile --tp_size 2" "--zero_stage 3"; do
    timeout 120 torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py $bad --output_dir /tmp/ob \
      > /tmp/bad.out 2> /tmp/bad.err
    echo "rc=$? $bad: $(grep '^error' /tmp/bad.err)"
  done
  mark "bad values"
}

accelerations() {
  local variants="--vocab_parallel;--no-vocab_parallel;--vocab_parallel --tp_overlap_comm;--deepcompile;--vocab_parallel --activation_checkpointing"
  for precision in fp32 bf16; do
    torchrun --standalone --nproc_per_node 2 tests/parity_worker.py $OUT/parity_160m_$precision.json --tp_size 2 \
      --model_name builtin:pythia-160m --precision $precision --seq_length 256 --variants "$variants" \
      > $OUT/parity_160m_$precision.log 2>&1 || tail -30 $OUT/parity_160m_$precision.log
    parity_summary $OUT/parity_160m_$precision.json; mark "160M $precision"
  done
  torchrun --standalone --nproc_per_node 2 tests/parity_worker.py $OUT/parity_1.4b_bf16.json --tp_size 2 \
    --model_name builtin:pythia-1.4b --precision bf16 --seq_length 512 --variants "--no-vocab_parallel;--deepcompile" \
    > $OUT/parity_1.4b_bf16.log 2>&1 || tail -30 $OUT/parity_1.4b_bf16.log
  parity_summary $OUT/parity_1.4b_bf16.json; mark "1.4B bf16"
}

resume() {
  local work=/tmp/resume common=(--model_name builtin:${SHAPE:-pythia-1.4b} --seq_length 512 --num_steps 12
    --log_interval 1 --eval_interval 0 --skip_export --no-compile --keep_last 0)
  torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py "${common[@]}" --tp_size 2 --batch_size 4 \
    --save_interval 6 --output_dir $work/a > $OUT/resume.log 2>&1; mark "tp2 x dp1, 12 steps"
  torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py "${common[@]}" --tp_size 1 --dp_size 2 \
    --batch_size 2 --save_interval 3 --resume_from_checkpoint $work/a/checkpoints/step_0000006 --output_dir $work/b \
    >> $OUT/resume.log 2>&1; mark "resumed at step 6 at tp1 x dp2"
  torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py "${common[@]}" --tp_size 2 --batch_size 4 \
    --resume_from_checkpoint $work/b/checkpoints/step_0000009 --output_dir $work/c >> $OUT/resume.log 2>&1
  mark "resumed at step 9 at tp2 x dp1"
  grep -E "^(step|error|resum|converting)|universal" $OUT/resume.log | cut -c1-160
  python3 - $work $OUT/resume_${SHAPE:-pythia-1.4b}_bf16.json <<'PY'
import json, sys
work, out = sys.argv[1:]
runs = {n: {r["step"]: r["loss"] for r in json.load(open(f"{work}/{n}/results.json"))["train"]} for n in "abc"}
report = {"losses": runs, "relative_difference": {
    "tp1xdp2 from step 6": max(abs(runs["b"][s] - runs["a"][s]) / runs["a"][s] for s in range(7, 13)),
    "tp2xdp1 from step 9 of that": max(abs(runs["c"][s] - runs["a"][s]) / runs["a"][s] for s in range(10, 13))}}
json.dump(report, open(out, "w"), indent=1)
print(report["relative_difference"])
PY
}

default() {
  local start=$(date +%s)
  deepspeed --num_gpus 1 autotp_custom_patterns.py --output_dir $OUT/default > $OUT/default.log 2>&1
  echo "default rc=$? wall $(( $(date +%s) - start ))s"
  grep -E "^(step|eval|batch|model|device|torch.compile|wrote|error)|Error" $OUT/default.log | cut -c1-200
  cp $OUT/default/results.json $OUT/default_results.json 2>/dev/null
}

bench() {
  python3 benchmarks/bench_single_gpu.py --shape pythia-1.4b --batch_size 10 --seq_length 2048 --runs plain_compiled,script \
    --variant zero1="--zero_stage 1" --variant autocast="--precision fp32 --deepspeed_config benchmarks/ds_torch_autocast.json" \
    --out $OUT/bench_1.4b_bs10.json 2>&1 | tail -8
}

bench_tp() {
  python3 benchmarks/bench_tp.py --shape pythia-410m --global_batch 16 --out $OUT/bench_tp_1gpu.json 2>&1 | tail -4
}

perf() {
  local common=(--model_name builtin:pythia-1.4b --seq_length 2048 --batch_size 10 --num_steps 30 --log_interval 10
                --eval_interval 0 --skip_export)
  timeout 150 python3 benchmarks/ref_gpu_init.py .ref/plain_compiled.py --shape 1.4b --mbs 10 2>&1 | tail -3 \
    | tee $OUT/reference.txt; mark "reference loop"
  timeout 170 deepspeed --num_gpus 1 autotp_custom_patterns.py "${common[@]}" --output_dir /tmp/perf_script \
    > $OUT/script.log 2>&1; echo rc=$?; grep -E "^(step|error)" $OUT/script.log | cut -c1-200
  cp /tmp/perf_script/results.json $OUT/script.json; mark "script"
  timeout 200 python3 benchmarks/step_bench.py --shape 1.4b --mbs 10 --steps 8 --warmup 2 --out $OUT/step_bench.json \
    --variants default,plain,no_tput_timer,no_reduce_scatter,bf16_optimizer,fast_step 2>&1 | grep -vE "^\[" | tail -30
  mark "step_bench"
  timeout 150 deepspeed --num_gpus 1 autotp_custom_patterns.py --num_steps 30 --skip_export --output_dir /tmp/perf_default \
    > $OUT/default.log 2>&1; echo rc=$?; grep -E "^(step|batch|model|error)" $OUT/default.log | cut -c1-200
  cp /tmp/perf_default/results.json $OUT/default.json; mark "default run"
  timeout 120 python3 benchmarks/liger_bench.py --shapes 1.4b:10,20 --out $OUT/liger_bench.json 2>&1 \
    | grep -vE "^\[" | tail -12; mark "liger"
}

fit() {
  local common=(--model_name builtin:pythia-1.4b --seq_length 2048 --batch_size 8 --num_steps 6 --log_interval 2
                --eval_interval 0 --skip_export)
  for name in zero2 zero3 offload; do
    local flags=(--zero_stage 2); [ $name = zero3 ] && flags=(--zero_stage 3)
    [ $name = offload ] && flags=(--zero_stage 2 --offload_optimizer)
    timeout 240 deepspeed --num_gpus 1 autotp_custom_patterns.py "${common[@]}" "${flags[@]}" --output_dir /tmp/fit_$name \
      > /tmp/fit_$name.log 2>&1; echo "$name rc=$?"; grep -E "^(step|error)" /tmp/fit_$name.log | cut -c1-200
    cp /tmp/fit_$name/results.json $OUT/1.4b_$name.json; mark "1.4B $name"
  done
  timeout 60 deepspeed --num_gpus 1 autotp_custom_patterns.py --model_name builtin:pythia-6.9b --output_dir /tmp/fit_no \
    > /tmp/fit_refused.log 2>&1; echo "6.9B as asked rc=$?"; grep "^error" /tmp/fit_refused.log; mark "6.9B refused"
  echo '{"zero_optimization": {"offload_optimizer": {"pin_memory": false}}}' > /tmp/unpinned.json
  timeout 330 deepspeed --num_gpus 1 autotp_custom_patterns.py --model_name builtin:pythia-6.9b --offload_optimizer \
    --deepspeed_config /tmp/unpinned.json --num_steps 4 --log_interval 1 --eval_interval 0 --skip_export \
    --output_dir /tmp/fit_6.9b > $OUT/6.9b_offload.log 2>&1; echo "6.9B offload rc=$?"
  grep -E "^(step|batch|start-up|error)" $OUT/6.9b_offload.log | cut -c1-200
  cp /tmp/fit_6.9b/results.json $OUT/6.9b_offload.json; mark "6.9B offloaded"
}

# ---- the preamble, once, then the parts ------------------------------------------------------------------

main() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH || { echo "error: installing .whl/*.whl failed"; return 1; }
  # NVLink multicast stays off (the lent machine's rule); the rest: unbuffered logs, a dataset cache in /tmp, and
  # any DeepSpeed op built on the fly built for Hopper only
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 \
    HF_DATASETS_CACHE=/tmp/hfds TORCH_CUDA_ARCH_LIST=9.0
  nvidia-smi -L
  python3 -c "import torch, transformers, deepspeed, datasets as d
print('versions', torch.__version__, transformers.__version__, deepspeed.__version__, d.__version__)" 2>&1 | grep versions
  local part root=${OUT:-/tmp/out}
  for part in "$@"; do  # each part reports its own exit codes
    echo "=== part $part"
    OUT=$root/$part; mkdir -p "$OUT"
    "$part"
    mark "part $part done"
  done
}

[ $# -gt 0 ] || { sed -n '2,/^set -o pipefail/p' "$0" | grep '^#' | cut -c3-; exit 2; }
for part in "$@"; do
  [[ " $PARTS " == *" $part "* ]] || { echo "error: no part '$part'; the parts: $PARTS" >&2; exit 2; }
done
main "$@" 2>&1 | stamp
