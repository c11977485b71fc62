#!/usr/bin/env bash
# The script on 2 GPUs after a change to how it is built (run from the project root, with the wheels of
# ../shared/tools/gpu-wheels in .whl; writes to $OUT): the 6.9B random tp 2 run of benchmarks/startup.sh (same
# flags: its step-1 loss and grad norm must match that earlier log), the default run with no flags, and bad values.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { python3 -u -c 'import sys, time
t = time.time()
for line in sys.stdin: print(f"{time.time() - t:7.1f} {line}", end="", flush=True)'; }
echo "=== 6.9B tp 2 (as benchmarks/startup.sh random)"
torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py --seq_length 2048 --log_interval 1 --eval_interval 0 \
  --skip_export --model_name builtin:pythia-6.9b --tp_size 2 --batch_size 8 --num_steps 5 --output_dir /tmp/o69 2>&1 \
  | stamp | grep -v "^ *[0-9.]* \[" > $OUT/tp2_6.9b.log; grep "start-up\|step \|error\|AutoTP\|batch:" $OUT/tp2_6.9b.log
cp /tmp/o69/results.json $OUT/tp2_6.9b.json
echo "--- $(( $(date +%s) - t0 )) s"
echo "=== default run, no flags (2 GPUs)"
torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py --num_steps 20 --log_interval 5 --output_dir /tmp/od 2>&1 \
  | stamp | grep -v "^ *[0-9.]* \[" > $OUT/default.log; grep -v "it/s\|s/it" $OUT/default.log | tail -40
cp /tmp/od/results.json $OUT/default.json
echo "--- $(( $(date +%s) - t0 )) s"
echo "=== bad values"
for bad in "--batch_size 0" "--deepcompile --tp_size 2" "--zero_stage 3"; do
  timeout 120 torchrun --standalone --nproc_per_node 2 autotp_custom_patterns.py $bad --output_dir /tmp/ob > /tmp/bad.out 2> /tmp/bad.err
  echo "rc=$? $bad: $(grep '^error' /tmp/bad.err)"
done
echo "--- $(( $(date +%s) - t0 )) s"
