"""The real script, end to end, on CPU: launched with torchrun and with the deepspeed launcher, judged
on the results.json it writes; and each bad input ending in a one-line error, exit code 2, no hang.

Run: python -m pytest tests/test_script.py -q   (about a minute and a half on 2 cores)
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SCRIPT, TOL, run_script, error_line, assert_learned



def test_trains_tp2_dp2_on_the_embedded_corpus(tmp_path, cache):
    proc, results = run_script(4, tmp_path, cache, "--tp_size", "2", "--dp_size", "2", "--precision", "fp32",
                               "--seq_length", "128", "--num_steps", "30", "--learning_rate", "3e-3",
                               "--log_interval", "5", "--eval_interval", "15", "--verify_tp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results["verify_tp"]["worst_relative_diff"] < 1e-4 and results["verify_tp"]["modules_compared"] > 10
    losses = [r["loss"] for r in results["train"]]
    assert [r["step"] for r in results["train"]] == [5, 10, 15, 20, 25, 30]
    assert all(math.isfinite(x) for x in losses), losses
    assert_learned(results)
    assert set(results["train"][0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
    assert [e["step"] for e in results["eval"]] == [15, 30]
    assert math.isclose(results["eval"][-1]["perplexity"], math.exp(results["eval"][-1]["loss"]), rel_tol=1e-9)
    assert {k: results["layout"][k] for k in ("world_size", "tp", "dp")} == {"world_size": 4, "tp": 2, "dp": 2}
    assert results["args"]["zero_stage"] == 2 and results["throughput"]["tokens_per_s"] > 0
    assert "AutoTP partition (tp=2)" in proc.stdout and "TP groups [[0, 1], [2, 3]]" in proc.stdout


def test_deepspeed_launcher_with_text_files_and_eval_only(tmp_path, cache):
    """The launch form of the docs (deepspeed --num_gpus N, which passes --local_rank), on files."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    paragraphs = [" ".join(words[(i + j) % len(words)] for j in range(40)) for i in range(200)]
    (tmp_path / "train.txt").write_text("\n\n".join(paragraphs))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:20]))
    common = ["--train_file", tmp_path / "train.txt", "--validation_file", tmp_path / "val.jsonl",
              "--cache_dir", cache, "--tp_size", "2", "--seq_length", "64", "--output_dir", tmp_path / "out"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = Path(sys.executable).with_name("deepspeed")
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", "29611", SCRIPT, *map(str, common),
                           "--num_steps", "10", "--learning_rate", "3e-3", "--eval_interval", "5"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trained = json.loads((tmp_path / "out" / "results.json").read_text())
    assert_learned(trained)
    assert trained["layout"]["tp"] == 2 and trained["layout"]["dp"] == 1

    # evaluation only, three blocks a pass, with a DeepSpeed config whose ZeRO stage is for training
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    proc, evaluated = run_script(2, tmp_path / "eval", cache, *common[:-2], "--num_steps", "0", "--batch_size", "3",
                                 "--deepspeed_config", tmp_path / "ds.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert evaluated["train"] == [] and len(evaluated["eval"]) == 1 and evaluated["eval"][0]["step"] == 0
    assert math.isfinite(evaluated["eval"][0]["loss"]) and evaluated["deepspeed_config"]["zero_optimization"]["stage"] == 0
    assert evaluated["eval"][0]["blocks"] == trained["eval"][-1]["blocks"]  # each held-out block once, as at batch 1


def test_compiled_blocks_train_as_the_eager_model_does(tmp_path, cache):
    """--compile (each block and the loss through torch.compile, tp=2, AutoTP's collectives inside the
    blocks) against the same run uncompiled: in fp32 every logged loss and gradient norm agrees."""
    common = ("--tp_size", "2", "--dp_size", "1", "--precision", "fp32", "--seq_length", "128", "--num_steps", "6",
              "--log_interval", "1", "--eval_interval", "6", "--skip_export")
    runs = [run_script(2, tmp_path / name, cache, *common, *extra) for name, extra in (("eager", ()),
                                                                                      ("compiled", ("--compile",)))]
    for proc, _ in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    (_, eager), (_, compiled) = runs
    assert "torch.compile: 2 GPTNeoXLayer blocks and the loss" in runs[1][0].stdout
    assert "torch.compile" not in runs[0][0].stdout
    for key in ("loss", "grad_norm"):
        want, got = [r[key] for r in eager["train"]], [r[key] for r in compiled["train"]]
        assert len(got) == 6 and got == pytest.approx(want, rel=TOL), key
    assert compiled["eval"][-1]["loss"] == pytest.approx(eager["eval"][-1]["loss"], rel=TOL)


@pytest.mark.parametrize("nproc,args,message", [
    (2, ["--tp_size", "2", "--dp_size", "2"], "--tp_size x --dp_size must equal the number of processes (2)"),
    (3, ["--tp_size", "3"], "--tp_size 3 must divide the 4 attention heads"),
    # (each other check of the arguments and the model is a unit test in tests/test_units.py: the same code path)
    # a typo, or a hub id with no network: the hub answers or is unreachable, the line says which
    (2, ["--model_name", "EleutherAI/pythia-70mm"], "--model_name EleutherAI/pythia-70mm is not a local directory "
                                                    "and the Hugging Face hub"),
])
def test_bad_input_fails_fast_on_every_rank(tmp_path, cache, nproc, args, message):
    proc, _ = run_script(nproc, tmp_path, cache, *args)
    assert message in error_line(proc)
    assert "deepspeed.initialize" not in proc.stdout and "AutoTP partition" not in proc.stdout


def test_mlp_width_not_divisible_by_tp(tmp_path, cache):
    from transformers import GPTNeoXConfig
    GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=99,
                  vocab_size=512).save_pretrained(tmp_path / "odd")
    # asked for: refused (given no sizes, tp would fall back to 1: tests/test_defaults.py)
    proc, _ = run_script(2, tmp_path, cache, "--model_name", tmp_path / "odd", "--random_init", "--tp_size", "2")
    assert "--tp_size 2 must divide the MLP width 99" in error_line(proc)


def test_data_problems_found_after_tokenizing_stop_every_rank(tmp_path, cache):
    (tmp_path / "tiny.txt").write_text("far too little text\n\nfor one batch\n\nof 256 tokens")
    proc, _ = run_script(2, tmp_path, cache, "--train_file", tmp_path / "tiny.txt", "--seq_length", "256")
    assert "cannot fill one global batch" in error_line(proc)
    (tmp_path / "one.txt").write_text("a single paragraph")
    proc, _ = run_script(2, tmp_path, cache, "--train_file", tmp_path / "one.txt")
    assert "too few to hold some out" in error_line(proc)
    (tmp_path / "val.jsonl").write_text('{"body": "no text column here"}\n')
    proc, _ = run_script(2, tmp_path, cache, "--validation_file", tmp_path / "val.jsonl")
    assert "has no column 'text'" in error_line(proc)


@pytest.mark.parametrize("precision,expected", [
    ("bf16", ["True", "1.0", "False"]),  # finite loss, step 1 marked, the NaN reached the weights
    # DeepSpeed skipped the step (loss-scale overflow): not a divergence. DeepSpeed's CPU accelerator has no fp16.
    pytest.param("fp16", ["True", "inf", "True"], marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="fp16 training needs a GPU")),
])
def test_a_nan_gradient_with_a_finite_loss_is_caught_at_its_step(precision, expected):
    """The bf16 default turns DeepSpeed's own overflow check off (it costs a host sync every step). Then a NaN gradient does reach the weights, and the gradient norm DeepSpeed reports is what
    shows it in the same step: train() stops there, before any checkpoint. fp16 keeps DeepSpeed's check,
    which skips such a step and lowers the loss scale; training goes on."""
    proc = subprocess.run([sys.executable, ROOT / "tests" / "nan_gradient_worker.py", precision], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MASTER_PORT": "29517"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == expected
