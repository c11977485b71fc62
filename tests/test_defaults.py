"""Defaults never refuse a working layout, and --dry_run advises the layout (CPU).

  * launched: a GPT-NeoX with 6 heads and a 1,024-token vocabulary trains at --tp_size 3 with the output head
    whole (the vocabulary-parallel head is off, with one line saying why), while an explicit --vocab_parallel is
    still refused; on 4 ranks with neither --tp_size nor --dp_size it takes tp 2 x dp 2 (6 heads do not split
    4 ways) instead of refusing; and the head stays whole where tp does not divide a 1,025-token vocabulary;
  * the vocabulary-parallel default is off for a tied head and for DeepCompile, --deepcompile is refused on
    GPUs, and data too small for a micro-batch sized to the GPU names the --batch_size that fits;
  * --dry_run --world_size lists every tp x dp with its memory per rank (as asked, with ZeRO-3, with the
    optimizer offloaded) and marks the smallest tp that fits; a GPU run that cannot fit is refused before any
    weight loads, naming what would; the estimate is checked against every peak measured on H200s (ZeRO-1, 2,
    3, the optimizer offloaded; results/h200 and results/h200x2/startup).

Run: python -m pytest tests/test_defaults.py -q
"""
import argparse
import dataclasses
import json

import pytest
import torch
from transformers import LlamaConfig

import autotp_custom_patterns as S
from conftest import ROOT, run_script, error_line, neox, preflight, save_checkpoint

SHORT = ["--seq_length", "32", "--num_steps", "2", "--log_interval", "1", "--eval_interval", "0", "--skip_export"]


@pytest.mark.parametrize("nproc,vocab,argv,printed,layout", [
    (3, 1024, ["--tp_size", "3", "--partition_config", "tp_plan"],  # its tp_plan splits the head: kept whole
     "(--vocab_parallel is off): tp 3 does not divide the 1024-token vocabulary", (3, 1)),
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
    model, source = S.meta_model(tied), S.SpecSource("a preset", {}, S.AutoTPPresets.get_preset("llama"))
    assert "shares its weight" in S.vocab_parallel_refusal(S.parse_args([]), tied, model, source, 2)
    assert "DeepCompile" in S.vocab_parallel_refusal(S.parse_args(["--deepcompile"]), tied, model, source, 2)
    assert preflight("--tp_size", "2", world=2).args.vocab_parallel is True


def test_deepcompile_is_refused_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(S.UsageError, match="--deepcompile is refused on GPUs"):
        S.check_tp_features(S.parse_args(["--deepcompile", "--no-vocab_parallel"]), S.resolve_layout(0, 2, tp=2))


def test_data_too_small_for_one_global_batch_names_what_fits():
    run = preflight("--batch_size", "16", "--tp_size", "2", world=8)
    blocks = {"train": range(10), "validation": range(1)}
    with pytest.raises(S.UsageError, match="10 training blocks of 512 tokens cannot fill one global batch of 64: "
                                           "lower --seq_length/--batch_size or add data"):
        S.check_data(run, range(100), blocks)
    sized = dataclasses.replace(run, args=argparse.Namespace(**vars(run.args) | {"micro_batch_sized": True}))
    with pytest.raises(S.UsageError, match="pass --batch_size 2 .the default was sized to the GPU's memory"):
        S.check_data(sized, range(100), blocks)


def test_a_gpu_run_that_cannot_fit_is_refused_before_loading_naming_what_would(monkeypatch):
    """The 6.9B shape on one 141 GiB GPU, counted by hand: 18 bytes per parameter of model states (bf16 weights,
    fp32 gradient partition, fp32 masters and two moments) and one 2048-token sequence of activations (34 bytes
    per token, layer and hidden unit in the blocks, 8 per token and vocabulary entry for the logits) exceed 85%
    of it. The run is refused before any weight loads, naming what fits: the optimizer offloaded, activation
    checkpointing, or a second GPU; the first of them then passes. (On one H200 the run said the same:
    results/h200/memory_per_zero_stage.json.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as preflight asks
    monkeypatch.setattr(S, "get_accelerator", lambda: argparse.Namespace(device_name=lambda: "cuda"))
    layers, hidden, _, vocab = S.BUILTIN_SHAPES["pythia-6.9b"]
    states = (12 * layers * hidden ** 2 + 2 * vocab * hidden) * 18 / 2 ** 30  # 114.9 GiB
    activations = 2048 * (layers * hidden * 34 + 8 * vocab) / 2 ** 30  # 9.3 GiB per sequence
    with pytest.raises(S.UsageError) as refused:
        S.preflight(["--model_name", "builtin:pythia-6.9b", "--gpu_memory_gib", "141"])
    message = str(refused.value)
    assert message.startswith(f"{states:.1f} GiB of model states and 1 x {activations:.1f} GiB of activations need "
                              f"{states + activations:.1f} GiB per GPU at tp 1 x dp 1 (estimate), more than the 120 "
                              "GiB usable of 141: what fits: tp 1 x dp 1 --offload_optimizer ("), message
    assert "with --activation_checkpointing" in message and "; 2 GPUs at tp 1 x dp 2 (" in message, message
    offloaded = S.preflight(["--model_name", "builtin:pythia-6.9b", "--gpu_memory_gib", "141", "--offload_optimizer"])
    assert offloaded.ds_config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert offloaded.args.batch_size >= 8  # the weights, their gradients and 8 sequences fit: sized to it


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


def measured_peaks():
    """(the run's settings, its measured peak) of the GPU runs recorded in results/: one H200, the 1.4B shape at
    ZeRO-1, 2 and 3 and with the optimizer offloaded, the 6.9B shape offloaded; two H200s, the 6.9B shape at tp 2
    and at tp 1 x dp 2 (compiled, ZeRO-2, its head split at tp 2)."""
    runs = json.loads((ROOT / "results" / "h200" / "memory_per_zero_stage.json").read_text())["runs"]
    peaks = [(r["args"], r["peak_memory_gib"]) for r in runs]
    startup = json.loads((ROOT / "results" / "h200x2" / "startup" / "startup_random.json").read_text())
    base = vars(S.parse_args(["--model_name", "builtin:pythia-6.9b", "--seq_length", "2048"]))
    for name, tp, dp in (("tp2", 2, 1), ("tp1_dp2", 1, 2)):
        settings = {"tp_size": tp, "dp_size": dp, "zero_stage": 2, "compile": True, "vocab_parallel": tp > 1,
                    "batch_size": startup[name]["batch_size"]}
        peaks.append((base | settings, startup[name]["throughput"]["peak_memory_gib"]))
    return peaks


@pytest.mark.parametrize("settings,peak", measured_peaks())
def test_the_memory_estimate_covers_the_measured_peaks(settings, peak):
    """The estimate must not fall short (a layout it calls fitting must fit) and stays within 25% above."""
    args = argparse.Namespace(**{"offload_optimizer": False, "activation_checkpointing": False} | settings)
    states, per_sequence = S.estimated_memory_gib(args, S.load_config(args), args.tp_size, args.dp_size,
                                                  args.vocab_parallel)
    estimate = states + args.batch_size * per_sequence
    assert peak <= estimate <= 1.25 * peak, (estimate, peak)
