"""Adapting the example to other models: specs from a JSON file, --dry_run, --verify_tp. CPU, fp32.

  * tiny random Qwen2 (separate q/k/v with biases, gate/up, GQA) with partition_configs/llama.json, and
    tiny random Phi-3 (fused qkv_proj = [Q; K; V], gate_up_proj = [gate; up]) with `shape` specs: each
    trains at tp=2 with parity to its unsharded model (tests/parity_worker.py); a needless `shape` on
    Qwen2's q_proj, and Phi-3's specs without `shape`, break parity;
  * the script trains a tiny Llama from a spec file with --verify_tp; --verify_tp stops the run, naming the
    fused QKV layer, when given the upstream `shape` spec for GPT-NeoX (it passes with the built-in specs at
    tp=2 and tp=4 in test_script.py and test_checkpoints.py);
  * --dry_run lists every Linear weight once with its shapes; spec-file errors name what to fix.

  * the README's "Adapt it to your model" commands run as written, offline, in a fresh folder: a Qwen2 saved
    without a tokenizer (a BPE is trained for it, and the run says so), its dry run, --verify_tp and training;
  * a spec for a layer that is not a torch.nn.Linear (GPT-2's Conv1D) is refused in one line naming it, by
    --dry_run and under DeepSpeed's automatic parser alike; --help says each default once.

Run: python -m pytest tests/test_adapt.py -q   (about two minutes on 2 cores)
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

import autotp_custom_patterns as S
from conftest import (ROOT, SCRIPT, CONFIGS, SMALL, torchrun, run_script, error_line, assert_learned, check_parity,
                      preflight, tiny_phi3_specs)


def test_the_readmes_adapt_commands_run_as_written(tmp_path, cache):
    block = (ROOT / "README.md").read_text().split("<!-- commands run by tests/test_adapt.py -->\n```bash\n")[1]
    (tmp_path / SCRIPT.name).symlink_to(SCRIPT)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    proc = subprocess.run(["bash", "-ec", block.split("```")[0]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--model_name my_model holds no tokenizer: a byte-level BPE of 8192 tokens" in proc.stdout
    assert "dry run: my_model" in proc.stdout and "model.layers.1.mlp.down_proj.weight" in proc.stdout
    assert "verify_tp: sharded = unsharded" in proc.stdout
    results = json.loads((tmp_path / "output" / "results.json").read_text())
    assert (results["args"]["partition_config"], results["layout"]["tp"], results["args"]["num_steps"]) == ("tp_plan", 2, 40)
    assert results["train"][-1]["loss"] < results["train"][0]["loss"] and results["eval"][-1]["loss"] < math.log(8192) - 1


def test_a_layer_that_is_not_a_linear_is_refused_by_name(tmp_path):
    GPT2Config(n_embd=64, n_layer=2, n_head=8, vocab_size=512, n_positions=128).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "specs.json").write_text(json.dumps([{"patterns": [r".*\.attn\.c_attn\.weight$"], "partition_type": "column"}]))
    for source in (tmp_path / "specs.json", "autotp_parser"):
        with pytest.raises(S.UsageError, match=r"^transformer.h.0.attn.c_attn is a Conv1D, not a torch.nn.Linear: "
                                               r"DeepSpeed's AutoTP training layers split a Linear's .out, in. weight"):
            preflight("--model_name", tmp_path / "gpt2", "--partition_config", source, "--tp_size", "2",
                      "--seq_length", "64", world=2)


def test_help_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        S.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "Default: on where it applies" in text and "--dp_size DP_SIZE DP replicas (default: world_size / tp_size)" in text
    zero_stage = text.split("--zero_stage {0,1,2,3} ")[1].split(" --")[0]
    assert zero_stage.startswith("DeepSpeed ZeRO stage: 2 partitions") and "(default:" not in zero_stage, zero_stage


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_other_architectures_train_with_parity(tmp_path, arch):
    if arch == "qwen2":
        Qwen2Config(**SMALL).save_pretrained(tmp_path / "model")
        specs, wrong = CONFIGS / "llama.json", tmp_path / "wrong.json"
        # q_proj cut as if it held two blocks: rank 0 gets q heads 0 and 2, which GQA pairs with kv heads 0, 1
        wrong.write_text(json.dumps({"layer_specs": [
            {"patterns": [r".*\.q_proj\.weight$"], "partition_type": "column", "shape": [[32, 32], -1], "partition_dim": 0},
            *json.loads(specs.read_text())["layer_specs"]]}))
    else:
        Phi3Config(**SMALL, pad_token_id=0).save_pretrained(tmp_path / "model")
        specs, wrong = tmp_path / "phi3.json", tmp_path / "no_shape.json"
        specs.write_text(json.dumps(tiny_phi3_specs()))
        wrong.write_text(json.dumps(tiny_phi3_specs(with_shape=False)))
    out = tmp_path / "parity.json"
    proc = torchrun(2, ROOT / "tests" / "parity_worker.py", out, "--tp_size", "2", "--model_name", tmp_path / "model",
                    "--random_init", "--partition_config", specs, "--wrong_partition_config", wrong)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_parity(json.loads(out.read_text()))


def test_script_trains_a_llama_from_a_spec_file_with_verify_tp(tmp_path, cache):
    LlamaConfig(**SMALL).save_pretrained(tmp_path / "llama")
    # a tokenizer for the model directory: the embedded text's BPE, as the built-in shapes get
    raw = S.load_text(S.parse_args(["--cache_dir", str(cache)]))
    S.train_bpe_tokenizer(raw["train"], "text", 8192, cache).save_pretrained(tmp_path / "llama")
    proc, results = run_script(2, tmp_path / "out", cache, "--model_name", tmp_path / "llama", "--random_init",
                               "--partition_config", CONFIGS / "llama.json", "--tp_size", "2", "--verify_tp",
                               "--precision", "fp32", "--seq_length", "64", "--num_steps", "30", "--batch_size", "4",
                               "--learning_rate", "3e-3", "--eval_interval", "10", "--skip_export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results["verify_tp"]["worst_relative_diff"] < 1e-4 and results["verify_tp"]["modules_compared"] > 10
    assert_learned(results)
    assert "self_attn.q_proj.weight" in proc.stdout and "(32, 64)" in proc.stdout  # 64 -> 32 rows per rank


def test_verify_tp_names_the_fused_qkv_when_the_upstream_shape_spec_is_used(tmp_path, cache):
    specs = S.gpt_neox_layer_specs()
    specs[0] = dict(specs[0], shape=[[64, 64, 64], -1], partition_dim=0)  # builtin:tiny: hidden 64
    (tmp_path / "upstream.json").write_text(json.dumps({"layer_specs": specs}))
    proc, _ = run_script(2, tmp_path, cache, "--tp_size", "2", "--verify_tp", "--precision", "fp32",
                         "--seq_length", "64", "--partition_config", tmp_path / "upstream.json")
    line = error_line(proc)
    assert "--verify_tp: the sharded model differs" in line
    assert "gpt_neox.layers.0.attention.query_key_value (column, shape=[[64, 64, 64], -1])" in line
    assert "step     1" not in proc.stdout  # stopped before training


def test_dry_run_lists_every_2d_weight_once(capsys):
    report = S.main(["--dry_run", "--model_name", "builtin:tiny", "--tp_size", "2", "--dp_size", "2"])
    rows = {r["weight"]: r for r in report["dry_run"]}
    assert len(rows) == len(report["dry_run"]) == 2 * 4 + 2  # 2 layers x 4 Linears, lm_head, embed_in
    assert (rows["gpt_neox.layers.1.attention.query_key_value.weight"]["per_rank"],
            rows["gpt_neox.layers.1.attention.dense.weight"]["per_rank"],
            rows["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"]["per_rank"],
            rows["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"]["per_rank"]) == ((96, 64), (64, 32), (128, 64), (64, 128))
    # the output head is split by vocabulary (--vocab_parallel, the default at tp > 1); the input embedding stays whole
    assert rows["lm_head.weight"]["type"] == "column" and rows["lm_head.weight"]["per_rank"] == (4096, 64)
    assert rows["gpt_neox.embed_in.weight"]["type"] == "replicated"
    assert [w.split()[1] for w in report["warnings"]] == ["gpt_neox.embed_in.weight"]
    printed = capsys.readouterr().out
    first_words = [line.split()[0] for line in printed.splitlines() if line.strip()]
    assert all(first_words.count(name) == 1 for name in rows)  # one table row each
    # by hand: per layer, the split tensors are QKV weight and bias, dense weight, h_to_4h weight and bias,
    # 4h_to_h weight (the row biases are not split), and the head; each rank holds half of them and all the rest
    total = sum(p.numel() for p in S.AutoModelForCausalLM.from_config(S.load_config(S.parse_args([
        "--model_name", "builtin:tiny"]))).parameters())
    split = 2 * (192 * 64 + 192 + 64 * 64 + 256 * 64 + 256 + 64 * 256) + 8192 * 64
    local = total - split // 2
    assert report["memory_per_rank_gib"]["weights"] == pytest.approx(local * 2 / 2 ** 30)  # bf16
    assert report["memory_per_rank_gib"]["optimizer"] == pytest.approx(local * 12 / 2 / 2 ** 30)  # ZeRO-2, dp=2
    # the whole head would add its other half: bf16 weight, fp32 gradient and optimizer partitions over dp=2
    saved = 8192 * 64 // 2 * (2 + 4 / 2 + 12 / 2) / 2 ** 30
    assert f"saves {saved:.2f} GiB per rank" in printed


def test_dry_run_of_the_6_9b_shape_needs_no_weights():
    report = S.main(["--dry_run", "--model_name", "builtin:pythia-6.9b", "--tp_size", "4", "--dp_size", "2"])
    assert len(report["dry_run"]) == 32 * 4 + 2
    assert report["memory_per_rank_gib"]["total"] < 80


@pytest.mark.parametrize("content,message", [
    ('{"layer_specs": [{"patterns": [".*dense"], "partition_typ": "row"}]}', r"unknown field\(s\) \['partition_typ'\]"),
    ('{"layer_specs": [{"patterns": ["*.dense"]}]}', "pattern '\\*.dense' is not a valid regular expression"),
    ('{"layer_specs": [{"patterns": [".*dense"], "partition_type": "diagonal"}]}', "'diagonal' is not a valid PartitionType"),
    ('{"layer_specs": [{"patterns": [".*dense"], "shape": "3,-1"}]}', "layer spec 0: AutoTP shape must be a tuple"),
    ('{"layer_specs": [{"patterns": [".*dense"], "shape": [[2, 2], [3]]}]}', "nested tuple only allowed at partition_dim"),
    ('{"layer_specs": []}', "with at least one spec"),
    ('{"specs": []}', "expected DeepSpeed's partition_config.*got \\['specs'\\]"),
    ('{"layer_specs": [{"patterns": [".*dense"]}], "stric_mode": true}', "unknown key\\(s\\) \\['stric_mode'\\]"),
    ('{"layer_specs": [', "is not valid JSON"),
])
def test_spec_file_errors_name_what_to_fix(tmp_path, content, message):
    (tmp_path / "specs.json").write_text(content)
    with pytest.raises(S.UsageError, match=message):
        S.load_partition_config(tmp_path / "specs.json")


def test_a_deepspeed_partition_config_is_taken_as_written(tmp_path):
    """The partition_config object copied out of a DeepSpeed config, with every key DeepSpeed reads, means
    what it means there: model_types restricts a spec to those models, strict_mode refuses a Linear that
    no spec matches (embeddings excepted, as in DeepSpeed); tp_size is DeepSpeed's to override."""
    def dry_run_with(config, *extra):
        (tmp_path / "ds.json").write_text(json.dumps(config))
        return S.main(["--dry_run", "--tp_size", "2", "--partition_config", str(tmp_path / "ds.json"), *extra])

    config = {"use_default_specs": False, "strict_mode": False, "tp_size": 8, "embedding_partition_dim": 1,
              "lm_head_patterns": ["lm_head", "embed_out"],
              "layer_specs": [dict(spec, model_types=["gpt_neox"], gather_output=False, grad_allreduce=False)
                              for spec in S.gpt_neox_layer_specs()]}
    builtin = {r["weight"]: r["per_rank"] for r in S.main(["--dry_run", "--tp_size", "2"])["dry_run"]}
    assert {r["weight"]: r["per_rank"] for r in dry_run_with(config)["dry_run"]} == builtin
    config["layer_specs"][1]["model_types"] = ["llama"]
    with pytest.raises(S.UsageError, match=r"layer spec 1 .* matches no Linear weight of this model \(its model_types \['llama'\] leave out gpt_neox"):
        dry_run_with(config)
    config["layer_specs"][1]["model_types"] = None
    config["strict_mode"] = True
    with pytest.raises(S.UsageError, match=r"strict_mode: no layer spec matches lm_head.weight"):
        dry_run_with(config, "--no-vocab_parallel")
    assert {r["weight"]: r["per_rank"] for r in dry_run_with(config)["dry_run"]} == builtin  # the head: vocab-parallel
    config["layer_specs"].append({"patterns": [r"lm_head\.weight$"], "partition_type": "skip"})
    assert dry_run_with(config, "--no-vocab_parallel")["dry_run"][-1]["per_rank"] == (8192, 64)


def test_spec_errors_found_on_the_model(tmp_path):
    def dry_run_with(specs):
        (tmp_path / "specs.json").write_text(json.dumps(specs))
        return S.main(["--dry_run", "--tp_size", "2", "--partition_config", str(tmp_path / "specs.json")])

    specs = S.gpt_neox_layer_specs()
    specs[2] = dict(specs[2], patterns=[r".*\.mlp\.dense_h_to_4\.weight$"])  # typo
    with pytest.raises(S.UsageError, match=re.escape(r"layer spec 2 ['.*\\.mlp\\.dense_h_to_4\\.weight$'] matches no Linear")):
        dry_run_with(specs)
    specs = S.gpt_neox_layer_specs()
    specs[0] = dict(specs[0], shape=[[64, 64, 32], -1], partition_dim=0)  # adds up to 160, not 192
    with pytest.raises(S.UsageError, match=r"shape \[\[64, 64, 32\], -1\] splits dim 0 into blocks \[64, 64, 32\], "
                                           "which must add up to 192"):
        dry_run_with(specs)
    assert dry_run_with(S.gpt_neox_layer_specs())["dry_run"]  # the same file format, with the built-in specs


def test_spec_file_of_the_repository_equals_the_built_in_specs():
    assert S.load_partition_config(CONFIGS / "gpt_neox.json") == S.builtin_partition_config()
