#!/usr/bin/env bash
# GPU proof of the TP accelerations on a 2-GPU machine with no network (run from the project root, with the
# wheels of ../shared/tools/gpu-wheels in .whl). Writes JSON and logs to $OUT.
#   bash tools/gpu_accelerations.sh parity   tests/parity_worker.py at tp 2 against the unsharded model, Pythia-160M
#                                            shape in fp32 and bf16, for the defaults, --no-vocab_parallel,
#                                            --tp_overlap_comm, --deepcompile and activation checkpointing (the
#                                            upstream `shape` spec is run by every launch and must fail); then
#                                            DeepCompile against the plain shards on the 1.4B shape in bf16
#   [SHAPE=pythia-410m] bash tools/gpu_accelerations.sh resume   1.4B shape (or SHAPE), bf16: 12 steps at tp 2 x dp 1; resumed from step 6 at
#                                            tp 1 x dp 2; resumed from that run's step 9 at tp 2 x dp 1 again
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
t0=$(date +%s)
elapsed() { echo "--- $1: $(( $(date +%s) - t0 )) s since the start"; }
summary() { python3 - "$@" <<'PY'
import json, sys
for path in sys.argv[1:]:
    r = json.load(open(path))
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
variants="--vocab_parallel;--no-vocab_parallel;--vocab_parallel --tp_overlap_comm;--deepcompile;--vocab_parallel --activation_checkpointing"
if [ "$1" = parity ]; then
  for precision in fp32 bf16; do
    torchrun --standalone --nproc_per_node 2 tests/parity_worker.py $OUT/parity_160m_$precision.json --tp_size 2 \
      --model_name builtin:pythia-160m --precision $precision --seq_length 256 --variants "$variants" \
      > $OUT/parity_160m_$precision.log 2>&1 || tail -30 $OUT/parity_160m_$precision.log
    summary $OUT/parity_160m_$precision.json; elapsed "160M $precision"
  done
  torchrun --standalone --nproc_per_node 2 tests/parity_worker.py $OUT/parity_1.4b_bf16.json --tp_size 2 \
    --model_name builtin:pythia-1.4b --precision bf16 --seq_length 512 --variants "--no-vocab_parallel;--deepcompile" \
    > $OUT/parity_1.4b_bf16.log 2>&1 || tail -30 $OUT/parity_1.4b_bf16.log
  summary $OUT/parity_1.4b_bf16.json; elapsed "1.4B bf16"
else
  work=/tmp/resume; common=(--model_name builtin:${SHAPE:-pythia-1.4b} --seq_length 512 --num_steps 12 --log_interval 1
    --eval_interval 0 --skip_export --no-compile --keep_last 0)
  torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py "${common[@]}" --tp_size 2 --batch_size 4 \
    --save_interval 6 --output_dir $work/a > $OUT/resume.log 2>&1; elapsed "tp2 x dp1, 12 steps"
  torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py "${common[@]}" --tp_size 1 --dp_size 2 \
    --batch_size 2 --save_interval 3 --resume_from_checkpoint $work/a/checkpoints/step_0000006 --output_dir $work/b \
    >> $OUT/resume.log 2>&1; elapsed "resumed at step 6 at tp1 x dp2"
  torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py "${common[@]}" --tp_size 2 --batch_size 4 \
    --resume_from_checkpoint $work/b/checkpoints/step_0000009 --output_dir $work/c >> $OUT/resume.log 2>&1
  elapsed "resumed at step 9 at tp2 x dp1"
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
fi
