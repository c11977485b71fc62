"""Defaults never refuse a working layout, and --dry_run advises the layout (CPU).

  * launched: a GPT-NeoX with 6 heads and a 1,024-token vocabulary trains at --tp_size 3 with the output head
    whole (the vocabulary-parallel head is off, with one line saying why), while an explicit --vocab_parallel is
    still refused; on 4 ranks with neither --tp_size nor --dp_size it takes tp 2 x dp 2 (6 heads do not split
    4 ways) instead of refusing; and the head stays whole where tp does not divide a 1,025-token vocabulary;
  * the vocabulary-parallel default is off for a tied head and for DeepCompile, --deepcompile is refused on
    GPUs, a micro-batch sized to the GPU shrinks to the data it is given;
  * --dry_run --world_size lists every tp x dp with its memory per rank and marks the smallest tp that fits;
    the estimate is checked against the peaks measured on 2 H200s (results/h200x2/startup).

Run: python -m pytest tests/test_defaults.py -q
"""
import json

import pytest
import torch
from transformers import LlamaConfig

import autotp_custom_patterns as S
from conftest import ROOT, run_script, error_line, neox, save_checkpoint

SHORT = ["--seq_length", "32", "--num_steps", "2", "--log_interval", "1", "--eval_interval", "0", "--skip_export"]


@pytest.mark.parametrize("nproc,vocab,argv,printed,layout", [
    (3, 1024, ["--tp_size", "3"], "(--vocab_parallel is off): tp 3 does not divide the 1024-token vocabulary", (3, 1)),
    (4, 1025, [], "tp 2 x dp 2: the model's heads and MLP width do not divide into 4 TP ranks", (2, 2)),
])
def test_a_default_that_does_not_apply_is_turned_off_not_refused(tmp_path, cache, nproc, vocab, argv, printed, layout):
    config = neox(6, 48)
    config.vocab_size = vocab
    path = save_checkpoint(tmp_path / "model", config)
    proc, results = run_script(nproc, tmp_path / "out", cache, "--model_name", path, *SHORT, *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert printed in proc.stdout and "the output head stays whole" in proc.stdout
    assert (results["layout"]["tp"], results["layout"]["dp"]) == layout and results["args"]["vocab_parallel"] is False
    if nproc == 3:  # asked for explicitly, it is still refused
        proc, _ = run_script(3, tmp_path / "asked", cache, "--model_name", path, *SHORT, *argv, "--vocab_parallel")
        assert "--vocab_parallel cannot apply: tp 3 does not divide the 1024-token vocabulary; use --no-vocab_parallel" in error_line(proc)


def test_the_vocab_parallel_default_needs_an_untied_head_and_no_deepcompile():
    tied = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True)
    model = S.meta_model(tied)
    assert "shares its weight" in S.vocab_parallel_refusal(tied, model, 2, False)
    assert "DeepCompile" in S.vocab_parallel_refusal(tied, None, 2, True)
    args = S.parse_args(["--tp_size", "2"])
    S.derive_args(args, S.resolve_layout(0, 2, tp=2), neox(4, 64))
    assert args.vocab_parallel is True


def test_deepcompile_is_refused_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(S.UsageError, match="--deepcompile is refused on GPUs: measured on 2 H200s"):
        S.check_tp_features(S.parse_args(["--deepcompile", "--no-vocab_parallel"]), S.resolve_layout(0, 2, tp=2))


def test_a_sized_micro_batch_shrinks_to_the_data():
    args = S.parse_args(["--batch_size", "16"])
    layout = S.resolve_layout(0, 8, tp=2)
    S.derive_args(args, layout)
    assert not S.fit_micro_batch_to_data(args, layout, 10)  # given with --batch_size: kept (check_data_size says)
    args.micro_batch_sized = True
    assert S.fit_micro_batch_to_data(args, layout, 10)
    assert (args.batch_size, args.global_batch_size, args.tokens_per_step) == (2, 8, 8 * args.seq_length)


def test_dry_run_lists_every_layout_and_recommends_the_smallest_tp_that_fits(capsys):
    results = S.main(["--dry_run", "--model_name", "builtin:pythia-6.9b", "--world_size", "8", "--seq_length", "2048",
                      "--batch_size", "8", "--gpu_memory_gib", "80"])
    printed = capsys.readouterr().out
    rows = {r["tp"]: r for r in results["layouts"]}
    assert sorted(rows) == [1, 2, 4, 8] and [r["recommended"] for r in results["layouts"]].count(True) == 1
    best = next(r for r in results["layouts"] if r["recommended"])
    assert best["fits"] and all(not r["fits"] for r in results["layouts"] if r["tp"] < best["tp"])
    assert rows[1]["gib_per_rank"] > rows[2]["gib_per_rank"] > rows[4]["gib_per_rank"] > rows[8]["gib_per_rank"]
    assert f"tp {best['tp']} x dp {8 // best['tp']}: " in printed and "<- recommended" in printed
    assert "does not fit" in printed  # at micro-batch 8 the 6.9B shape does not fit 80 GiB at tp 1


@pytest.mark.parametrize("run,tp,dp", [("tp2", 2, 1), ("tp1_dp2", 1, 2)])
def test_the_memory_estimate_covers_the_measured_peaks(run, tp, dp):
    """Measured on 2 H200s: the Pythia-6.9B shape, seq 2048, tp 2 at micro-batch 8 and tp 1 x dp 2 at 4. The
    estimate must not fall short (a layout it calls fitting must fit) and stays within 25% above."""
    measured = json.loads((ROOT / "results" / "h200x2" / "startup" / "startup_random.json").read_text())[run]
    args = S.parse_args(["--model_name", "builtin:pythia-6.9b", "--seq_length", "2048"])
    states, per_sequence = S.estimated_memory_gib(args, S.load_config(args), tp, dp, vocab_split=tp > 1)
    peak = measured["throughput"]["peak_memory_gib"]
    estimate = states + measured["batch_size"] * per_sequence
    assert peak <= estimate <= 1.25 * peak, (estimate, peak)
