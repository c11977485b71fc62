"""Every source of TP specs, verified on CPU (fp32, gloo, tiny random models): the built-in GPT-NeoX specs,
the files of partition_configs/, DeepSpeed's presets (preset:NAME), the model's Hugging Face tp_plan and
DeepSpeed's automatic parser, for each architecture one of them claims to cover.

  * tests/sources_worker.py, at tp=2 and tp=4, records for each (architecture, source) whether it passes
    --verify_tp and then keeps the weights held whole identical across TP ranks for three training steps,
    differs (naming the first module), drifts, is refused before any weight loads, or crashes; the README's
    table "Which specs for which model" must be exactly the one these runs produce, and the script's own
    record of verified and wrong sources (its warnings) must agree with it;
  * the GQA Phi-3 under DeepSpeed's phi3 preset fails --verify_tp naming qkv_proj, the Phi-3 specs at the
    model's sizes pass; Qwen3 under the Llama specs drifts at q_norm; the spec files' sizes fit the models
    they are written for;
  * GPT-NeoX through its tp_plan trains at parity with the unsharded model and with the built-in specs;
  * a model whose forward breaks on its shards ends in one `error:` line.

Run: python -m pytest tests/test_sources.py -q   (about a minute on 2 cores)
"""
import json

import pytest
from transformers import BloomConfig, Phi3Config

import autotp_custom_patterns as S
from sources_worker import ARCHITECTURES
from conftest import ROOT, TOL, torchrun, run_script, error_line, check_parity

MARK = "<!-- table made by tests/test_sources.py -->"


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    found = {}
    for tp in (2, 4):
        out = tmp_path_factory.mktemp(f"tp{tp}") / "cells.json"
        proc = torchrun(tp, ROOT / "tests" / "sources_worker.py", out, "--tp_size", tp)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        found.update({(r["architecture"], r["source"], tp): r for r in json.loads(out.read_text())})
    return found


def short(record):
    """A cell of the README's table."""
    result, detail = record["result"], record["detail"]
    if result == "passes":
        return "passes"
    if result == "differs":
        return "differs at `" + detail.split("first at ")[1].split(" ")[0].split(".")[-1] + "`"
    if result == "drifts":
        return "drifts: `" + detail.split(" ")[3].split(".")[-2] + "`"
    if result == "refused":
        return "refused: " + ("tp_plan styles DeepSpeed cannot convert" if "cannot convert" in detail else
                              "`shape` sizes of another model" if "must add up" in detail else
                              "a spec matches nothing" if "matches no" in detail else
                              "kv heads < tp" if "must divide" in detail else
                              "not a `torch.nn.Linear`" if "not a torch.nn.Linear" in detail else detail[:60])
    return "crashes: " + detail.split(":")[0] if "sharded model failed" not in detail else "crashes in the forward"


def table(cells):
    rows = ["| architecture | source | tp=2 | tp=4 |", "|---|---|---|---|"]
    for arch, (_, sources) in ARCHITECTURES.items():
        for source in sources:
            rows.append(f"| {arch} | {source} | {short(cells[arch, source, 2])} | {short(cells[arch, source, 4])} |")
    return "\n".join(rows)


def test_the_readme_shows_the_table_these_runs_produce(cells):
    readme = (ROOT / "README.md").read_text()
    shown = readme.split(MARK)[1].split("\n\n")[0].strip()
    assert shown == table(cells), f"the README's table is out of date; these runs give:\n{table(cells)}"


def test_the_cells_that_matter(cells):
    assert all(cells["gpt_neox", source, tp]["result"] == "passes" for source in ("builtin", "tp_plan") for tp in (2, 4))
    wrong = cells["phi3 GQA", "preset:phi3", 2]  # the case: 8 query heads, 2 key/value heads
    assert wrong["result"] == "differs" and "first at model.layers.0.self_attn.o_proj" in wrong["detail"]
    assert "model.layers.0.self_attn.qkv_proj (column, shape=[3, -1])" in wrong["detail"]
    assert cells["phi3 GQA", "file:phi3@sizes", 2]["result"] == "passes"
    assert cells["phi3", "preset:phi3", 2]["result"] == "passes"  # without GQA the equal thirds are right
    assert cells["qwen3", "file:llama.json", 2]["result"] == "drifts" and "q_norm" in cells["qwen3", "file:llama.json", 2]["detail"]
    assert cells["qwen3", "tp_plan", 4]["result"] == "passes"
    assert cells["mixtral", "preset:mixtral", 2]["result"] == "refused"  # its expert patterns: transformers 4 names
    assert cells["gpt2", "autotp_parser", 2]["result"] == "refused" and "Conv1D" in cells["gpt2", "autotp_parser", 2]["detail"]
    assert max(r.get("logits_max_diff", 0) for r in cells.values()) < TOL


def test_the_scripts_own_record_agrees_with_the_table(cells):
    """What the script warns about (SOURCE_VERDICTS, read by source_verdict) is what the table measured."""
    for (arch, source, tp), record in cells.items():
        key = source.removeprefix("file:")
        if key == "phi3@sizes" or record["result"] == "refused":  # a file of this test's; refusals speak for themselves
            continue
        verdict = S.source_verdict(ARCHITECTURES[arch][0](), key)
        if record["result"] == "passes":
            assert verdict is None, (arch, source, verdict)
        else:
            assert isinstance(verdict, str), (arch, source, verdict)


def test_the_spec_files_fit_the_models_they_are_written_for():
    """phi3_mini.json and phi3_medium.json: [Q; K; V] and [gate; up] block sizes of those models (their Hugging
    Face configs: mini 32 heads of 96, 32 kv heads, MLP 8192; medium 40 heads of 128, 10 kv heads, MLP 17920)."""
    for name, (hidden, heads, kv, mlp) in {"phi3_mini.json": (3072, 32, 32, 8192),
                                           "phi3_medium.json": (5120, 40, 10, 17920)}.items():
        config = Phi3Config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                            intermediate_size=mlp, num_hidden_layers=1, vocab_size=32064)
        model = S.meta_model(config)
        for tp in (2, 4, 8):
            plan = S.plan_partition(model, S.autotp_config(S.load_partition_config(ROOT / "partition_configs" / name)), tp)
            assert plan["model.layers.0.self_attn.qkv_proj.weight"][2] == ((hidden + 2 * kv * hidden // heads) // tp, hidden)


def test_gpt_neox_through_its_tp_plan_trains_like_the_built_in_specs(tmp_path):
    out = tmp_path / "parity.json"
    proc = torchrun(2, ROOT / "tests" / "parity_worker.py", out, "--tp_size", "2", "--variants", ";--partition_config tp_plan")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    check_parity(results)  # each against the unsharded model
    builtin, tp_plan = results["variants"][""], results["variants"]["--partition_config tp_plan"]
    for optimizer in ("adamw", "sgd"):
        assert max(abs(a - b) for a, b in zip(builtin[optimizer]["losses"], tp_plan[optimizer]["losses"])) < TOL


def test_a_model_whose_forward_breaks_on_its_shards_is_one_line(tmp_path, cache):
    """Bloom under DeepSpeed's automatic parser: each rank builds ALiBi biases for all heads while its
    attention has half of them; the first step fails on every rank, and says so once."""
    BloomConfig(hidden_size=64, n_layer=2, n_head=8, vocab_size=8192).save_pretrained(tmp_path / "bloom")
    raw = S.load_text(S.parse_args(["--cache_dir", str(cache)]))
    S.train_bpe_tokenizer(raw["train"], "text", 8192, cache).save_pretrained(tmp_path / "bloom")
    proc, _ = run_script(2, tmp_path / "out", cache, "--model_name", tmp_path / "bloom", "--random_init", "--tp_size", "2",
                         "--partition_config", "autotp_parser", "--seq_length", "64", "--num_steps", "2")
    line = error_line(proc)
    assert "the sharded model failed at step 1: The expanded size of the tensor" in line and "--verify_tp names" in line
    assert "warning: DeepSpeed's automatic parser was measured wrong for bloom: the ALiBi biases" in proc.stdout


def test_the_warnings_follow_the_table(capsys):
    def warning(flag, config, *extra):
        args = S.parse_args(["--partition_config", flag, *extra])
        S.warn_about_source(S.SpecSource(f"source {flag}", {}, None), config, S.resolve_layout(0, 1, 1, 1), args)
        return capsys.readouterr().out

    mha, gqa = Phi3Config(num_hidden_layers=1), Phi3Config(num_hidden_layers=1, num_key_value_heads=8)
    assert "has not been verified here for phi3: run once with --verify_tp" in warning("my_specs.json", mha)
    assert warning("my_specs.json", mha, "--verify_tp") == ""
    assert warning("preset:phi3", mha) == ""  # verified without grouped-query attention
    assert "measured wrong for phi3: its shape (3, -1) cuts a grouped-query qkv_proj" in warning("preset:phi3", gqa)
