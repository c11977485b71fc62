"""One GPU, tp 1: the script's engine (as step_bench.py builds it) with the model's own compiled loss against
Liger's fused linear cross-entropy (liger_loss.py): tok/s and peak memory at growing micro-batches, the memory
per sequence fitted from them, the largest micro-batch that fits, then a probe at that size.

  python liger_bench.py [--shapes 1.4b:10,20 410m:16,32] [--losses hf,liger] [--steps 3] [--out liger_bench.json]

Blocks compile with dynamic shapes from the start (one graph for every micro-batch), for both losses alike, so
tok/s here can differ a little from step_bench.py's static compile. A size that runs out of memory ends that
engine's series (its ZeRO state is not trusted after an OOM).
"""
import argparse
import gc
import json
import time

import torch

import step_bench as B
from liger_loss import liger_flce, torch_flce, use_fused_linear_ce


def run_sizes(args, shape, loss, sizes, cap_gib):
    bench = argparse.Namespace(shape=shape, mbs=sizes[0], seq=args.seq)
    engine, fwd, bwd, opt, state = B.build_engine(bench, B.TIMERS_OFF, None)
    if loss == "liger":  # (without a GPU, a smoke test of this file: the unfused torch stand-in)
        use_fused_linear_ce(engine.module, liger_flce if B.CUDA else torch_flce)
    V = B.SHAPES[shape][3]
    points, first_losses, fit = [], [], None

    def measure(mbs):
        ids = torch.randint(0, V, (1 + args.steps, mbs, args.seq), device=B.DEVICE,
                            generator=torch.Generator(B.DEVICE).manual_seed(1))
        if B.CUDA:
            torch.cuda.reset_peak_memory_stats()
        for x in ids[:1]:  # the first size compiles here (one dynamic graph serves the others)
            fwd(x), bwd(), opt()
            first_losses.append(round(state["loss"].item(), 4))
        step_s = B.timed_steps(fwd, bwd, opt, ids[1:])
        r = {"mbs": mbs, "tokens_per_s": round(mbs * args.seq / step_s), "step_ms": round(1000 * step_s, 1),
             "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if B.CUDA else float(mbs)}
        print(f"  {shape} {loss:5s} mbs {mbs:3d}: {r['tokens_per_s']:8,d} tok/s, {r['peak_gib']:6.2f} GiB", flush=True)
        return r

    try:
        for mbs in sizes:
            points.append(measure(mbs))
        (m0, p0), (m1, p1) = [(p["mbs"], p["peak_gib"]) for p in points[:2]]
        per_seq = (p1 - p0) / (m1 - m0)
        largest = int(m0 + (cap_gib - p0) / per_seq)
        fit = {"gib_per_sequence": round(per_seq, 3), "fixed_gib": round(p0 - per_seq * m0, 2),
               "predicted_largest_mbs": largest}
        print(f"  {shape} {loss:5s} fit: {fit}", flush=True)
        if args.probe and largest > sizes[-1]:
            points.append(measure(largest))
    except torch.OutOfMemoryError as exc:
        points.append({"mbs": "next", "error": f"OOM: {str(exc)[:160]}"})
    finally:
        engine.destroy()
        engine = fwd = bwd = opt = state = None  # (free the engine before the next one)
        gc.collect()
        if B.CUDA:
            torch.cuda.empty_cache()
    return {"shape": shape, "loss": loss, "points": points, "fit": fit, "first_losses": first_losses}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["1.4b:10,20", "410m:16,32"], help="SHAPE:MBS,MBS (two sizes at least)")
    p.add_argument("--losses", default="hf,liger")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True, help="run the predicted largest size")
    p.add_argument("--headroom_gib", type=float, default=3.0, help="kept free below the device's memory")
    p.add_argument("--out", default="liger_bench.json")
    args = p.parse_args()
    import os
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29572"))
    import deepspeed
    if not B.CUDA:
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if B.CUDA else "gloo")
    torch._dynamo.config.assume_static_by_default = False  # one dynamic graph per block for all micro-batches
    cap = torch.cuda.get_device_properties(0).total_memory / 2 ** 30 - args.headroom_gib if B.CUDA else 5.0
    results = []
    for spec in args.shapes:
        shape, sizes = spec.split(":")
        for loss in args.losses.split(","):
            start = time.perf_counter()
            try:
                r = run_sizes(args, shape, loss, [int(s) for s in sizes.split(",")], cap)
            except Exception as exc:
                r = {"shape": shape, "loss": loss, "error": f"{type(exc).__name__}: {exc}"[:500]}
                print(f"  {shape} {loss} FAILED {r['error']}", flush=True)
            r["seconds"] = round(time.perf_counter() - start, 1)
            results.append(r)
            json.dump({"args": vars(args), "cap_gib": cap, "results": results}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
