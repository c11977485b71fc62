"""One GPU: what the script's training step costs, phase by phase, for DeepSpeed settings and ds_fast_step,
against the reference loop of ../shared/bench/plain_compiled.py, all in one process.

Each variant builds the script's engine afresh (random Pythia shape on the GPU, bf16 weights, ZeRO-2 with fp32
masters, torch fused AdamW in two groups, clipping at 1.0, bf16 overflow check off, each GPTNeoXLayer and the
loss torch.compile'd; at tp 1 AutoTP replaces nothing) and reports:
  tok/s      free-running steps, the GPU synchronised only at the end (what the script sees)
  phases     forward / backward / optimizer step, the GPU synchronised around each (ms)
  step GPU   the kernels engine.step() launches: count, summed GPU time, the largest ones
  kinds      one forward+backward's GPU time by kernel kind (matmul, attention, compiled, copy/cast, ...)
  syncs      host syncs inside engine.step() (torch.cuda.set_sync_debug_mode and explicit synchronize calls),
             by the source line that caused them
"plain" is the reference loop (fp32 weights, autocast bf16, the same compiled blocks, clip_grad_norm_, fused
AdamW). Later variants in one process can read a few ms slower in the backward (allocator state): "default"
runs first and again last to show how much.

  python step_bench.py --shape 1.4b --mbs 10 [--variants default,no_tput_timer,...,plain,default]
                       [--steps 10] [--out step_bench.json]
"""
import argparse
import collections
import gc
import json
import os
import time
import warnings

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig

CUDA = torch.cuda.is_available()  # without a GPU (a smoke test of this file): CPU, tiny shape, nothing compiled
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = {"410m": (24, 1024, 16, 50304), "1.4b": (24, 2048, 16, 50304), "2.8b": (32, 2560, 32, 50304),
          "1b": (16, 2048, 8, 50304), "6.9b": (32, 4096, 32, 50432),  # as plain_compiled.py and the script
          "tiny": (24, 64, 4, 512)}  # the 1.4B shape's 292 tensors, for a CPU smoke test
TIMERS_OFF = {"timers": {"throughput": {"enabled": False}}}  # its start and stop each call synchronize()
DP1 = {"zero_optimization": {"reduce_scatter": False}}  # at dp 1: no div_(1.0) pass over each bucket
VARIANTS = {  # DeepSpeed config merged over the script's, and ds_fast_step (None, "fold" or "nofold")
    "default": ({}, None),
    "no_tput_timer": (TIMERS_OFF, None),
    "no_reduce_scatter": ({**TIMERS_OFF, **DP1}, None),
    "bf16_optimizer": ({**TIMERS_OFF, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"},
                        "bf16": {"immediate_grad_update": True}}, None),
    "fast_step": ({**TIMERS_OFF, **DP1}, "fold"),
    "fast_step_nofold": ({**TIMERS_OFF, **DP1}, "nofold"),
    "no_clip_no_norm": ({**TIMERS_OFF, **DP1, "gradient_clipping": 0.0,
                         "zero_optimization": {"reduce_scatter": False, "compute_grad_norm": False}}, None),
}


def pythia(shape):
    L, H, A, V = SHAPES[shape]
    return GPTNeoXConfig(num_hidden_layers=L, hidden_size=H, num_attention_heads=A, intermediate_size=4 * H,
                         vocab_size=V, max_position_embeddings=2048, bos_token_id=0, eos_token_id=0,
                         tie_word_embeddings=False, use_cache=False)


def merge(base, extra):
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def sync():
    if CUDA:
        torch.cuda.synchronize()


def compile_blocks(model):  # as the script's compile_blocks
    if not CUDA:
        return
    for layer in model.gpt_neox.layers:
        layer.compile()
    model.loss_function = torch.compile(model.loss_function)


def adamw(params):  # as the script's adamw_factory on a GPU
    params = list(params)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=CUDA)


def build_engine(args, ds_extra, patch):
    import deepspeed
    import ds_fast_step
    ds_fast_step.uninstall()
    if patch:
        ds_fast_step.install(fold=patch == "fold")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(pythia(args.shape), dtype=torch.bfloat16)
    config = merge({"train_micro_batch_size_per_gpu": args.mbs, "gradient_accumulation_steps": 1,
                    "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
                    "bf16": {"enabled": True, "check_grad_overflow": False}, "tensor_parallel": {"autotp_size": 1},
                    "steps_per_print": 10 ** 9}, ds_extra)
    engine, *_ = deepspeed.initialize(model=model, config=config, optimizer=adamw,
                                      lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    compile_blocks(engine.module)
    state = {}

    def fwd(ids):
        state["loss"] = engine(input_ids=ids, labels=ids).loss

    return engine, fwd, lambda: engine.backward(state["loss"]), engine.step, state


def build_plain(args):
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(pythia(args.shape), dtype=torch.float32)
    compile_blocks(model)
    opt = adamw(model.parameters())
    state = {}

    def fwd(ids):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            state["loss"] = model(input_ids=ids, labels=ids).loss

    def step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, fwd, lambda: state["loss"].backward(), step, state


def timed_steps(fwd, bwd, opt, batches):
    sync()
    start = time.perf_counter()
    for ids in batches:
        fwd(ids), bwd(), opt()
    sync()
    return (time.perf_counter() - start) / len(batches)


def phases(fwd, bwd, opt, batches):
    totals = [0.0, 0.0, 0.0]
    for ids in batches:
        for i, phase in enumerate((lambda: fwd(ids), bwd, opt)):
            sync()
            start = time.perf_counter()
            phase()
            sync()
            totals[i] += time.perf_counter() - start
    return [round(1000 * t / len(batches), 1) for t in totals]


def syncs_in(opt):
    """Host syncs during one call of opt(): implicit ones (sync debug mode) and torch.cuda.synchronize calls."""
    where = collections.Counter()
    real_sync = torch.cuda.synchronize

    def counted_sync(*a, **k):
        import traceback
        frame = traceback.extract_stack(limit=3)[0]
        where[f"synchronize() from {os.path.basename(frame.filename)}:{frame.lineno}"] += 1
        return real_sync(*a, **k)

    torch.cuda.synchronize = counted_sync
    if CUDA:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt()
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize = real_sync
    for w in caught:  # (an explicit synchronize may warn too: counted above, not again here)
        if "synchroniz" in str(w.message) and os.path.basename(w.filename) != os.path.basename(__file__):
            where[f"{os.path.basename(w.filename)}:{w.lineno}"] += 1
    return dict(where)


KINDS = [("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_")),
         ("attention", ("flash", "fmha", "attention", "sdpa")), ("compiled", ("triton_",)),
         ("adam", ("adam", "multi_tensor")), ("norm", ("norm",)),
         ("copy/cast", ("copy", "memcpy", "cat", "fill", "memset")), ("nccl", ("nccl",))]


def fwd_bwd_kernels(fwd, bwd, opt, ids):
    """GPU ms of one forward+backward by kernel kind (the optimizer step runs after, unprofiled)."""
    if not CUDA:
        return {}
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fwd(ids), bwd()
        sync()
    opt()
    kinds = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name.lower()
            kind = next((k for k, keys in KINDS if any(key in name for key in keys)), "other")
            kinds[kind] += e.time_range.elapsed_us() / 1000
    return {k: round(v, 1) for k, v in kinds.most_common()}


def step_kernels(opt):
    """Kernels launched by one call of opt(): count, summed GPU ms, the five largest by total time."""
    if not CUDA:
        return {"kernels": 0, "gpu_ms": 0.0, "top": []}
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = collections.Counter()
    for e in kernels:
        by_name[e.name[:60]] += e.time_range.elapsed_us() / 1000
    return {"kernels": len(kernels), "gpu_ms": round(sum(by_name.values()), 2),
            "top": [(n, round(ms, 2)) for n, ms in by_name.most_common(5)]}


def measure(args, name):
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    built = build_plain(args) if name == "plain" else build_engine(args, *VARIANTS[name])
    owner, fwd, bwd, opt, state = built
    torch.manual_seed(1)
    V = SHAPES[args.shape][3]
    batches = torch.randint(0, V, (args.warmup + args.steps + 7, args.mbs, args.seq), device=DEVICE)
    start = time.perf_counter()
    losses = []
    for ids in batches[:args.warmup]:  # compilation happens here
        fwd(ids), bwd(), opt()
        losses.append(round(state["loss"].item(), 4))
    compile_s = time.perf_counter() - start
    step_s = timed_steps(fwd, bwd, opt, batches[args.warmup:args.warmup + args.steps])
    phase_ms = phases(fwd, bwd, opt, batches[-7:-3])
    kinds = fwd_bwd_kernels(fwd, bwd, opt, batches[-3])
    fwd(batches[-2]), bwd()
    syncs = syncs_in(opt)
    fwd(batches[-1]), bwd()
    kernels = step_kernels(opt)
    norm = owner.get_global_grad_norm() if hasattr(owner, "get_global_grad_norm") else None
    result = {"variant": name, "tokens_per_s": round(args.mbs * args.seq / step_s), "step_ms": round(1000 * step_s, 1),
              "forward_ms": phase_ms[0], "backward_ms": phase_ms[1], "optimizer_ms": phase_ms[2],
              "step_syncs": syncs, "step_kernels": kernels, "fwd_bwd_gpu_ms": kinds, "warmup_losses": losses,
              "last_grad_norm": None if norm is None else round(float(norm), 4),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if CUDA else 0.0,
              "warmup_s": round(compile_s, 1)}
    if hasattr(owner, "destroy"):
        owner.destroy()
    del owner, fwd, bwd, opt, state, built
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        result["left_gib"] = round(torch.cuda.memory_allocated() / 2 ** 30, 2)  # should be ~0: nothing kept
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="1.4b", choices=SHAPES)
    p.add_argument("--mbs", type=int, default=10)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="free-running timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="default,no_tput_timer,no_reduce_scatter,fast_step,fast_step_nofold,"
                                         "bf16_optimizer,no_clip_no_norm,plain,default")
    p.add_argument("--out", default="step_bench.json")
    args = p.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29571"))
    import deepspeed
    if not CUDA:
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build for a smoke test
    deepspeed.init_distributed(dist_backend="nccl" if CUDA else "gloo")
    for knob in ("cache_size_limit", "recompile_limit"):  # every variant brings new modules to the same code
        try:
            setattr(torch._dynamo.config, knob, 64)
        except Exception:
            pass
    results = []
    print(f"{'variant':18s} {'tok/s':>8s} {'step':>7s} {'fwd':>6s} {'bwd':>6s} {'opt':>6s} {'kern':>5s} {'optGPU':>7s} "
          f"{'syncs':>5s} {'GiB':>5s}  grad norm, losses", flush=True)
    for name in args.variants.split(","):
        try:
            r = measure(args, name)
        except Exception as exc:  # one variant failing must not cost the others
            r = {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:400]}
            print(f"{name:18s} FAILED {r['error']}", flush=True)
            gc.collect()
        else:
            print(f"{name:18s} {r['tokens_per_s']:8,d} {r['step_ms']:7.1f} {r['forward_ms']:6.1f} {r['backward_ms']:6.1f} "
                  f"{r['optimizer_ms']:6.1f} {r['step_kernels']['kernels']:5d} {r['step_kernels']['gpu_ms']:7.1f} "
                  f"{sum(r['step_syncs'].values()):5d} {r['peak_gib']:5.1f}  {r['last_grad_norm']}, {r['warmup_losses']}",
                  flush=True)
            print(f"{'':18s} syncs {r['step_syncs']}; top kernels {r['step_kernels']['top']}", flush=True)
            print(f"{'':18s} forward+backward GPU ms by kind {r['fwd_bwd_gpu_ms']}; left {r.get('left_gib')} GiB", flush=True)
        results.append(r)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "gpu": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
