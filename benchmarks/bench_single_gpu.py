"""Single-GPU benchmark: the example script against two baselines on the same model, batch and length.

  plain           a plain PyTorch loop: fp32 weights on the GPU, autocast bf16, fused AdamW
  plain_compiled  the same loop as a performance-minded user writes it: each GPT-NeoX block and the loss
                  through torch.compile (as the script does), gradient clipping at 1.0
                  (plain_compiled_noclip: the same without clipping, to show what clipping costs)
  naive_ds        a naive DeepSpeed ZeRO-2 loop: bf16 model, torch AdamW (default implementation), no tuning
  script          autotp_custom_patterns.py itself (tp=1, dp=1, AutoTP configured), with its defaults plus any
                  extra arguments given after --script_args; --variant NAME="ARGS" adds a run script:NAME with
                  ARGS as well (repeatable)

Each runs in its own process on random-init built-in Pythia shapes and random tokens (script: the embedded
text). Warm-up steps are excluded; the GPU is synchronised before each clock read. MFU uses the script's
formula: (6 N_non-embedding + 12 L H S) tokens/s / peak.

  python benchmarks/bench_single_gpu.py --shape pythia-1.4b --batch_size 4 --seq_length 2048 \
      --out results/bench.json [--script_args --no-compile]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="pythia-1.4b", help="built-in shape (autotp_custom_patterns.BUILTIN_SHAPES)")
    p.add_argument("--batch_size", type=int, default=4, help="micro-batch (sequences)")
    p.add_argument("--seq_length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--runs", default="plain,naive_ds,script", help="which of plain, plain_compiled, naive_ds, script")
    p.add_argument("--variant", action="append", default=[], help='NAME="ARGS": one more script run with ARGS')
    p.add_argument("--out", default="bench.json", help="JSON table written here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one baseline
    p.add_argument("--script_args", nargs=argparse.REMAINDER, default=[],
                   help="extra arguments for the script run (everything after this flag)")
    return p.parse_args(argv)


def flops_per_token(model, seq_length):
    import autotp_custom_patterns as S
    return S.model_statistics(model, seq_length)["flops_per_token"]


def baseline(args):
    """One baseline loop in this process; returns its measurements."""
    import torch
    import autotp_custom_patterns as S
    from transformers import AutoModelForCausalLM
    config = S.load_config(S.parse_args(["--model_name", "builtin:" + args.shape]))
    torch.manual_seed(0)
    device = torch.device("cuda")
    tokens = torch.randint(0, config.vocab_size, (args.warmup + args.steps, args.batch_size, args.seq_length))
    if args.worker.startswith("plain"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
        model.config.use_cache = False  # as the script and the expert loop (../shared/bench/plain_compiled.py) do
        groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.01},
                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
        compiled, clip = args.worker.startswith("plain_compiled"), args.worker == "plain_compiled"
        if compiled:
            S.compile_blocks(model)

        def step(ids):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        import deepspeed
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        deepspeed.init_distributed()
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        ds_config = {"train_micro_batch_size_per_gpu": args.batch_size, "zero_optimization": {"stage": 2},
                     "bf16": {"enabled": True}}
        model, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                              optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4))

        def step(ids):
            loss = model(input_ids=ids, labels=ids).loss
            model.backward(loss)
            model.step()
    for i, ids in enumerate(tokens):
        if i == args.warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        step(ids.to(device, non_blocking=True))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": args.steps * args.batch_size * args.seq_length / elapsed,
            "step_time_s": elapsed / args.steps, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "flops_per_token": flops_per_token(model.module if hasattr(model, "module") else model,
                                               args.seq_length)}


def run_script(args, out_dir, extra=()):
    steps = args.warmup + args.steps
    cmd = [sys.executable, str(ROOT / "autotp_custom_patterns.py"), "--model_name", "builtin:" + args.shape,
           "--batch_size", str(args.batch_size), "--seq_length", str(args.seq_length), "--num_steps", str(steps),
           "--log_interval", str(args.warmup), "--eval_interval", "0", "--skip_export", "--output_dir", str(out_dir),
           *args.script_args, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
    results = json.loads((out_dir / "results.json").read_text())
    # the first window (the warm-up) is left out; the others are averaged, weighted by their steps
    timed = [r for r in results["train"] if r["step"] > args.warmup]
    n = sum(r["step"] - p["step"] for p, r in zip(results["train"], results["train"][1:]) if r["step"] > args.warmup)
    elapsed = sum((r["step"] - p["step"]) * r["step_time_s"] for p, r in zip(results["train"], results["train"][1:])
                  if r["step"] > args.warmup)
    # one optimizer step: --gradient_accumulation_steps micro-batches when given in --script_args
    tokens_per_step = args.batch_size * args.seq_length * results["args"]["gradient_accumulation_steps"]
    return {"tokens_per_s": n * tokens_per_step / elapsed, "step_time_s": elapsed / n,
            "peak_memory_gib": max(r["peak_memory_gib"] for r in results["train"]),
            "flops_per_token": results["model"]["flops_per_token"], "windows": len(timed),
            "command": " ".join(cmd[1:])}


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(baseline(args)))
        return
    import torch
    import autotp_custom_patterns as S
    name = torch.cuda.get_device_name(0)
    peak = next(tf * 1e12 for key, tf in S.PEAK_TFLOPS.items() if key in name)
    table = {}
    variants = dict(v.split("=", 1) for v in args.variant)
    for run in args.runs.split(",") + [f"script:{name}" for name in variants]:
        if run.startswith("script"):
            variant = run.partition(":")[2]
            table[run] = run_script(args, Path(args.out).with_suffix("") / run.replace(":", "_"),
                                    variants[variant].split() if variant else ())
        else:
            cmd = [sys.executable, __file__, "--worker", run, "--shape", args.shape, "--batch_size", str(args.batch_size),
                   "--seq_length", str(args.seq_length), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-4000:])
            table[run] = json.loads(proc.stdout.strip().splitlines()[-1])
        table[run]["mfu"] = table[run]["flops_per_token"] * table[run]["tokens_per_s"] / peak
        print(run, json.dumps(table[run]), flush=True)
    for run in table:
        for other in ("plain", "plain_compiled", "naive_ds"):
            if other in table and other != run:
                table[run][f"speed_vs_{other}"] = table[run]["tokens_per_s"] / table[other]["tokens_per_s"]
    meta = {"gpu": name, "peak_tflops": peak / 1e12, "shape": args.shape, "batch_size": args.batch_size,
            "seq_length": args.seq_length, "timed_steps": args.steps, "warmup_steps": args.warmup,
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": table}, indent=2))
    print(f"\n{name}, {args.shape}, micro-batch {args.batch_size} x {args.seq_length} tokens, {args.steps} timed steps")
    print(f"{'run':22s} {'tokens/s':>10s} {'MFU':>6s} {'step ms':>8s} {'peak GiB':>9s} {'vs plain':>9s} "
          f"{'vs compiled':>12s} {'vs naive DS':>12s}")
    def ratio(run, other, width):  # 1.00 against itself, a dash when that baseline did not run
        value = 1.0 if run == other else table[run].get(f"speed_vs_{other}")
        return f"{'-':>{width}s}" if value is None else f"{value:{width}.2f}"

    for run, r in table.items():
        print(f"{run:22s} {r['tokens_per_s']:10,.0f} {100 * r['mfu']:5.1f}% {1000 * r['step_time_s']:8.0f} "
              f"{r['peak_memory_gib']:9.1f} {ratio(run, 'plain', 9)} {ratio(run, 'plain_compiled', 12)} "
              f"{ratio(run, 'naive_ds', 12)}")


if __name__ == "__main__":
    main()
