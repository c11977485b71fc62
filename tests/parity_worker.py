"""One process of the parity test (tests/test_parity.py launches it with torchrun; not a test itself).

Every rank builds the same tiny GPT-NeoX (fp32, same seed) twice: once to shard through the script's
own build_engine, once as the unsharded reference, trained with plain PyTorch on the union of the
batches that all DP ranks see. Rank 0 writes the measured differences as JSON to argv[1]; the test
decides what passes.

usage: torchrun --standalone --nproc_per_node N tests/parity_worker.py OUT.json --tp_size T --dp_size D ...
"""
import copy
import json
import os
import sys
import traceback
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import autotp_custom_patterns as S  # noqa: E402

STEPS = 10


def random_blocks(n, seq_length, vocab, seed):
    """Random tokens from a small part of the vocabulary, so the loss has somewhere to fall."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 64), (n, seq_length), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")


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


def qkv_heads_held(engine, reference, config, layout):
    """Which (head, role) rows of layer 0's fused QKV this rank holds, found by matching its local rows
    against the unsharded weight. HF's layout: row i is head i // (3*hs), role (i // hs) % 3."""
    local = engine.module.gpt_neox.layers[0].attention.query_key_value.weight.detach()
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
    both models; None: compare step-0 logits only."""
    model = whole_model(args, config)
    reference = copy.deepcopy(model).to(device)
    ds_config = S.build_ds_config(args, source.tensor_parallel)
    ds_config["zero_allow_untested_optimizer"] = True  # ZeRO asks for this with SGD
    engine = S.build_engine(model, args, layout, ds_config, optimizer=optimizer_factory)
    if args.deepcompile:
        engine.compile()
    probe = next(iter(dataset.iter(batch_size=2)))["input_ids"].to(device)
    result = {"step0_logits_max_diff": step0_logits_diff(engine, reference, probe, args.vocab_parallel),
              "head_shape": list(engine.module.get_output_embeddings().weight.shape),
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
        gathered = [torch.empty_like(p) for _ in range(layout.tp)]
        dist.all_gather(gathered, p.detach().contiguous(), group=S.groups.get_tensor_model_parallel_group())
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


def own_option(argv, flag):
    """Remove this worker's `flag VALUE` from argv; returns VALUE or None."""
    if flag not in argv:
        return None
    value = argv[argv.index(flag) + 1]
    del argv[argv.index(flag):argv.index(flag) + 2]
    return value


def main():
    """argv: OUT.json, then the script's arguments, and this worker's own options: --wrong_partition_config
    FILE names specs expected to fail the step-0 check (default: the upstream fused-QKV `shape` spec for
    GPT-NeoX); --variants "A;B;..." runs the parity check once per variant, each a list of the script's
    flags added to the others (the TP accelerations), "" being the arguments as given."""
    out_path, argv = sys.argv[1], sys.argv[2:]
    wrong_file = own_option(argv, "--wrong_partition_config")
    variants = (own_option(argv, "--variants") or "").split(";")

    def script_args(*extra):
        args = S.parse_args(["--model_name", "builtin:tiny", "--precision", "fp32", "--seq_length", "32",
                             "--num_steps", str(STEPS), "--warmup_steps", "2", "--learning_rate", "1e-2", *argv, *extra])
        S.derive_args(args, S.resolve_layout(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args.tp_size,
                                             args.dp_size))
        return args

    args = script_args()
    layout = S.resolve_layout(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args.tp_size, args.dp_size)
    device = S.init_distributed(int(os.environ["LOCAL_RANK"]))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 on GPUs too
    config = S.load_config(args)
    dataset = random_blocks(64, args.seq_length, config.vocab_size, seed=1)
    shapes_only = S.meta_model(config)
    wrong = S.load_partition_config(wrong_file) if wrong_file else upstream_shape_specs(config)
    wrong = S.SpecSource("the wrong specs", {"partition_config": wrong}, S.autotp_config(wrong))
    results = {"wrong_specs": run(script_args("--no-vocab_parallel"), layout, config, wrong, None, dataset, device),
               "variants": {}}
    for variant in variants:
        args = script_args(*variant.split())
        source = S.spec_source(args, config, shapes_only)
        sgd_args = copy.copy(args)
        sgd_args.max_grad_norm, sgd_args.learning_rate = 0.0, 0.5  # no clipping: it would hide a gradient-scale error
        sgd = lambda params: torch.optim.SGD(params, lr=sgd_args.learning_rate)  # noqa: E731
        results["variants"][variant] = {
            "vocab_parallel": args.vocab_parallel,
            "adamw": run(args, layout, config, source, S.adamw_factory(args), dataset, device),
            "sgd": run(sgd_args, layout, config, source, sgd, dataset, device)}
    if layout.rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))


def run_worker(main):
    """Run a worker's main, destroy the process group, and leave without Python's finalization.

    A gloo thread can still be letting go of the last collective's tensors when the main thread reaches the
    end: if the interpreter is shutting down by then, the thread is stopped while it frees them and the process
    aborts (SIGABRT, "terminate called without an active exception") although its work went well. Seen ~1
    launch in 20 of four processes on two cores, in pt_gloo_runloop under Py_FinalizeEx (pytorch/pytorch
    issue 190489). os._exit skips that shutdown; the worker's output is written and flushed before."""
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_worker(main)
