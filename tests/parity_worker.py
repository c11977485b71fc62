"""One process of the parity test (tests/test_parity.py launches it with torchrun; not a test itself).

Every rank builds the same tiny GPT-NeoX (fp32, same seed) twice: once to shard through the script's
own build_engine, once as the unsharded reference, trained with plain PyTorch on the union of the
batches that all DP ranks see. Rank 0 writes the measured differences as JSON to argv[1]; the test
decides what passes.

usage: torchrun --standalone --nproc_per_node N tests/parity_worker.py OUT.json --tp_size T --dp_size D ...
"""
import argparse
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import transformers

from worker import S, own_option, random_blocks, run_worker, start

STEPS = 10


def reference_batches(dataset, layout, args, device):
    """The global batch of each step, in the order the DP ranks' samplers hand it out."""
    per_rank = [S.train_batches(dataset, S.Layout(d * layout.tp, layout.world_size, layout.tp, layout.dp),
                                args.batch_size, args.global_batch_size, args.seed, device) for d in range(layout.dp)]
    while True:
        yield torch.cat([next(it) for _ in range(args.gradient_accumulation_steps) for it in per_rank])


def clip_in_fp64(model, max_norm):
    """Global gradient norm summed in float64 (torch's fp32 clip_grad_norm_ on CPU was off by 2e-5
    relative here), then clipped the way DeepSpeed and torch do: scale by max_norm / (norm + 1e-6)."""
    grads = [p.grad for p in model.parameters()]
    norm = sum(g.double().pow(2).sum() for g in grads).sqrt().item()
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def unshard(pieces, dim, shape):
    """Undo the split: plain, the pieces follow each other; with a `shape` of blocks [b1, b2, ...] on dim,
    each rank holds its slice of every block, so the blocks are put back one by one."""
    if not shape or not isinstance(shape[dim], tuple):
        return torch.cat(pieces, dim)
    tp = len(pieces)
    per_rank = [b // tp for b in shape[dim]]
    split = [piece.split(per_rank, dim) for piece in pieces]
    return torch.cat([torch.cat([split[r][b] for r in range(tp)], dim) for b in range(len(per_rank))], dim)


def upstream_shape_specs(config):
    """The fused-QKV spec from the upstream example: treats the rows as [Q; K; V] blocks."""
    partition_config = S.builtin_partition_config()
    specs, h = partition_config["layer_specs"], config.hidden_size
    specs[0] = dict(specs[0], shape=[[h, h, h], -1], partition_dim=0)
    return partition_config


def step0_logits_diff(engine, reference, input_ids, vocab_parallel):
    """Largest logit difference before training; a vocab-parallel head's logits are gathered first."""
    with torch.no_grad():
        logits = engine(input_ids=input_ids).logits
        logits = S.gather_vocab_shards(logits) if vocab_parallel else logits
        return (logits - reference(input_ids=input_ids).logits).abs().max().item()


def whole_local(param):
    """This TP rank's whole tensor of a parameter (under ZeRO-3, its DP pieces gathered first)."""
    with deepspeed.zero.GatheredParameters([param], enabled=S.is_zero3(param)):
        return param.detach().clone()


def qkv_heads_held(engine, reference, config, layout):
    """Which (head, role) rows of layer 0's fused QKV this rank holds, found by matching its local rows
    against the unsharded weight. HF's layout: row i is head i // (3*hs), role (i // hs) % 3."""
    local = whole_local(engine.module.gpt_neox.layers[0].attention.query_key_value.weight)
    full = reference.gpt_neox.layers[0].attention.query_key_value.weight.detach()
    hs = config.hidden_size // config.num_attention_heads
    rows = [int((full == row).all(dim=1).nonzero()[0]) for row in local]
    return sorted({(i // (3 * hs), (i // hs) % 3) for i in rows})


def whole_model(args, config):
    """The model on the host, built by transformers itself (seeded): independent of the script's loading code."""
    transformers.set_seed(args.seed)
    model = S.AutoModelForCausalLM.from_config(config, dtype=S.DTYPES[args.precision])
    model.config.use_cache = False
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def run(args, layout, config, source, optimizer_factory, dataset, device):
    """source: the script's SpecSource (where the specs come from); optimizer_factory builds the optimizer of
    both models; None: compare step-0 logits only. The sharded model is made the script's way: an empty model
    sharded by deepspeed.initialize, then each rank's pieces written (fill_weights) from the reference's
    weights and ZeRO's fp32 masters refreshed from them."""
    reference = whole_model(args, config).to(device)
    ds_config = S.build_ds_config(args, source.tensor_parallel)
    ds_config["zero_allow_untested_optimizer"] = True  # ZeRO asks for this with SGD
    empty = S.empty_model(args, config, S.DTYPES[args.precision], device)
    engine = S.build_engine(empty, args, layout, ds_config, optimizer=optimizer_factory)
    weights = S.CheckpointWeights(reference.state_dict().__getitem__, "the reference's weights")
    S.fill_weights(engine.module, weights, S.groups.get_tensor_model_parallel_rank() if layout.tp > 1 else 0,
                   layout.tp)
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()
    if args.deepcompile:
        engine.compile()
    probe = next(iter(dataset.iter(batch_size=2)))["input_ids"].to(device)
    result = {"step0_logits_max_diff": step0_logits_diff(engine, reference, probe, args.vocab_parallel),
              "head_shape": list(S.local_shape(engine.module.get_output_embeddings().weight)),
              "reference_head_shape": list(reference.get_output_embeddings().weight.shape), "tp": layout.tp}
    if optimizer_factory is None:
        return result
    if config.model_type == "gpt_neox":
        held = [None] * layout.world_size
        dist.all_gather_object(held, qkv_heads_held(engine, reference, config, layout))
        result["qkv_rows_held_by_rank"] = held

    opt = optimizer_factory(reference.parameters())
    sched = S.warmup_cosine_factory(args)(opt)
    batches = S.train_batches(dataset, layout, args.batch_size, args.global_batch_size, args.seed, device)
    ref_batches = reference_batches(dataset, layout, args, device)
    result.update(losses=[], reference_losses=[], grad_norms=[], reference_grad_norms=[])
    for _ in range(STEPS):
        result["losses"].append(S.dp_mean(S.train_step(engine, batches), engine, layout))
        norm = engine.get_global_grad_norm()
        result["grad_norms"].append(None if norm is None else float(norm))
        input_ids = next(ref_batches)
        loss = reference(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        result["reference_grad_norms"].append(clip_in_fp64(reference, args.max_grad_norm))
        opt.step(), sched.step(), opt.zero_grad()
        result["reference_losses"].append(loss.item())

    full = dict(reference.named_parameters())
    identical, max_weight_diff = True, 0.0
    for name, p in engine.module.named_parameters():
        p = whole_local(p)
        gathered = [p]
        if layout.tp > 1:
            gathered = [torch.empty_like(p) for _ in range(layout.tp)]
            dist.all_gather(gathered, p.contiguous(), group=S.groups.get_tensor_model_parallel_group())
        if p.shape == full[name].shape:  # replicated: identical on every TP rank, equal to the reference
            identical &= all(torch.equal(gathered[0], g) for g in gathered)
            max_weight_diff = max(max_weight_diff, (p - full[name]).abs().max().item())
        else:  # sharded: the TP ranks' pieces, put back together, equal the reference
            dim = 0 if p.shape[0] != full[name].shape[0] else 1
            spec = source.tp_config and source.tp_config.find_matching_spec(name.rsplit(".", 1)[0] + ".weight",
                                                                            config.model_type)
            whole = unshard(gathered, dim, spec.shape if spec else None)
            max_weight_diff = max(max_weight_diff, (whole - full[name]).abs().max().item())
    flag = torch.tensor(float(identical), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    result.update(replicated_identical=bool(flag.item()), final_weights_max_diff=max_weight_diff)
    return result


def main():
    """argv: OUT.json, then the script's arguments, and this worker's own options: --wrong_partition_config
    FILE names specs expected to fail the step-0 check (default: the upstream fused-QKV `shape` spec for
    GPT-NeoX); --variants "A;B;..." runs the parity check once per variant, each a list of the script's
    flags added to the others (the TP accelerations), "" being the arguments as given."""
    out_path, argv = sys.argv[1], sys.argv[2:]
    wrong_file = own_option(argv, "--wrong_partition_config")
    variants = (own_option(argv, "--variants") or "").split(";")
    argv = ["--model_name", "builtin:tiny", "--precision", "fp32", "--seq_length", "32", "--num_steps", str(STEPS),
            "--warmup_steps", "2", "--learning_rate", "1e-2", *argv]
    first, device = start(*argv, "--no-vocab_parallel")
    layout, config = first.layout, first.config
    dataset = random_blocks(64, first.args.seq_length, config.vocab_size, seed=1)
    wrong = S.load_partition_config(wrong_file) if wrong_file else upstream_shape_specs(config)
    wrong = S.SpecSource("the wrong specs", {"partition_config": wrong}, S.autotp_config(wrong))
    results = {"wrong_specs": run(first.args, layout, config, wrong, None, dataset, device), "variants": {}}
    for variant in variants:
        settled = S.preflight(argv + variant.split())
        args, source = settled.args, settled.source
        # no clipping for SGD: it would hide a gradient-scale error
        sgd_args = argparse.Namespace(**vars(args) | {"max_grad_norm": 0.0, "learning_rate": 0.5})
        sgd = lambda params: torch.optim.SGD(params, lr=sgd_args.learning_rate)  # noqa: E731
        results["variants"][variant] = {
            "vocab_parallel": args.vocab_parallel,
            "adamw": run(args, layout, config, source, S.adamw_factory(args), dataset, device),
            "sgd": run(sgd_args, layout, config, source, sgd, dataset, device)}
    if layout.rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    run_worker(main)
