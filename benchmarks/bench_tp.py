"""TP benchmark: the script at every tp x dp of the GPUs at hand, at a fixed global batch, with DeepSpeed's TP
accelerations off and on, side by side (per-GPU tokens/s, MFU, step time, peak GPU memory).

Each configuration is one launch of autotp_custom_patterns.py (torchrun, one process per GPU) on a built-in
Pythia shape with random weights and the embedded text, so it needs no network; its numbers are the
script's own (results.json: the logged windows after the first, which holds the compilation). Variants:

  none        --no-vocab_parallel                     (AutoTP as specified, whole output head on every rank)
  vocab       --vocab_parallel                        (the script's default at tp > 1)
  overlap     --vocab_parallel --tp_overlap_comm
  deepcompile --deepcompile                           (DeepCompile's autotp pass instead of per-block compile;
                                                       the script refuses it on GPUs, so not in the default list)

At tp=1 the accelerations do not apply: one run, "n/a". With --max_micro_batch the sweep instead looks, for
each tp and variant, for the largest micro-batch (of --micro_batches) that fits, stopping at the first that
fails. Runs unchanged on 1, 2, 4 or 8 GPUs:

  python benchmarks/bench_tp.py --shape pythia-1.4b --global_batch 8 --out results/bench_tp.json
  python benchmarks/bench_tp.py --shape pythia-6.9b --global_batch 16 --tp 4 --variants none,overlap
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"none": ["--no-vocab_parallel"], "vocab": ["--vocab_parallel"],
            "overlap": ["--vocab_parallel", "--tp_overlap_comm"], "deepcompile": ["--deepcompile"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="pythia-1.4b", help="built-in shape (autotp_custom_patterns.BUILTIN_SHAPES)")
    p.add_argument("--gpus", type=int, default=None, help="processes (default: every visible GPU)")
    p.add_argument("--tp", default=None, help="comma-separated tp sizes (default: every divisor of --gpus)")
    p.add_argument("--variants", default="none,vocab,overlap",
                   help=f"of {', '.join(VARIANTS)} (deepcompile: the script refuses it on GPUs)")
    p.add_argument("--global_batch", type=int, default=8, help="sequences per optimizer step, fixed across the sweep")
    p.add_argument("--seq_length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=5, help="steps of the first (untimed) window")
    p.add_argument("--max_micro_batch", action="store_true", help="find the largest micro-batch that fits instead")
    p.add_argument("--micro_batches", default="1,2,4,8,12,16,24,32", help="tried in order with --max_micro_batch")
    p.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    p.add_argument("--out", default="bench_tp.json", help="JSON written here; each run's files beside it")
    p.add_argument("--script_args", nargs=argparse.REMAINDER, default=[], help="more arguments for every run")
    return p.parse_args(argv)


def launch(args, gpus, tp, micro_batch, variant, out_dir):
    """One run of the script; its throughput summary and peak memory, or None with the error's last line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           str(ROOT / "autotp_custom_patterns.py"), "--model_name", "builtin:" + args.shape, "--tp_size", str(tp),
           "--dp_size", str(gpus // tp), "--batch_size", str(micro_batch), "--seq_length", str(args.seq_length),
           "--num_steps", str(args.warmup + args.steps), "--log_interval", str(args.warmup), "--eval_interval", "0",
           "--skip_export", "--output_dir", str(out_dir), *(VARIANTS[variant] if tp > 1 else []), *args.script_args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s", "command": " ".join(cmd[3:])}
    (out_dir / "launch.log").parent.mkdir(parents=True, exist_ok=True)
    (out_dir / "launch.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "Error" in l or l.startswith("error:")]
        return {"error": (lines or ["exit code %d" % proc.returncode])[-1][-300:], "command": " ".join(cmd[3:])}
    results = json.loads((out_dir / "results.json").read_text())
    summary = results["throughput"]
    return {"tokens_per_s_per_gpu": summary["tokens_per_s"] / gpus, "mfu": summary["mfu"],
            "step_time_s": summary["step_time_s"], "peak_memory_gib": summary["peak_memory_gib"],
            "micro_batch": micro_batch, "command": " ".join(cmd[3:])}


def main():
    args = parse_args()
    import torch
    gpus = args.gpus or torch.cuda.device_count()
    if gpus < 1:
        sys.exit("error: no GPU visible; pass --gpus N to run N processes anyway")
    tps = [int(t) for t in args.tp.split(",")] if args.tp else [t for t in range(1, gpus + 1) if gpus % t == 0]
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown or any(gpus % tp for tp in tps):
        sys.exit(f"error: unknown variants {sorted(unknown)}" if unknown else f"error: every tp must divide {gpus}")
    out = Path(args.out)
    rows = []
    for tp in tps:
        dp = gpus // tp
        for variant in variants if tp > 1 else ["n/a"]:
            tag = f"tp{tp}_dp{dp}_{variant.replace('/', '')}"
            if args.max_micro_batch:
                best = None
                for micro in (int(m) for m in args.micro_batches.split(",")):
                    result = launch(args, gpus, tp, micro, variant, out.with_suffix("") / f"{tag}_mb{micro}")
                    if "error" in result:
                        break
                    best = result
                row = best or result
            else:
                if args.global_batch % dp:
                    continue  # this dp cannot split the global batch into whole micro-batches
                row = launch(args, gpus, tp, args.global_batch // dp, variant, out.with_suffix("") / tag)
            rows.append({"tp": tp, "dp": dp, "variant": variant, **row})
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    meta = {"gpus": gpus, "gpu": name, "shape": args.shape, "seq_length": args.seq_length,
            "global_batch": None if args.max_micro_batch else args.global_batch, "timed_steps": args.steps,
            "max_micro_batch": args.max_micro_batch, "versions": {"torch": torch.__version__}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    print(f"\n{gpus} x {name}, {args.shape}, seq {args.seq_length}, "
          + ("largest micro-batch that fits" if args.max_micro_batch else f"global batch {args.global_batch}"))
    print(f"{'tp x dp':8s} {'variant':12s} {'micro':>5s} {'tok/s/GPU':>10s} {'MFU':>6s} {'step ms':>8s} {'peak GiB':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['tp']} x {r['dp']:<4d} {r['variant']:12s} failed: {r['error']}")
        else:
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"{r['tp']} x {r['dp']:<4d} {r['variant']:12s} {r['micro_batch']:5d} {r['tokens_per_s_per_gpu']:10,.0f} "
                  f"{mfu:>6s} {1000 * r['step_time_s']:8.0f} {r['peak_memory_gib']:9.1f}")


if __name__ == "__main__":
    main()
