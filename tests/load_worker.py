"""One process of the loading test (tests/test_loading.py launches it with torchrun; not a test itself).

For each case (a checkpoint and the script's flags), the model is sharded twice: through the way the script
loaded models before it read per-rank slices (transformers reads the whole checkpoint on the host in the
training dtype, deepspeed.initialize slices it) and through the script's build_sharded_model (an empty model
sliced, then each rank's slices read from the safetensors files). Rank 0 writes, per case, whether every rank's
shards were bit-identical and both runs' first losses. With --dump FILE, the random weights the script makes
for builtin:tiny at this tp are gathered whole and saved, for comparison across tp.

usage: torchrun --standalone --nproc_per_node N tests/load_worker.py OUT.json [--dump FILE] CASE.json
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from worker import S, own_option, random_blocks, run_worker, start

STEPS = 3
FLAGS = ["--seq_length", "32", "--num_steps", str(STEPS), "--learning_rate", "1e-2", "--warmup_steps", "0"]


def first_losses(engine, args, layout, config, device):
    batches = S.train_batches(random_blocks(16, args.seq_length, config.vocab_size, seed=3), layout, args.batch_size,
                             args.global_batch_size, args.seed, device)
    return [S.train_step(engine, batches).item() for _ in range(STEPS)]


def compare(argv, layout, device):
    """The case's shards and first losses under both paths. The script refuses a tp that does not divide the
    heads, but DeepSpeed splits such a model unevenly (its own sizes), and the loading must follow it there too:
    this worker lifts that one check."""
    check, S.check_model_fits_tp = S.check_model_fits_tp, lambda *_: None
    try:
        run = S.preflight([*FLAGS, "--tp_size", str(layout.tp), *argv])
    finally:
        S.check_model_fits_tp = check
    args, config, shapes_only = run.args, run.config, run.shapes_only
    dtype = S.DTYPES[args.precision]
    before = S.AutoModelForCausalLM.from_pretrained(args.model_name, dtype=dtype)  # whole, on the host
    before.config.use_cache = False
    old = S.build_engine(before, args, layout, run.ds_config)
    new, _ = S.build_sharded_model(run, device, S.Clock(layout))
    old_shards, new_shards = old.module.state_dict(), new.module.state_dict()
    same = old_shards.keys() == new_shards.keys() and all(
        old_shards[k].shape == new_shards[k].shape and torch.equal(old_shards[k], new_shards[k]) for k in old_shards)
    split = sum(tuple(v.shape) != tuple(shapes_only.state_dict()[k].shape) for k, v in new_shards.items())
    flag = torch.tensor(float(same), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return {"shards_identical": bool(flag.item()), "tensors": len(new_shards), "split_tensors": split,
            "losses_before": first_losses(old, args, layout, config, device),
            "losses_now": first_losses(new, args, layout, config, device)}


def dump_random_model(path, layout, device):
    """The script's random builtin:tiny weights at this tp, gathered whole (rank 0 saves them)."""
    run = S.preflight([*FLAGS, "--tp_size", str(layout.tp), "--model_name", "builtin:tiny", "--precision", "fp32"])
    engine, _ = S.build_sharded_model(run, device, S.Clock(layout))
    state = engine._consolidated_16bit_state_dict() if layout.tp > 1 else engine.module.state_dict()
    if layout.rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, path)


def main():
    out_path, argv = sys.argv[1], sys.argv[2:]
    dump = own_option(argv, "--dump")
    cases = json.loads(Path(argv[0]).read_text()) if argv else {}
    run, device = start("--model_name", "builtin:tiny", "--dp_size", "1")  # tp: every rank
    layout = run.layout
    results = {name: compare(case, layout, device) for name, case in cases.items()}
    if dump:
        dump_random_model(dump, layout, device)
    if layout.rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    run_worker(main)
