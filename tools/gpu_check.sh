#!/usr/bin/env bash
# GPU check of the core example on a 2-GPU machine with no network: parity (fp32, bf16) of the sharded
# model against the unsharded one, and the script through the deepspeed launcher on the Pythia-1.4B and
# 6.9B shapes. Needs the wheels from ../shared/tools/gpu-wheels in .whl; writes logs and JSON to $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HF_DATASETS_CACHE=/tmp/hfds
nvidia-smi -L; python3 -c "import torch,transformers,deepspeed,datasets;print('versions', torch.__version__, transformers.__version__, deepspeed.__version__, datasets.__version__)" 2>&1 | grep versions
summ() { python3 -c "
import json,sys; r=json.load(open(sys.argv[1]))
for k,v in r.items():
  s={'logits':v.get('step0_logits_max_diff')}
  if 'losses' in v:
    s['loss0']=v['losses'][0]; s['ref_loss0']=v['reference_losses'][0]; s['lossN']=v['losses'][-1]
    s['max_loss_diff']=max(abs(a-b) for a,b in zip(v['losses'],v['reference_losses']))
    s['max_rel_norm_err']=max(abs(a-b)/b for a,b in zip(v['grad_norms'],v['reference_grad_norms']))
    s['repl_identical']=v['replicated_identical']; s['w_diff']=v['final_weights_max_diff']
  print(sys.argv[1].split('/')[-1], k, s)
" $1; }
t0=$(date +%s)
for spec in "tiny fp32 64" "pythia-160m fp32 128" "pythia-160m bf16 128"; do
  set -- $spec
  torchrun --standalone --nproc_per_node 2 tests/parity_worker.py $OUT/parity_$1_$2.json --tp_size 2 --model_name builtin:$1 --precision $2 --seq_length $3 > $OUT/parity_$1_$2.log 2>&1 || tail -20 $OUT/parity_$1_$2.log
  summ $OUT/parity_$1_$2.json
  echo "elapsed $(( $(date +%s) - t0 ))s"
done
deepspeed --num_gpus 2 autotp_custom_patterns.py --model_name builtin:pythia-1.4b --tp_size 2 --seq_length 512 --num_steps 20 --output_dir $OUT/ds_1.4b > $OUT/ds_1.4b.log 2>&1; echo rc=$?
grep -E "^(step|eval|layout|batch|model|device|versions|error)|AutoTP|Error" $OUT/ds_1.4b.log | grep -v "^\[rank1" | cut -c1-220
echo "elapsed $(( $(date +%s) - t0 ))s"
timeout 300 deepspeed --num_gpus 2 autotp_custom_patterns.py --model_name builtin:pythia-6.9b --tp_size 2 --seq_length 512 --num_steps 20 --log_interval 5 --output_dir $OUT/ds_6.9b > $OUT/ds_6.9b.log 2>&1; echo rc=$?
grep -E "^(step|eval|layout|batch|model|error)|Error" $OUT/ds_6.9b.log | grep -v "^\[rank1" | cut -c1-220
echo "elapsed $(( $(date +%s) - t0 ))s"
