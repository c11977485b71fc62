"""Where one training step's time goes, on one GPU: the script's engine (tp=1, its DeepSpeed config) and,
for comparison, the plain PyTorch loop of bench_single_gpu.py. Phases are timed with the GPU synchronised
around each; then torch.profiler lists the kernels that take the most GPU time. The model runs eagerly
unless --compile is given (the script itself compiles by default on GPUs).

  python benchmarks/profile_step.py --shape pythia-1.4b --batch_size 4 --seq_length 2048 [script flags...]
      [--ds_json '{"zero_optimization": {...}}'  merged into the script's DeepSpeed config; a JSON list
                 of such objects times each variant in turn, in one process]
      [--phases_only  the script's phases only: no kernel table, no plain loop]
      [--host_profile  also list where engine.step spends host time (cProfile, top functions)]
      [--compile_whole  torch.compile the whole module (DeepSpeed's engine.compile) instead of the script's
                 --compile, which compiles each block and the loss]
      [--kernel_groups  GPU time of forward+backward by kernel kind: matmul, attention, cross-entropy, other]
"""
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import autotp_custom_patterns as S  # noqa: E402


def phases(fwd, bwd, opt, ids, steps=5):
    totals = [0.0, 0.0, 0.0]
    for _ in range(steps):
        for i, phase in enumerate((lambda: fwd(ids), bwd, opt)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            phase()
            torch.cuda.synchronize()
            totals[i] += time.perf_counter() - start
    return [1000 * t / steps for t in totals]


def main():
    argv = sys.argv[1:]
    own = {"--shape": "pythia-1.4b", "--ds_json": "{}"}
    for flag in own:
        if flag in argv:
            own[flag] = argv.pop(argv.index(flag) + 1)
            argv.remove(flag)
    phases_only = "--phases_only" in argv
    host_profile = "--host_profile" in argv
    groups, whole = "--kernel_groups" in argv, "--compile_whole" in argv
    argv = [a for a in argv if a not in ("--phases_only", "--host_profile", "--kernel_groups", "--compile_whole")]
    shape = own["--shape"]
    args = S.parse_args(["--model_name", "builtin:" + shape, "--batch_size", "4", "--seq_length", "2048"] + argv)
    args.warmup_steps = 0
    layout = S.resolve_layout(0, 1, 1, 1)
    S.derive_args(args, layout)
    device = S.init_distributed(0)
    config = S.load_config(args)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_length), device=device)
    state = {}

    # the script's engine, once per DeepSpeed variant
    variants = json.loads(own["--ds_json"])
    for variant in variants if isinstance(variants, list) else [variants]:
        ds_config = merge(S.build_ds_config(args, {"partition_config": S.builtin_partition_config()}), variant)
        engine = S.build_engine(S.build_model(args, config, S.DTYPES[args.precision]), args, layout, ds_config)

        if whole:
            engine.compile()  # the whole module, for comparison with the script's --compile
        elif args.compile:
            S.compile_blocks(engine.module)

        def fwd(x):
            state["loss"] = engine(input_ids=x, labels=x).loss

        def bwd():
            engine.backward(state["loss"])

        report(f"script {' '.join(argv)} {json.dumps(variant)}", fwd, bwd, engine.step, ids, table=not phases_only)
        if host_profile:
            profile_host(fwd, bwd, engine.step, ids)
        if groups:
            kernel_groups(fwd, bwd, engine.step, ids)
        engine.destroy()
        del engine, fwd, bwd
        state.clear()
        gc.collect()
        torch.cuda.empty_cache()
        print(f"after the variant: {torch.cuda.memory_allocated() / 2**30:.1f} GiB still allocated", flush=True)
    if phases_only:
        return

    # the plain loop
    model = S.AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def plain_fwd(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            state["loss"] = model(input_ids=x, labels=x).loss

    def plain_opt():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    report("plain", plain_fwd, lambda: state["loss"].backward(), plain_opt, ids)


GROUPS = [("attention", ("flash", "fmha", "sdpa", "attention")), ("matmul", ("gemm", "nvjet", "xmma", "cutlass")),
          ("cross-entropy", ("softmax", "nll_loss", "cross_entropy"))]


def kernel_groups(fwd, bwd, opt, ids, steps=2):
    """GPU time of the forward and backward alone, summed by kernel kind, per step; then the operators
    that launched the most GPU time (which one a copy comes from, say)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fwd(ids), bwd()
        torch.cuda.synchronize()
    opt()
    averages = prof.key_averages()
    sums, names = {}, {}
    for evt in averages:
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        kind = next((g for g, keys in GROUPS if any(k in evt.key.lower() for k in keys)), "other")
        sums[kind] = sums.get(kind, 0) + us / 1000 / steps
        names.setdefault(kind, []).append((us / 1000 / steps, evt.key[:110]))
    print("forward+backward GPU time by kind, per step: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sums.items())
          + f", total {sum(sums.values()):.1f} ms", flush=True)
    for kind in ("matmul", "attention", "cross-entropy", "other"):
        for ms, name in sorted(names.get(kind, []), reverse=True)[:12 if kind == "other" else 6]:
            print(f"  {kind:13s} {ms:7.2f} ms  {name}", flush=True)
    print(averages.table(sort_by="device_time_total", row_limit=45, max_name_column_width=70), flush=True)


def merge(base, extra):
    for key, value in extra.items():
        base[key] = merge(dict(base.get(key, {})), value) if isinstance(value, dict) else value
    return base


def profile_host(fwd, bwd, opt, ids, steps=3):
    """Host time of the optimizer step by Python function: where the GPU waits on the CPU."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    for _ in range(steps):
        fwd(ids), bwd()
        torch.cuda.synchronize()
        profiler.enable()
        opt()
        torch.cuda.synchronize()
        profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def report(name, fwd, bwd, opt, ids, table=True):
    phases(fwd, bwd, opt, ids, steps=3)  # warm-up
    f, b, o = phases(fwd, bwd, opt, ids)
    print(f"{name}: forward {f:.1f} ms, backward {b:.1f} ms, optimizer step {o:.1f} ms, total {f + b + o:.1f} ms", flush=True)
    if not table:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            fwd(ids), bwd(), opt()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
