"""Start-up: each rank builds or reads only the weights it will hold (CPU, gloo).

  * for tiny safetensors checkpoints, every rank's shards and the first three losses of the script's loading
    (an empty model sliced by deepspeed.initialize, then each rank's slices read from the files) equal, bit for
    bit, those of loading the whole checkpoint on the host first (what the script did before): the built-in
    GPT-NeoX specs at tp 2 and 4, with and without the vocabulary-parallel head, the Phi-3 specs with `shape`
    (grouped-query attention) and an uneven split (6 heads at tp 4); in bf16, from fp32 files;
  * the random weights are one model whatever the tp: gathered whole at tp 1, 2 and 4 they are identical;
  * the buffers the model computes when it is built (the rotary inv_freq) equal those of a model built whole;
  * a checkpoint with a missing or mis-shaped tensor is one error line before training.

Run: python -m pytest tests/test_loading.py -q
"""
import json

import pytest
import torch
import transformers
from transformers import Phi3Config

import autotp_custom_patterns as S
from conftest import ROOT, SMALL, torchrun, run_script, error_line, neox, save_checkpoint, tiny_phi3_specs

WORKER = ROOT / "tests" / "load_worker.py"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    (root / "phi3.json").write_text(json.dumps(tiny_phi3_specs()))
    return {"neox": save_checkpoint(root / "neox", neox(4, 64)),
            "neox_6_heads": save_checkpoint(root / "neox6", neox(6, 48)),
            "phi3": save_checkpoint(root / "phi3", Phi3Config(**SMALL, pad_token_id=0)),
            "phi3_specs": root / "phi3.json"}


def launch(tmp_path, nproc, cases, dump):
    (tmp_path / "cases.json").write_text(json.dumps({k: list(map(str, v)) for k, v in cases.items()}))
    proc = torchrun(nproc, WORKER, tmp_path / "out.json", "--dump", dump, tmp_path / "cases.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


def check_same(results):
    for name, r in results.items():
        assert r["shards_identical"] and r["split_tensors"] > 0, (name, r)
        assert r["losses_now"] == r["losses_before"], (name, r)


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    return tmp_path_factory.mktemp("random")


def test_tp2_loading_equals_the_host_path(tmp_path, checkpoints, random_models):
    bf16 = ["--precision", "bf16"]
    check_same(launch(tmp_path, 2, {
        "builtin specs, split head": ["--model_name", checkpoints["neox"], *bf16],
        "builtin specs, whole head": ["--model_name", checkpoints["neox"], "--no-vocab_parallel", *bf16],
        "phi3 shape specs": ["--model_name", checkpoints["phi3"], "--partition_config", checkpoints["phi3_specs"],
                             "--no-vocab_parallel", *bf16]}, random_models / "tp2.pt"))


def test_tp4_loading_equals_the_host_path_also_split_unevenly(tmp_path, checkpoints, random_models):
    check_same(launch(tmp_path, 4, {
        "builtin specs, split head": ["--model_name", checkpoints["neox"], "--precision", "bf16"],
        "6 heads at tp 4": ["--model_name", checkpoints["neox_6_heads"], "--precision", "bf16"]},
        random_models / "tp4.pt"))


def test_random_weights_are_one_model_at_every_tp(tmp_path, random_models):
    launch(tmp_path, 1, {}, random_models / "tp1.pt")
    whole = {tp: torch.load(random_models / f"tp{tp}.pt") for tp in (1, 2, 4)}
    assert whole[1].keys() == whole[2].keys() == whole[4].keys()
    for name, tensor in whole[1].items():
        assert torch.equal(tensor, whole[2][name]) and torch.equal(tensor, whole[4][name]), name
    assert whole[1]["gpt_neox.layers.0.attention.query_key_value.weight"].std() > 0.01  # initialised, not empty


def test_buffers_computed_at_build_time_equal_a_whole_build():
    config = neox(4, 64)
    args = S.parse_args(["--model_name", "builtin:tiny"])
    empty = S.empty_model(args, config, torch.bfloat16, torch.device("cpu"))
    whole = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    expected = dict(whole.named_buffers())
    assert expected and dict(empty.named_buffers()).keys() == expected.keys()
    for name, buffer in empty.named_buffers():
        assert buffer.dtype == expected[name].dtype and torch.equal(buffer, expected[name]), name


@pytest.mark.parametrize("damage,message", [("drop", "has no tensor gpt_neox.layers.1.mlp.dense_4h_to_h.weight"),
                                            ("reshape", "holds gpt_neox.embed_in.weight as (1024, 32)")])
def test_a_missing_or_mis_shaped_tensor_is_one_line(tmp_path, cache, damage, message):
    from safetensors.torch import load_file, save_file
    path = save_checkpoint(tmp_path / "model", neox(4, 64))
    tensors = load_file(path / "model.safetensors")
    if damage == "drop":
        del tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    else:
        tensors["gpt_neox.embed_in.weight"] = tensors["gpt_neox.embed_in.weight"][:, :32].contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    proc, _ = run_script(2, tmp_path / "out", cache, "--model_name", path, "--tp_size", "2", "--seq_length", "32",
                         "--num_steps", "2")
    assert message in error_line(proc), proc.stderr[-2000:]
    assert "start-up: data" in proc.stdout and not any(line.startswith("step ") for line in proc.stdout.splitlines())
