"""Helpers and fixtures shared by the test modules: launching the script or a worker under torchrun, reading
its one error line, the parity verdict, small models and checkpoints. Test modules import the helpers
(`from conftest import ...`); pytest finds the fixtures itself."""
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPTNeoXConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "autotp_custom_patterns.py"
CONFIGS = ROOT / "partition_configs"
TOL = 1e-5  # the same computation summed in another order (sharded, another tp x dp, compiled): logits, losses, norms
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=False)


def preflight(*argv, world=1):
    """The script's preflight on argv for a world of `world` ranks, laid out by --dry_run: its Run, with no
    process group."""
    import autotp_custom_patterns as S
    return S.preflight([*map(str, argv), "--dry_run", "--world_size", str(world)])


def torchrun(nproc, script, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_script(nproc, out, cache, *args):
    proc = torchrun(nproc, SCRIPT, "--output_dir", out, "--cache_dir", cache, *args)
    return proc, (json.loads((Path(out) / "results.json").read_text()) if proc.returncode == 0 else None)


def error_line(proc):
    """The one `error:` line of a failed run (rank 0's), and no traceback through the script on any rank
    (torchrun prints one of its own when a worker exits non-zero)."""
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert f'{SCRIPT.name}", line' not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def assert_learned(results, vocab_size=8192):
    """It trains: the held-out loss ends more than one nat below ln(vocab), the loss of a model that has
    learned nothing (a uniform guess, where every random init starts), and below its first evaluation.
    Unlike single-step training losses, evaluations are free of batch-to-batch noise."""
    evals = [e["loss"] for e in results["eval"]]
    assert len(evals) >= 2 and evals[-1] < math.log(vocab_size) - 1.0 and evals[-1] < evals[0], evals


def check_parity(results):
    """The sharded run against the unsharded reference, for each variant and optimizer, and the wrong specs
    failing."""
    optimizers = (("adamw", 1e-4), ("sgd", TOL))
    for (variant, runs), (name, weight_tol) in itertools.product(results["variants"].items(), optimizers):
        r = runs[name]
        name = f"{variant or 'as given'}, {name}"
        vocab, hidden = r["reference_head_shape"]
        assert r["head_shape"] == [vocab // r["tp"] if runs["vocab_parallel"] else vocab, hidden], (name, r["head_shape"])
        assert r["step0_logits_max_diff"] < TOL, f"{name}: step-0 logits differ by {r['step0_logits_max_diff']}"
        loss_diffs = [abs(a - b) for a, b in zip(r["losses"], r["reference_losses"])]
        assert len(loss_diffs) >= 10 and max(loss_diffs) < TOL, f"{name}: loss differences {loss_diffs}"
        assert r["losses"][-1] < r["losses"][0] - 0.5, f"{name}: the loss did not fall: {r['losses']}"
        if "--zero_stage 0" in variant:  # without ZeRO, DeepSpeed reports no global gradient norm
            assert r["grad_norms"] == [None] * len(r["grad_norms"]), name
        else:
            norm_errors = [abs(a - b) / b for a, b in zip(r["grad_norms"], r["reference_grad_norms"])]
            assert max(norm_errors) < TOL, f"{name}: relative grad-norm errors {norm_errors}"
        assert r["replicated_identical"], f"{name}: replicated weights differ across TP ranks"
        # AdamW divides by sqrt(v): near-zero gradients amplify fp32 rounding in the weights it moves.
        assert r["final_weights_max_diff"] < weight_tol, f"{name}: weights off by {r['final_weights_max_diff']}"
    wrong = results["wrong_specs"]
    if wrong["tp"] > 1:  # (at tp 1 nothing is split, so no spec can be wrong)
        assert wrong["step0_logits_max_diff"] > 1e-2, f"the wrong specs should break parity, but logits differ by only {wrong}"


def neox(heads, hidden):
    return GPTNeoXConfig(num_hidden_layers=2, hidden_size=hidden, num_attention_heads=heads,
                         intermediate_size=4 * hidden, vocab_size=1024, tie_word_embeddings=False)


def save_checkpoint(path, config):
    """A random fp32 model in safetensors, with a tokenizer (any will do: these tests are about the weights)."""
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    vocab = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()  # a token per word
    transformers.PreTrainedTokenizerFast(tokenizer_object=vocab, eos_token="<|endoftext|>").save_pretrained(path)
    return path


def tiny_phi3_specs(with_shape=True):
    """partition_configs/phi3_mini.json with the tiny model's sizes: q 4 heads x 16, k and v 2 x 16, MLP 128."""
    specs = json.loads((CONFIGS / "phi3_mini.json").read_text())
    specs["layer_specs"][0]["shape"] = [[64, 32, 32], -1]
    specs["layer_specs"][2]["shape"] = [[128, 128], -1]
    if not with_shape:
        for spec in specs["layer_specs"]:
            spec.pop("shape", None), spec.pop("partition_dim", None)
    return specs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One tokenizer/dataset cache per module: later launches reuse what the first one built."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["HF_DATASETS_CACHE"] = str(path / "datasets")
    return path
