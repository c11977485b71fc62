"""The sharded model computes the unsharded model: CPU, fp32, tiny GPT-NeoX, gloo, through torchrun.

For each (tp, dp) layout and each of DeepSpeed's TP accelerations that the script offers (the vocab-parallel
head and loss, the overlapped backward all-reduce, DeepCompile's autotp pass, and their combinations, with
ZeRO-0/1/2/3, gradient accumulation and activation checkpointing), tests/parity_worker.py shards the model
the script's way (an empty model through build_engine, then each rank's pieces written by fill_weights) and
compares it with the same model unsharded, trained with plain PyTorch on the union of the DP ranks' batches:
  * step-0 logits within 1e-5 (gathered from the TP ranks where the head is split by vocabulary);
  * the loss of 10 steps within 1e-5, with AdamW (clipping active) and with SGD (no clipping: Adam
    would hide a gradient-scale error), and DeepSpeed's global gradient norm against a float64 one;
  * at the end, replicated weights bit-identical across TP ranks and all weights near the reference;
  * rank r of a TP group holds exactly the fused-QKV rows of heads r*H/tp .. (r+1)*H/tp-1;
  * the upstream `shape` spec for the fused QKV fails the step-0 check (the test has teeth).

Run: python -m pytest tests/test_parity.py -q   (about two minutes on 2 cores)
"""
import json

import pytest
from conftest import ROOT, torchrun, check_parity


# (tp, dp, accumulation, ZeRO stage, variants: the script's flags for each parity run of the launch)
LAYOUTS = [
    (2, 1, 1, 2, ["--no-vocab_parallel", "--vocab_parallel", "--vocab_parallel --tp_overlap_comm",
                  "--vocab_parallel --zero_stage 0", "--deepcompile"]),
    (2, 2, 2, 2, ["--no-vocab_parallel", "--vocab_parallel --tp_overlap_comm --activation_checkpointing",
                  "--zero_stage 3 --no-vocab_parallel",
                  "--zero_stage 3 --vocab_parallel --tp_overlap_comm --activation_checkpointing"]),
    (4, 1, 1, 1, ["--no-vocab_parallel", "--vocab_parallel --tp_overlap_comm", "--zero_stage 3 --vocab_parallel"]),
    (1, 4, 1, 3, [""]),
]


@pytest.mark.parametrize("tp,dp,accumulation,zero,variants", LAYOUTS)
def test_sharded_model_matches_unsharded(tmp_path, tp, dp, accumulation, zero, variants):
    out = tmp_path / "parity.json"
    proc = torchrun(tp * dp, ROOT / "tests" / "parity_worker.py", out, "--tp_size", tp, "--dp_size", dp,
                    "--gradient_accumulation_steps", accumulation, "--zero_stage", zero, "--variants", ";".join(variants))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())

    check_parity(results)
    assert list(results["variants"]) == variants

    heads = 4  # builtin:tiny
    for rank, held in enumerate(results["variants"][variants[0]]["adamw"]["qkv_rows_held_by_rank"]):
        tp_rank, per_rank = rank % tp, heads // tp
        assert sorted(map(tuple, held)) == [(h, role) for h in range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
                                            for role in range(3)], f"rank {rank} holds {held}"


