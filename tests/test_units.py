"""Pure tests, no process group: topology, layer specs (on a labelled fused-QKV weight), the sampler
contract, packing, argument checks and the DeepSpeed config. Seconds on a laptop.

Run: python -m pytest tests/test_units.py -q
"""
import argparse
import itertools
import json
import math
import sys
import time

import datasets
import pytest
import torch
import torch.distributed as dist

import autotp_custom_patterns as S
from conftest import ROOT, preflight
from deepspeed.module_inject import layers


# ---- topology -----------------------------------------------------------------------------------

@pytest.mark.parametrize("world,tp", [(1, 1), (2, 2), (4, 2), (8, 4), (8, 1), (8, 8)])
def test_layout_matches_deepspeeds_grid(world, tp):
    layouts = [S.resolve_layout(rank, world, tp=tp) for rank in range(world)]
    dp = world // tp
    tp_groups = [[l.rank for l in layouts if l.dp_rank == d] for d in range(dp)]
    dp_groups = [[l.rank for l in layouts if l.tp_rank == t] for t in range(tp)]
    assert tp_groups == [list(range(d * tp, (d + 1) * tp)) for d in range(dp)]  # consecutive ranks
    assert dp_groups == [list(range(t, world, tp)) for t in range(tp)]  # strided by tp
    assert all(l.dp == dp and l.tp == tp for l in layouts)


def test_layout_fills_in_the_missing_size():
    assert (S.resolve_layout(0, 8).tp, S.resolve_layout(0, 8).dp) == (8, 1)
    assert S.resolve_layout(0, 8, tp=4).dp == 2
    assert S.resolve_layout(0, 8, dp=4).tp == 2


@pytest.mark.parametrize("world,tp,dp", [(4, 2, 1), (4, 3, None), (6, None, 4), (2, 4, 2)])
def test_layout_rejects_sizes_that_do_not_fill_the_world(world, tp, dp):
    with pytest.raises(S.UsageError, match=r"--tp_size x --dp_size must equal the number of processes"):
        S.resolve_layout(0, world, tp, dp)


def test_model_checks_name_the_flag():
    config = S.load_config(S.parse_args(["--model_name", "builtin:tiny"]))  # 4 heads, MLP 256, 2048 positions
    S.check_model_fits_tp(config, 4, 2048)
    with pytest.raises(S.UsageError, match="--tp_size 3 must divide the 4 attention heads"):
        S.check_model_fits_tp(config, 3, 128)
    config.intermediate_size = 250
    with pytest.raises(S.UsageError, match="--tp_size 4 must divide the MLP width 250"):
        S.check_model_fits_tp(config, 4, 128)
    with pytest.raises(S.UsageError, match="--seq_length 4096 exceeds the model's maximum of 2048"):
        S.check_model_fits_tp(S.load_config(S.parse_args(["--model_name", "builtin:tiny"])), 1, 4096)


# ---- partition specs ----------------------------------------------------------------------------

def labelled_qkv(heads, head_size):
    """GPT-NeoX's fused QKV rows as (head, role) labels: the model views the projection's output as
    (..., heads, 3 * head_size) and chunks the last axis into q, k, v, so row i belongs to head
    i // (3 * head_size) and role (i // head_size) % 3 (0 = q, 1 = k, 2 = v)."""
    rows = torch.arange(3 * heads * head_size)
    return torch.stack([rows // (3 * head_size), (rows // head_size) % 3], dim=1)


def rows_for_rank(labels, spec, tp, rank, monkeypatch):
    """The rows of a labelled weight that DeepSpeed's own column-parallel layer for `spec` keeps on TP rank
    `rank` of `tp` (LinearLayer, or SubParamLinearLayer for a spec with a `shape`, as AutoTP picks them), its
    two process-group queries answered without a process group. Row i of the weight holds the value i."""
    monkeypatch.setattr(layers.dist, "get_world_size", lambda group=None: tp)
    monkeypatch.setattr(layers.dist, "get_rank", lambda group=None: rank)
    linear = torch.nn.Linear(2, len(labels), bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.arange(len(labels))[:, None].expand(-1, 2))
    if "shape" in spec:
        layer = layers.SubParamLinearLayer(linear, object(), shape=spec["shape"], partition_dim=0)
    else:
        layer = layers.LinearLayer(linear, object())
    return labels[layer.weight[:, 0].long()]


@pytest.mark.parametrize("heads,tp", [(4, 2), (8, 4), (32, 4), (32, 8)])
def test_qkv_spec_gives_each_rank_its_own_whole_heads(heads, tp, monkeypatch):
    head_size = 8
    labels = labelled_qkv(heads, head_size)
    spec = S.gpt_neox_layer_specs()[0]
    assert spec["patterns"] == [r".*\.attention\.query_key_value\.weight$"] and "shape" not in spec
    per_rank = heads // tp
    for rank in range(tp):
        held = {tuple(row.tolist()) for row in rows_for_rank(labels, spec, tp, rank, monkeypatch)}
        assert held == {(h, role) for h in range(rank * per_rank, (rank + 1) * per_rank) for role in range(3)}


def test_upstream_shape_spec_mixes_heads_across_roles(monkeypatch):
    """The trap the comment in gpt_neox_layer_specs warns about: [Q; K; V] blocks are not this layout."""
    heads, head_size, tp = 4, 8, 2
    hidden = heads * head_size
    labels = labelled_qkv(heads, head_size)
    spec = dict(S.gpt_neox_layer_specs()[0], shape=((hidden, hidden, hidden), -1), partition_dim=0)
    held = {tuple(row.tolist()) for row in rows_for_rank(labels, spec, tp, 0, monkeypatch)}
    heads_held = {h for h, _ in held}
    assert not all({(h, r) for r in range(3)} <= held for h in heads_held)  # no head arrives whole


def meta_model(name="builtin:tiny"):
    return S.meta_model(S.load_config(S.parse_args(["--model_name", name])))


@pytest.mark.parametrize("name,tp", [("builtin:tiny", 2), ("builtin:tiny", 4), ("builtin:pythia-6.9b", 4)])
def test_plan_shards_every_block_linear(name, tp):
    model = meta_model(name)
    specs = S.gpt_neox_layer_specs()
    plan = S.plan_partition(model, S.autotp_config({"layer_specs": specs}), tp)
    config = model.config
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    expected = {"attention.query_key_value.weight": (3 * h // tp, h), "attention.query_key_value.bias": (3 * h // tp,),
                "attention.dense.weight": (h, h // tp), "attention.dense.bias": (h,),
                "mlp.dense_h_to_4h.weight": (inter // tp, h), "mlp.dense_h_to_4h.bias": (inter // tp,),
                "mlp.dense_4h_to_h.weight": (h, inter // tp), "mlp.dense_4h_to_h.bias": (h,)}
    for layer, (suffix, shape) in itertools.product(range(layers), expected.items()):
        assert plan[f"gpt_neox.layers.{layer}.{suffix}"][2] == shape
    assert plan["lm_head.weight"][0] is None and plan["gpt_neox.embed_in.weight"][0] is None  # replicated
    assert len(plan) == layers * len(expected) + 2


def test_compile_is_on_by_default_only_with_cuda_and_only_for_named_blocks(monkeypatch):
    model, other = meta_model("builtin:tiny"), torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert S.repeated_blocks(model) == list(model.gpt_neox.layers)  # each block, nothing else

    def decide(accelerator, flags, m):
        monkeypatch.setattr(S, "get_accelerator", lambda: argparse.Namespace(device_name=lambda: accelerator))
        return S.decide_compile(S.parse_args(flags), m)

    assert decide("cpu", [], model) is False and decide("cpu", ["--compile"], model) is True
    assert decide("cuda", [], model) is True and decide("cuda", ["--no-compile"], model) is False
    assert decide("cuda", [], other) is False  # a model without named blocks runs eagerly
    with pytest.raises(S.UsageError, match="Sequential names no repeated blocks .*use --no-compile"):
        decide("cuda", ["--compile"], other)


def test_a_spec_that_matches_nothing_is_an_error():
    specs = S.gpt_neox_layer_specs()
    specs[1] = dict(specs[1], patterns=[r".*\.attention\.dence\.weight$"])
    with pytest.raises(S.UsageError, match=r"layer spec 1 .*dence.* matches no Linear weight"):
        S.plan_partition(meta_model(), S.autotp_config({"layer_specs": specs}), 2)


def test_a_spec_without_partition_type_is_column_as_in_deepspeed():
    specs = S.gpt_neox_layer_specs()
    del specs[0]["partition_type"]
    tp_config = S.autotp_config({"layer_specs": specs})
    plan = S.plan_partition(meta_model(), tp_config, 2)
    assert plan["gpt_neox.layers.0.attention.query_key_value.weight"][2] == (96, 64)
    assert "column     0: .*\\.attention\\.query_key_value" in S.plan_table(plan, S.SpecSource("a file", {}, tp_config), 2)


def test_a_block_linear_left_unsharded_is_an_error():
    specs = S.gpt_neox_layer_specs()[:3]
    with pytest.raises(S.UsageError, match=r"no layer spec covers gpt_neox.layers.0.mlp.dense_4h_to_h"):
        S.plan_partition(meta_model(), S.autotp_config({"layer_specs": specs}), 2)


# ---- data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,dp,tp", [(103, 3, 2), (64, 2, 4), (10, 1, 1)])
def test_sampler_contract(n, dp, tp):
    dataset = list(range(n))
    world = dp * tp
    layouts = [S.resolve_layout(rank, world, tp=tp) for rank in range(world)]

    def order(layout, epoch, seed=7):
        sampler = S.make_sampler(dataset, layout, seed)
        sampler.set_epoch(epoch)
        items = list(sampler)
        assert len(items) == len(sampler)  # len() is what it yields
        return items

    for epoch in (0, 1):
        orders = {l.rank: order(l, epoch) for l in layouts}
        for l in layouts:  # a rank reads exactly what the first rank of its TP group reads
            assert orders[l.rank] == orders[l.dp_rank * tp]
        shards = [set(orders[d * tp]) for d in range(dp)]
        assert all(len(orders[d * tp]) == n // dp for d in range(dp))  # equal length, remainder dropped
        assert sum(len(s) for s in shards) == len(set().union(*shards))  # disjoint
    first = order(layouts[0], 0)
    assert first == order(layouts[0], 0)  # deterministic for (seed, epoch)
    if n > 20:
        assert first != order(layouts[0], 1)  # reshuffled each epoch
        assert first != order(layouts[0], 0, seed=8)


TOKENIZER_TEXT = ["the quick brown fox jumps over the lazy dog " * 20, "pack these documents into blocks of tokens " * 20]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    text = datasets.Dataset.from_dict({"text": TOKENIZER_TEXT})
    return S.train_bpe_tokenizer(text, "text", 300, tmp_path_factory.mktemp("tok"))


def test_bpe_tokenizer_is_deterministic(small_tokenizer, tmp_path):
    text = datasets.Dataset.from_dict({"text": TOKENIZER_TEXT})
    again = S.train_bpe_tokenizer(text, "text", 300, tmp_path)
    sample = "the lazy fox packs blocks"
    assert again(sample)["input_ids"] == small_tokenizer(sample)["input_ids"]
    assert small_tokenizer.decode(small_tokenizer(sample)["input_ids"]) == sample
    assert small_tokenizer.eos_token == "<|endoftext|>" and len(small_tokenizer) <= 300


def test_packing_joins_documents_with_eos_into_full_blocks(small_tokenizer):
    docs = [f"document {i}: " + "the quick brown fox " * (i + 1) for i in range(30)]
    raw = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": docs}))
    seq = 16
    blocks = S.pack_into_blocks(raw, small_tokenizer, seq, "text")["train"]["input_ids"]
    eos = small_tokenizer.eos_token_id
    stream = [t for d in docs for t in small_tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]
    assert all(len(b) == seq for b in blocks)
    assert [t for b in blocks for t in b] == stream[:len(stream) // seq * seq]  # in order, nothing padded


def test_leader_first_raises_what_a_leader_hit_on_every_rank():
    """Whatever the leader hit comes back as an error (a UsageError as itself, any other fault as LeaderFailed
    naming its type, even one without a message), never as a result; here on a world of one."""
    def fault():
        raise RuntimeError()  # no message: it must still come back as an error

    def bad_input():
        raise S.UsageError("bad input")

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert S.leader_first(lambda: 7, leader=True) == 7
        with pytest.raises(S.LeaderFailed, match="^RuntimeError: $"):
            S.leader_first(fault, leader=True)
        with pytest.raises(S.UsageError, match="^bad input$"):
            S.leader_first(bad_input, leader=True)
    finally:
        dist.destroy_process_group()


# ---- arguments and config -----------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--batch_size", "0"], "--batch_size: must be positive"),
    (["--seq_length", "-5"], "--seq_length: must be at least 2"),
    (["--seq_length", "1"], "--seq_length: must be at least 2 .a token and the next one to predict"),
    (["--num_steps", "-1"], "--num_steps: must be zero or positive"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps: must be positive"),
    (["--tp_size", "0"], "--tp_size: must be positive"),
    (["--dp_size", "-2"], "--dp_size: must be positive"),
    (["--learning_rate", "0"], "--learning_rate: must be positive"),
    (["--model_name", "builtin:pythia-7b"], "unknown built-in model 'pythia-7b'"),
    (["--train_file", "/nonexistent/train.txt"], "--train_file: /nonexistent/train.txt does not exist"),
    (["--train_file", "notes.docx"], "use one of .txt"),
    (["--dataset_name", "wikitext", "--train_file", str(ROOT / "requirements.txt")], "either --dataset_name or --train_file"),
    (["--export_only"], "give --resume_from_checkpoint too"),
    (["--save_interval", "-5"], "--save_interval: must be zero or positive"),
    (["--world_size", "8"], "--world_size describes the ranks of --dry_run"),
    (["--dry_run", "--gpu_memory_gib", "0"], "--gpu_memory_gib: must be positive"),
])
def test_bad_arguments_name_what_to_change(argv, message):
    with pytest.raises(S.UsageError, match=message):
        S.check_args(S.parse_args(argv))


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit:
        S.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit.value.code == 0 and "--shard_on_load" in text and "80% of one GPU's free memory" in text
    assert f"(default: {2048 if torch.cuda.is_available() else 512})" in text  # --seq_length's, on this machine


def test_empty_files_are_rejected(tmp_path):
    (tmp_path / "train.txt").write_text("")
    (tmp_path / "val.jsonl").write_text("")
    with pytest.raises(S.UsageError, match="--train_file: .*train.txt is empty"):
        S.check_args(S.parse_args(["--train_file", str(tmp_path / "train.txt")]))
    with pytest.raises(S.UsageError, match="--validation_file: .*val.jsonl is empty"):
        S.check_args(S.parse_args(["--validation_file", str(tmp_path / "val.jsonl")]))


def test_a_training_file_that_is_not_utf8_is_one_line(tmp_path):
    """Caught by the flag's check where the fault is in the file's first MiB, by load_text past it."""
    (tmp_path / "early.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(S.UsageError, match=r"--train_file: .*early.txt is not UTF-8 text \(byte 0xe9 at offset 3\): "
                                           r"convert it, e.g. iconv -f latin1 -t utf-8"):
        S.parse_args(["--train_file", str(tmp_path / "early.txt")])
    (tmp_path / "late.txt").write_bytes(b"plain text\n\n" * 100_000 + "caf\u00e9\n".encode("latin-1"))
    args = S.parse_args(["--train_file", str(tmp_path / "late.txt"), "--cache_dir", str(tmp_path / "cache")])
    with pytest.raises(S.UsageError, match=r"late.txt is not UTF-8 text \(byte 0xe9 past its first MiB\)"):
        S.load_text(args)


def test_ds_config_turns_on_autotp_from_the_config_alone():
    run = preflight("--tp_size", "4", "--zero_stage", "1", "--batch_size", "3", "--gradient_accumulation_steps", "2",
                    "--max_grad_norm", "0.5", "--precision", "fp16", world=8)
    args, config = run.args, run.ds_config
    assert config["tensor_parallel"] == {"autotp_size": 4, "partition_config": {
        "use_default_specs": False, "layer_specs": S.gpt_neox_layer_specs()},
        "vocab_parallel_lm_head": True, "tp_overlap_comm": False}  # the vocab-parallel head is the default at tp > 1
    assert "compile" not in config and "checkpoint" not in config
    assert args.global_batch_size == 3 * 2 * 2 and args.tokens_per_step == 12 * 512
    assert config["zero_optimization"] == {"stage": 1}
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (3, 2)
    assert "train_batch_size" not in config  # DeepSpeed derives it, using the DP size from BatchSizeMPU
    assert config["gradient_clipping"] == 0.5
    assert config["fp16"]["enabled"] and not config["bf16"]["enabled"]
    assert preflight().ds_config["zero_optimization"]["stage"] == 2  # ZeRO-2 by default
    assert config["bf16"] == {"enabled": False, "check_grad_overflow": False}  # train() checks instead


@pytest.mark.parametrize("argv,tp,message", [
    (["--vocab_parallel"], 1, "--vocab_parallel act on tensor-parallel layers: use them with --tp_size > 1"),
    (["--tp_overlap_comm", "--deepcompile"], 1, "--tp_overlap_comm and --deepcompile act on tensor-parallel"),
    (["--deepcompile", "--vocab_parallel"], 2, "--vocab_parallel cannot apply: DeepCompile's autotp pass cannot take it; use --no-"),
    (["--deepcompile", "--no-vocab_parallel", "--tp_overlap_comm"], 2, "--deepcompile cannot be combined with --tp_overlap_comm"),
    (["--deepcompile", "--no-vocab_parallel", "--compile"], 2, "--deepcompile cannot be combined with --compile"),
])
def test_tp_accelerations_that_cannot_work_are_refused(argv, tp, message):
    with pytest.raises(S.UsageError, match=message):
        preflight(*argv, "--tp_size", tp, world=tp)


def test_tp_accelerations_reach_the_deepspeed_config():
    def config_for(*argv):
        return preflight(*argv, "--tp_size", "2", world=2).ds_config

    config = config_for("--deepcompile")  # which turns the default vocab-parallel head off
    assert config["compile"] == {"deepcompile": True, "passes": ["autotp"]}
    assert config["tensor_parallel"]["vocab_parallel_lm_head"] is False
    config = config_for("--tp_overlap_comm")
    assert config["tensor_parallel"]["tp_overlap_comm"] is True and config["tensor_parallel"]["vocab_parallel_lm_head"]


def test_the_vocab_parallel_head_is_planned_split_by_vocabulary():
    plan = S.plan_partition(meta_model(), S.autotp_config(S.builtin_partition_config()), 4, vocab_parallel=True)
    assert plan["lm_head.weight"][0] is S.VOCAB_PARALLEL_HEAD and plan["lm_head.weight"][2] == (8192 // 4, 64)
    assert plan["gpt_neox.embed_in.weight"][0] is None  # the input embedding stays whole


def test_the_first_non_finite_step_is_kept_on_the_device():
    inf, nan, ok = float("inf"), float("nan"), torch.tensor(2.5)
    first_bad = torch.tensor(inf)
    first_bad = S.mark_non_finite(first_bad, 1, ok, torch.tensor(0.7))
    first_bad = S.mark_non_finite(first_bad, 2, ok, None)  # no norm computed: the loss alone decides
    assert first_bad.item() == inf
    first_bad = S.mark_non_finite(first_bad, 3, ok, inf)  # finite loss, infinite gradient norm
    assert first_bad.item() == 3
    first_bad = S.mark_non_finite(first_bad, 4, torch.tensor(nan), torch.tensor(nan))
    assert first_bad.item() == 3  # the first bad step stays
    assert S.mark_non_finite(torch.tensor(inf), 5, torch.tensor(nan), 1.0).item() == 5


# ---- resume and checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("n,batch,skip", [(103, 2, 0), (103, 2, 7), (103, 2, 50), (64, 4, 16), (64, 4, 37)])
def test_resumed_batches_continue_where_the_run_stopped(n, batch, skip):
    """Skipping k micro-batches (across epoch ends too) gives what the (k+1)-th read of a fresh run gives."""
    dataset = datasets.Dataset.from_dict({"input_ids": [[i] for i in range(n)]}).with_format("torch")
    layout, cpu = S.resolve_layout(1, 4, tp=2), torch.device("cpu")
    fresh = S.train_batches(dataset, layout, batch, batch * layout.dp, 42, cpu)
    resumed = S.train_batches(dataset, layout, batch, batch * layout.dp, 42, cpu, skip=skip)
    expected = [b.tolist() for b in itertools.islice(fresh, skip, skip + 30)]
    assert [b.tolist() for b in itertools.islice(resumed, 30)] == expected


# G = 8 sequences per optimizer step, split five ways: (world, tp, micro-batch, accumulation)
SPLITS_OF_8 = [(1, 1, 8, 1), (2, 1, 4, 1), (4, 2, 2, 2), (8, 1, 1, 1), (2, 2, 2, 4)]


def samples_per_step(dataset, world, tp, batch, accumulation, skip_steps=0, steps=30):
    """The sorted sample ids each optimizer step reads, over all DP ranks (one rank per TP group)."""
    layouts = [S.resolve_layout(rank, world, tp=tp) for rank in range(0, world, tp)]
    streams = [S.train_batches(dataset, l, batch, batch * accumulation * l.dp, 42, torch.device("cpu"),
                               skip=skip_steps * accumulation) for l in layouts]
    return [sorted(i for stream in streams for _ in range(accumulation) for i in next(stream).flatten().tolist())
            for _ in range(steps)]


@pytest.mark.parametrize("n", [103, 64])
def test_each_step_reads_the_same_samples_however_the_global_batch_is_split(n):
    """The data order is the global batch's: step s reads the same 8 samples whatever tp x dp, micro-batch
    and accumulation make up the 8 (over 30 steps: across epoch ends), and a run resumed in another split
    after k steps reads from step k on what the uninterrupted run reads (the resume path across topologies)."""
    dataset = datasets.Dataset.from_dict({"input_ids": [[i] for i in range(n)]}).with_format("torch")
    reference = samples_per_step(dataset, *SPLITS_OF_8[0])
    assert all(len(set(step)) == 8 for step in reference) and reference[0] != reference[n // 8]  # reshuffled
    for split in SPLITS_OF_8[1:]:
        assert samples_per_step(dataset, *split) == reference, split
        assert samples_per_step(dataset, *split, skip_steps=11, steps=19) == reference[11:], split


def fake_checkpoint(root, tag, args, complete=True, step=4):
    (root / tag).mkdir(parents=True)
    if complete:
        (root / tag / "run.json").write_text(json.dumps({"step": step, "samples_consumed": 4 * step,
                                                         "args": vars(args)}))


def checkpointed_run(tmp_path, *argv):
    """A checkpoint of a run at tp 2 x dp 2 made with argv (its run.json only): the settled arguments."""
    args = preflight("--output_dir", tmp_path, "--tp_size", "2", "--dp_size", "2", *argv, world=4).args
    fake_checkpoint(tmp_path / "checkpoints", "step_0000004", args)
    (tmp_path / "checkpoints" / "latest").write_text("step_0000004")
    return args


def test_a_checkpoint_is_found_by_its_pointer_and_one_that_is_not_there_lists_those_that_are(tmp_path):
    root = tmp_path / "checkpoints"
    resume = ["--output_dir", tmp_path, "--tp_size", "2", "--resume_from_checkpoint"]
    with pytest.raises(S.UsageError, match="latest: no complete checkpoint at .*checkpoints .no such directory.; "
                                           "none is beside it .a run writes them with --save_interval N"):
        preflight(*resume, "latest", world=4)  # nothing saved yet
    checkpointed_run(tmp_path)
    fake_checkpoint(root, "step_0000008", argparse.Namespace(), complete=False)  # a save that was killed half-way
    assert preflight(*resume, "latest", world=4).resume.path == root / "step_0000004"
    assert preflight(*resume, root, world=4).resume.path == root / "step_0000004"
    with pytest.raises(S.UsageError, match="no complete checkpoint at .*step_0000008 .no run.json: a save that did "
                                           "not finish.; the complete ones in .*checkpoints: step_0000004$"):
        preflight(*resume, root / "step_0000008", world=4)
    with pytest.raises(S.UsageError, match="step_0000002 .no such directory.; the complete ones in .*: step_0000004"):
        preflight(*resume, root / "step_0000002", world=4)  # removed by --keep_last, say


def test_a_resume_takes_the_checkpoints_settings_and_lists_every_flag_that_contradicts_them(tmp_path, capsys):
    saved = checkpointed_run(tmp_path, "--model_name", "builtin:pythia-70m", "--seq_length", "64", "--precision",
                             "fp32", "--seed", "7", "--num_steps", "20", "--learning_rate", "3e-4")
    resume = ["--output_dir", tmp_path, "--tp_size", "2", "--resume_from_checkpoint", "latest"]
    for extra in ([], ["--export_only"]):  # nothing to retype, for a resume or an export
        args = preflight(*resume, *extra, world=4).args
        assert all(getattr(args, n) == getattr(saved, n) for n in S.SAME_ON_RESUME + S.RESUMED_PLAN), extra
    assert preflight(*resume, "--seq_length", "64", world=4).args.model_name == "builtin:pythia-70m"  # agrees: fine
    with pytest.raises(S.UsageError, match=r"written with other settings: --seq_length 128 \(it has 64\); "
                                           r"--precision bf16 \(it has fp32\): leave these flags out"):
        preflight(*resume, "--seq_length", "128", "--precision", "bf16", world=4)
    capsys.readouterr()
    preflight(*resume, world=4)
    assert "learning-rate schedule" not in capsys.readouterr().out  # the same plan: nothing to say
    assert preflight(*resume, "--num_steps", "40", world=4).args.num_steps == 40  # the plan may change, and says so

    def cosine(step, steps, warmup=2):  # after warmup: half a cosine from the peak to 0 over the remaining steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    assert (f"the learning-rate schedule changes at step 4: {3e-4 * cosine(4, 20):.2e} in the checkpoint's (20 steps, "
            f"2 of warmup, peak 3.0e-04), {3e-4 * cosine(4, 40):.2e} from here (40 steps, 2 of warmup, peak 3.0e-04)"
            in capsys.readouterr().out)


def test_a_resume_may_change_the_topology_but_not_from_or_to_zero_0(tmp_path):
    checkpointed_run(tmp_path)
    resume = ["--output_dir", tmp_path, "--resume_from_checkpoint", "latest"]
    assert preflight(*resume, "--tp_size", "2", world=4).resume.universal is False
    for flags, world in ((["--tp_size", "4"], 4), (["--tp_size", "1"], 2), (["--tp_size", "2", "--zero_stage", "1"], 4)):
        assert preflight(*resume, *flags, world=world).resume.universal is True, flags
    with pytest.raises(S.UsageError, match="needs ZeRO-1 or 2 on both sides; resume with --tp_size 2 --dp_size 2 "
                                           "--zero_stage 2"):
        preflight(*resume, "--tp_size", "4", "--zero_stage", "0", world=4)


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    args = S.parse_args([])
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, f"step_{step:07d}", args)
        time.sleep(0.01)  # run.json times order the checkpoints
    fake_checkpoint(tmp_path, "step_0000008", args, complete=False)
    S.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(d.name for d in tmp_path.iterdir()) == ["step_0000004", "step_0000006"]
    S.prune_checkpoints(tmp_path, keep_last=0)  # 0 keeps all
    assert len(list(tmp_path.iterdir())) == 2
    # a universal copy goes with its checkpoint, does not count as one, and a half-done conversion is removed
    fake_checkpoint(tmp_path, "step_0000004_universal", args)
    fake_checkpoint(tmp_path, "step_0000006_universal.partial", args, complete=False)
    time.sleep(0.01)
    fake_checkpoint(tmp_path, "step_0000010", args)
    S.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(d.name for d in tmp_path.iterdir()) == ["step_0000006", "step_0000010"]


def test_output_dir_must_be_writable(tmp_path):
    S.check_output_dir(tmp_path / "new" / "dir")  # created
    (tmp_path / "a_file").write_text("")
    with pytest.raises(S.UsageError, match="--output_dir .*a_file/out is not writable"):
        S.check_output_dir(tmp_path / "a_file" / "out")


def test_loss_curve_needs_matplotlib_or_says_so(tmp_path, monkeypatch):
    history, evals = [{"step": 5, "loss": 9.0}, {"step": 10, "loss": 8.0}], [{"step": 10, "loss": 8.5}]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert S.plot_losses(history, evals, tmp_path / "loss.png") is None
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert S.plot_losses(history, evals, tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
