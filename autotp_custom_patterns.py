#!/usr/bin/env python
"""Train a Hugging Face GPT-NeoX (Pythia) model with DeepSpeed AutoTP and custom partition patterns.

The recipe comes first in this file, numbered as execute() follows it:
  1. the AutoTP layer specs for GPT-NeoX as plain data (`gpt_neox_layer_specs`), with the right split of
     its fused query_key_value weight, whose rows are interleaved per head ([h0: q k v][h1: q k v]...);
  2. the rank layout (`Layout`), and `BatchSizeMPU`, which tells DeepSpeed the number of DP replicas;
  3. the DeepSpeed config (`build_ds_config`): AutoTP is on because `tensor_parallel.autotp_size` is set,
     ZeRO-2 by default; the guard that replaces DeepSpeed's bf16 overflow check sits beside it;
  4. `deepspeed.initialize` (`build_engine`): AutoTP shards the model, ZeRO wraps the optimizer, and
     modules that read a head count in their forward get the per-rank one (`localize_head_counts`);
  5. the DP-rank-aware sampler (`make_sampler`): TP peers read identical batches, DP ranks disjoint ones;
  6. one training step (`train_step`).
Then the run, in two steps: preflight() decides everything that needs no process group (flags, specs,
layout, batch sizes, the DeepSpeed config, the checkpoint to resume) into a frozen Run, and execute() builds
and trains from it; --dry_run prints the Run instead. After them, one banner each: arguments (with
DeepSpeed's TP accelerations: --vocab_parallel, --tp_overlap_comm, --deepcompile); a DeepSpeed config of
your own and its monitors; where the specs come from (a file, a DeepSpeed preset, the model's tp_plan) and
the partition plan; memory per rank, layout advice and --dry_run; data; model (torch.compile of each
sharded block on GPUs); --verify_tp (sharded vs unsharded, module by module); checkpoints (resumable at
another tp x dp) and the export; the training loop and its metrics.

Rank layout. DeepSpeed puts consecutive ranks in one TP group: tp_rank = rank % tp, dp_rank = rank // tp.
With tp=2, dp=2 (4 ranks):

                  tp_rank 0   tp_rank 1
    dp_rank 0  [  rank 0      rank 1   ]  <- TP group: one model replica, split in 2, same batches
    dp_rank 1  [  rank 2      rank 3   ]  <- TP group: the other replica, other batches
                  DP group    DP group
                  [0, 2]      [1, 3]      <- ZeRO reduces gradients (and shards optimizer state) here

Launch:
  laptop, CPU only, no network (tiny random GPT-NeoX, English text shipped with Python):
    torchrun --standalone --nproc_per_node 4 autotp_custom_patterns.py --tp_size 2 --dp_size 2
  8 GPUs, Pythia-6.9B from the Hugging Face hub:
    deepspeed --num_gpus 8 autotp_custom_patterns.py --model_name EleutherAI/pythia-6.9b \\
        --tp_size 4 --dp_size 2 --seq_length 512 --num_steps 20
  8 GPUs without hub access (same shape, random weights): --model_name builtin:pythia-6.9b

Outputs in --output_dir: results.json (arguments, layout, curves, throughput), loss_curve.png, checkpoints/
(--save_interval N, and on SIGTERM/SIGINT), hf/ (the model gathered from the TP shards, plain Hugging Face).
`python autotp_custom_patterns.py --help` lists every knob.
"""
import argparse
import atexit
import codecs
import contextlib
import copy
import dataclasses
import datetime
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import random
import shutil
import signal
import socket
import sys
import threading
import traceback
import time
import urllib.parse
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import datasets
import deepspeed
import psutil
import torch
import torch.distributed as dist
import transformers
from deepspeed.accelerator import get_accelerator
# One TP rank's slice of a whole parameter, as DeepSpeed restores a universal checkpoint (see fill_weights):
# the per-rank loading uses it so that no split rule is written twice.
from deepspeed.checkpoint.universal_checkpoint import _resolve_autotp_partition
from deepspeed.module_inject.autotp_config import AutoTPConfig, AutoTPPresets, PartitionType, TPLayerSpec
from deepspeed.module_inject.layers import LinearAllreduce, SubParamLinearAllreduce, TensorParallel_Layer
from deepspeed.module_inject.tp_plan_converter import TPPlanConverter
from deepspeed.runtime.tensor_parallel.config import _get_hf_tp_plan
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.utils import groups
from safetensors import safe_open
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig

BUILTIN_PREFIX = "builtin:"
# GPT-NeoX shapes with random weights, for machines without hub access. The Pythia rows are the
# published Pythia shapes (layers, hidden, heads, padded vocab); MLP width is 4 x hidden.
BUILTIN_SHAPES = {
    "tiny": (2, 64, 4, 8192),
    "pythia-70m": (6, 512, 8, 50304),
    "pythia-160m": (12, 768, 12, 50304),
    "pythia-410m": (24, 1024, 16, 50304),
    "pythia-1b": (16, 2048, 8, 50304),
    "pythia-1.4b": (24, 2048, 16, 50304),
    "pythia-2.8b": (32, 2560, 32, 50304),
    "pythia-6.9b": (32, 4096, 32, 50432),
    "pythia-12b": (36, 5120, 40, 50688),
}
BUILTIN_TOKENIZER_VOCAB = 8192  # byte-level BPE trained on the training text for built-in shapes
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Dense bf16/fp16 tensor-core peak per GPU, TFLOP/s; the first name found in the device name wins.
PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "B200": 2250,
               "A100": 312, "L40S": 362}
# DeepSpeed's monitors (config sections), each with the package it needs; the CSV monitor needs none
MONITORS = {"tensorboard": "tensorboard", "csv_monitor": None, "wandb": "wandb", "comet": "comet_ml"}
STAGING_FRACTION = 0.8  # of a GPU's free memory the whole empty model may fill while it is sliced
TEXT_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# ==== THE RECIPE: AutoTP training with DeepSpeed, in the order execute() follows. Copy this part. ==
# It uses nothing defined below it, only the imports above.

class UsageError(Exception):
    """Bad input: reported as one line on rank 0, exit code 2, before heavy work where possible."""


class Diverged(Exception):
    """A non-finite loss: reported as one line, exit code 3, no checkpoint written after it."""


# ---- 1. Layer specs: which weights AutoTP splits, and how ----------------------------------------

def gpt_neox_layer_specs():
    """AutoTP layer specs for GPT-NeoX (Pythia). DeepSpeed matches each pattern with re.match against
    the full parameter name (gpt_neox.layers.3.attention.query_key_value.weight); the first spec that
    matches wins; a Linear no spec matches stays replicated on every TP rank."""
    return [
        # Fused QKV, weight (3*hidden, hidden). Its rows are interleaved per head, [h0: q k v][h1: q k v]...,
        # because the model views the output as (..., heads, 3*head_size). A plain contiguous split of the
        # rows therefore hands rank r whole heads r*H/tp .. (r+1)*H/tp-1, each with its own q, k and v.
        # No `shape` here: shape=((q, kv, kv), -1) would treat the rows as [Q; K; V] blocks and give each
        # rank rows of different heads in the q/k/v roles, a different model that still trains.
        {"patterns": [r".*\.attention\.query_key_value\.weight$"], "partition_type": "column"},
        # Attention output, weight (hidden, hidden): split the input features, which are the heads this
        # rank computed; each rank's partial product is all-reduced after the forward. Bias added once.
        {"patterns": [r".*\.attention\.dense\.weight$"], "partition_type": "row"},
        # MLP up-projection, weight (4*hidden, hidden): column split, no communication in the forward;
        # GELU is elementwise, so each rank keeps its slice of the intermediate activations.
        {"patterns": [r".*\.mlp\.dense_h_to_4h\.weight$"], "partition_type": "column"},
        # MLP down-projection, weight (hidden, 4*hidden): row split over the same slice, then all-reduce.
        {"patterns": [r".*\.mlp\.dense_4h_to_h\.weight$"], "partition_type": "row"},
    ]


def builtin_partition_config():
    """DeepSpeed's partition_config object: only these specs apply (no preset merged in)."""
    return {"use_default_specs": False, "layer_specs": gpt_neox_layer_specs()}


# ---- 2. Rank layout: tp x dp, and the DP size DeepSpeed needs for its batch arithmetic -----------

@dataclass(frozen=True)
class Layout:
    """Where one rank sits in the (dp, tp) grid. DeepSpeed builds the same grid from autotp_size:
    TP groups are consecutive ranks, DP groups are strided by tp."""
    rank: int
    world_size: int
    tp: int
    dp: int

    @property
    def tp_rank(self):
        return self.rank % self.tp

    @property
    def dp_rank(self):
        return self.rank // self.tp


def resolve_layout(rank, world_size, tp=None, dp=None):
    """Fill in a missing tp or dp from the world size, then check tp x dp = world size."""
    if tp is None and dp is None:
        tp, dp = world_size, 1
    elif tp is None:
        tp = world_size // dp if world_size % dp == 0 else 0
    elif dp is None:
        dp = world_size // tp if world_size % tp == 0 else 0
    if tp <= 0 or dp <= 0 or tp * dp != world_size:
        raise UsageError(f"--tp_size x --dp_size must equal the number of processes ({world_size}); "
                         f"got tp={tp or '?'}, dp={dp or '?'}")
    return Layout(rank, world_size, tp, dp)


class BatchSizeMPU:
    """The one thing deepspeed.initialize asks an `mpu` before AutoTP builds its groups: the DP world size,
    to check the batch arithmetic. Without one it counts every rank as a DP replica, tp times too many.
    The engine then replaces it with its own AutoTP groups, which check_groups compares with this layout."""

    def __init__(self, layout):
        self.layout = layout

    def get_data_parallel_world_size(self):
        return self.layout.dp


# ---- 3. The DeepSpeed config (and the non-finite guard that replaces its bf16 overflow check) ----

def build_ds_config(args, specs, training=True, load_universal=False):
    """The whole DeepSpeed configuration; AutoTP is on because autotp_size is set, nothing else to call.
    training=False: the evaluation-only variant (ZeRO-0, no optimizer states to shard). specs: where the layer
    specs come from ({"partition_config": ...}, {"preset_model": NAME}, or nothing: the model's tp_plan or
    DeepSpeed's parser). load_universal: the checkpoint is in DeepSpeed's universal form (another tp x dp)."""
    stage = args.zero_stage if training else 0
    return {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.max_grad_norm,  # DeepSpeed clips at 1.0 unless told otherwise
        "zero_optimization": {
            "stage": stage,
            # ZeRO-3 splits each TP shard again over the DP group: the export gathers the pieces back
            **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {}),
            # the fp32 master weights, their gradients and AdamW's moments live on the host, which steps them
            # (DeepSpeed's CPU Adam: adamw_factory); the GPU keeps the 16-bit weights
            **({"offload_optimizer": {"device": "cpu"}} if training and args.offload_optimizer else {})},
        # DeepSpeed's bf16 overflow check tests every gradient and waits for the answer before each step: a
        # host sync per step. It is off; in its place the loop keeps mark_non_finite (below) and stops at the
        # first non-finite loss or gradient norm, before any checkpoint is written. Copy this line only
        # together with that guard.
        "bf16": {"enabled": args.precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": args.precision == "fp16", "initial_scale_power": 16},
        "tensor_parallel": {"autotp_size": args.tp_size, **specs,
                            "vocab_parallel_lm_head": args.vocab_parallel,
                            "tp_overlap_comm": args.tp_overlap_comm},
        **({"compile": {"deepcompile": True, "passes": ["autotp"]}} if args.deepcompile else {}),
        "steps_per_print": 10 ** 9,  # this script does its own logging
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
    }


def mark_non_finite(first_bad, step, loss, grad_norm):
    """first_bad becomes step if this step's loss or gradient norm is not finite; no host sync. The
    norm is DeepSpeed's (a device tensor, a float, or None: not computed, or the step was skipped); with
    its bf16 overflow check off, a non-finite gradient reaches the weights, so the run must stop here
    rather than at the next loss."""
    finite = torch.isfinite(loss)
    if grad_norm is not None:
        finite = finite & torch.isfinite(torch.as_tensor(grad_norm, device=loss.device))
    return torch.where(finite, first_bad, first_bad.clamp(max=step))


def applied_grad_norm(engine):
    """The gradient norm of the step just taken, or None when DeepSpeed skipped it on an fp16 loss-scale
    overflow (its norm is infinite by design and no weight changed: no divergence). A step skipped in bf16
    or fp32 had a non-finite gradient (ZeRO-3 checks whatever check_grad_overflow says): a divergence."""
    if engine.was_step_applied():
        return engine.get_global_grad_norm()
    return None if engine.fp16_enabled() else math.inf


def check_finite(first_bad):
    """Stop every rank at the first step where any rank's loss or gradient norm was not finite. Syncs
    the host."""
    first_bad = first_bad.clone()
    dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    if math.isfinite(first_bad.item()):
        raise Diverged(f"the loss or gradient norm is not finite at step {int(first_bad.item())}: "
                       "lower --learning_rate, try --precision fp32, or resume from the last checkpoint "
                       "(none is written after this)")


# ---- 4. deepspeed.initialize ---------------------------------------------------------------------

def adamw_factory(args, on_host=False):
    """The optimizer, as a factory: deepspeed.initialize calls it after AutoTP has swapped in the sharded
    layers, so it sees the parameters that will really train. Matrices decay; biases and norms do not.
    on_host (the optimizer offloaded): DeepSpeed's CPU Adam, the same AdamW (decoupled decay) with the same
    groups and hyperparameters, the only one ZeRO-Offload takes from the caller."""
    def build(params):
        params = list(params)
        param_groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        if on_host:  # its C++ op is compiled at first use (a minute or two) and cached
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(param_groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                    adamw_mode=True)
        # fused: one kernel for the whole update instead of a few per tensor list (GPU only)
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(param_groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                 fused=fused)
    return build


def offloads_optimizer(ds_config):
    """Whether DeepSpeed steps the optimizer on the host (offload_optimizer to the CPU or NVMe) and so wants
    its CPU Adam (unless the config says zero_force_ds_cpu_optimizer: false)."""
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
    return device in ("cpu", "nvme") and ds_config.get("zero_force_ds_cpu_optimizer", True)


def warmup_cosine_factory(args):
    """The LR schedule, as a factory of the optimizer DeepSpeed wraps: linear warmup, then cosine decay."""
    return lambda optimizer: transformers.get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=max(args.num_steps, 1))


def build_engine(model, args, layout, ds_config, optimizer=None, training=True):
    """deepspeed.initialize: AutoTP shards the model where it stands, then the engine moves the shards to the
    device and wraps the optimizer in ZeRO; then the per-rank head counts for model code that reads them.
    training=False (with build_ds_config(training=False)): no optimizer, fp32 master weights or its state."""
    # an optimizer or scheduler in the config (a DeepSpeed config of your own) is DeepSpeed's to build
    own_optimizer = training and "optimizer" not in ds_config
    optimizer = (optimizer or adamw_factory(args, offloads_optimizer(ds_config))) if own_optimizer else None
    schedule = warmup_cosine_factory(args) if training and "scheduler" not in ds_config else None
    # at tp=1 DeepSpeed builds no AutoTP groups and would take its DP group from the mpu: it needs none
    mpu = BatchSizeMPU(layout) if layout.tp > 1 else None
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, optimizer=optimizer,
                                           lr_scheduler=schedule, mpu=mpu)
    check_groups(engine, layout)
    localize_head_counts(engine.module, layout.tp)
    return engine


def check_groups(engine, layout):
    """DeepSpeed's groups must be the ones this script's sampler assumes."""
    dp_group = engine.data_parallel_group  # the AutoTP DP group; at tp=1 (no AutoTP groups) the world
    theirs, ours = (dist.get_rank(dp_group), dist.get_world_size(dp_group)), (layout.dp_rank, layout.dp)
    if layout.tp > 1:
        theirs += (groups.get_tensor_model_parallel_rank(), groups.get_tensor_model_parallel_world_size())
        ours += (layout.tp_rank, layout.tp)
    if theirs != ours:
        raise RuntimeError(f"DeepSpeed's (dp_rank, dp, tp_rank, tp) = {theirs}, expected {ours}")


def localize_head_counts(model, tp):
    """After sharding, each module that holds TP layers computes tp times fewer heads than the model's config
    says, and some models' code reads that count in the forward (Phi-3 finds where K starts in its fused QKV
    output from config.num_attention_heads). Such modules get a copy of the config with the per-rank counts;
    the model's own config stays whole (the export writes it)."""
    for module in model.modules():
        if getattr(module, "config", None) is model.config and module is not model and any(
                isinstance(child, TensorParallel_Layer) for child in module.children()):
            module.config = copy.copy(model.config)
            for name in ("num_attention_heads", "num_key_value_heads"):
                if isinstance(getattr(model.config, name, None), int):
                    setattr(module.config, name, getattr(model.config, name) // tp)


# ---- 5. The DP-rank-aware sampler ----------------------------------------------------------------

def make_sampler(dataset, layout, seed):
    """The data contract: ranks of one TP group pass the same dp_rank, so they read the same samples;
    DP ranks get disjoint shards of equal length (drop_last), so every rank runs the same number of
    steps; the order is fixed by (seed, epoch). Passing dp_rank, not the global rank, is the point."""
    return DistributedSampler(dataset, num_replicas=layout.dp, rank=layout.dp_rank, shuffle=True, seed=seed,
                              drop_last=True)


def train_batches(dataset, layout, micro_batch, global_batch, seed, device, skip=0):
    """Endless micro-batches for this rank, reshuffled every epoch, after the first `skip` ones (a resumed run
    skips what it already trained on). Optimizer step s takes samples s*G .. (s+1)*G - 1 of the epoch's
    permutation (G: the global batch, micro-batch x accumulation x dp), DP rank d every dp-th of them, so the
    data of each step depends only on seed, epoch and G, not on how G splits into tp x dp, micro-batch and
    accumulation."""
    sampler = make_sampler(dataset, layout, seed)
    per_epoch = len(dataset) // global_batch * (global_batch // (micro_batch * layout.dp))  # micro-batches
    for epoch in count(skip // per_epoch):
        sampler.set_epoch(epoch)
        start = micro_batch * (skip - epoch * per_epoch if epoch == skip // per_epoch else 0)
        indices = list(sampler)[start:per_epoch * micro_batch]
        loader = DataLoader(dataset, batch_size=micro_batch, sampler=indices,
                            pin_memory=device.type == "cuda")
        for batch in loader:
            yield batch["input_ids"].to(device, non_blocking=True)


# ---- 6. One training step ------------------------------------------------------------------------

def train_step(engine, batches):
    """One optimizer step over gradient_accumulation_steps micro-batches; returns this rank's mean
    loss as a device tensor (no host sync)."""
    total = 0.0
    for _ in range(engine.gradient_accumulation_steps()):
        input_ids = next(batches)
        loss = engine(input_ids=input_ids, labels=input_ids).loss  # labels are shifted inside the model
        engine.backward(loss)  # gradients of the shards; ZeRO reduces them over the DP group
        engine.step()  # optimizer + scheduler run only at the accumulation boundary
        total = total + loss.detach()
    return total / engine.gradient_accumulation_steps()


def dp_mean(value, engine, layout):
    """Average a per-rank scalar over the DP group (TP peers already agree). Syncs the host."""
    value = value.detach().clone().float()
    dist.all_reduce(value, group=engine.data_parallel_group)
    return value.item() / layout.dp


# ==== THE RUN: decide everything first (preflight), then do it (execute) ==========================

@dataclass(frozen=True)
class Resume:
    """A checkpoint to continue from: its directory, its run.json, and whether it goes through DeepSpeed's
    universal form (it was written at another tp x dp or ZeRO stage)."""
    path: Path
    meta: dict
    universal: bool


@dataclass(frozen=True)
class Run:
    """What preflight decided before any process group exists. execute only reads it; --dry_run prints it.
    args: the flags with every value derived from them (results.json keeps them)."""
    args: argparse.Namespace
    layout: Layout
    config: transformers.PretrainedConfig
    shapes_only: torch.nn.Module  # the model on the meta device: names and shapes, no memory
    source: "SpecSource"  # where the layer specs come from
    plan: dict | None  # weight -> (spec, global shape, per-rank shape); None: DeepSpeed's parser decides
    layouts: list  # every tp x dp of the world, with its estimated memory per rank
    stats: dict  # parameter counts and FLOPs per token
    training: bool  # False: an evaluation-only launch (no optimizer, no optimizer states)
    ds_config: dict  # the recipe's DeepSpeed config with the user's merged in, as DeepSpeed's reading took it
    resume: Resume | None


def main(argv=None):
    run = preflight(argv)
    return dry_run(run) if run.args.dry_run else execute(run)


def preflight(argv=None):
    """Every decision that needs no process group, each checked before any heavy work: a bad flag, spec,
    layout, DeepSpeed setting or checkpoint ends here, in one line on every rank alike."""
    args = parse_args(argv)
    check_args(args)
    saved = locate_checkpoint(args) if args.resume_from_checkpoint else None
    if saved:  # the model, data and shapes are the checkpoint's, as is the rest of its plan not given again
        args = checkpoint_settings(args, saved[1], given_flags(argv))
    config = load_config(args)
    shapes_only = meta_model(config, args.trust_remote_code)  # the specs are checked on it
    # 1. The layer specs: the built-in GPT-NeoX ones, a spec file, a DeepSpeed preset or the model's tp_plan.
    source = spec_source(args, config, shapes_only)
    # 2. The rank layout, then the values derived from the flags, the layout and the model.
    layout = choose_layout(args, config)
    check_model_fits_tp(config, layout.tp, args.seq_length)
    if tokenizer_name(args) is None and builtin_shape(args.model_name) is None:
        log(layout, f"--model_name {args.model_name} holds no tokenizer: a byte-level BPE of "
                    f"{min(BUILTIN_TOKENIZER_VOCAB, config.vocab_size)} tokens is trained on the training "
                    "text instead (--tokenizer_name gives one)")
    settled = derive_args(args, layout, config, shapes_only, source)
    source = head_kept_whole(source, settled, shapes_only, layout, quiet=args.vocab_parallel is None)
    plan = source.plan(shapes_only, layout.tp, settled.vocab_parallel)
    warn_about_source(source, config, layout, settled)
    if settled.dry_run and plan is None:
        raise UsageError(f"--dry_run needs the specs before deepspeed.initialize, and {source.name} "
                         "decides only inside it: use --verify_tp on a short run instead")
    training = settled.num_steps > 0 or saved is not None  # else evaluation only: no optimizer states
    if training:
        check_fits(settled, config, shapes_only, source, layout, wanted=args.vocab_parallel)
    layouts = layout_table(settled, config, shapes_only, source, layout.world_size,
                           wanted=args.vocab_parallel)
    if not settled.dry_run:
        advise_layout(settled, layouts, layout)
    resume = resume_plan(settled, layout, *saved) if saved else None
    # 3. The DeepSpeed config, yours merged in, checked by DeepSpeed's own reading.
    universal = resume is not None and resume.universal
    ds_config = build_ds_config(settled, source.tensor_parallel, training, universal)
    user = settled.user_deepspeed_config
    if not training and "zero_optimization" in user:  # evaluating runs at ZeRO-0: your stage is for training
        user = deep_merge(user, {"zero_optimization": {"stage": 0}})
    ds_config = merge_user_config(settled, ds_config, user)
    check_ds_config(ds_config, f"--deepspeed_config {args.deepspeed_config}" if args.deepspeed_config
                    else "the DeepSpeed config")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", layout.world_size))
    if layout.tp > local_world:
        log(layout, f"warning: tp={layout.tp} spans more than one node ({local_world} ranks per node): "
                    "TP traffic will cross the network")
    if settled.precision == "bf16" and settled.zero_stage == 0:
        log(layout, "warning: bf16 with ZeRO-0 keeps no fp32 master weights; use --zero_stage 1 or 2")
    return Run(settled, layout, config, shapes_only, source, plan, layouts,
               model_statistics(shapes_only, settled.seq_length), training, ds_config, resume)


def execute(run):
    """Build and train in the recipe's order, reading only `run`: the process group and the data, the sharded
    model (4), the loop (5, 6), then the export and results.json. Returns the results."""
    args, layout = run.args, run.layout
    clock = Clock(layout)  # the start-up, phase by phase, and the peak of host memory
    check_output_dir(args.output_dir)
    device = init_distributed(args.local_rank)
    clock.lap("process group", f"{layout.world_size} ranks on {device.type}")
    resume_path = resume_checkpoint(run) if run.resume else None  # (optional) converted once if need be
    tokenizer, blocks = leader_first(lambda: prepare_data(args, run.config.vocab_size), args.local_rank == 0)
    check_data(run, tokenizer, blocks)
    clock.lap("data", f"{len(blocks['train']):,} training blocks of {args.seq_length} tokens")
    log(layout, describe_run(run, device))
    log(layout, plan_table(run.plan, run.source, layout.tp) if run.plan
                else f"AutoTP partition: {run.source.name}, read off the model once sharded")
    # 4. deepspeed.initialize: AutoTP shards the empty model, ZeRO wraps the optimizer, ranks load shards.
    probe = blocks["train"][0]["input_ids"][None, :VERIFY_TOKENS]  # the first training sequence
    engine, reference = build_sharded_model(run, device, clock, probe if args.verify_tp else None)
    plan = run.plan
    if plan is None:
        plan = run.source.plan(run.shapes_only, layout.tp, args.vocab_parallel, sharded=engine.module)
        log(layout, plan_table(plan, run.source, layout.tp))
    check_partition(engine.module, plan)
    verified = None
    if args.verify_tp:  # (optional) sharded against unsharded, module by module
        verified = verify_tp(engine, probe.to(device), reference, plan, run)
    if resume_path:  # (optional)
        load_checkpoint(engine, resume_path, layout)
        log(layout, f"resumed from {resume_path} after step {run.resume.meta['step']}")
    if args.compile:  # (optional, GPU default) after verify_tp: its hooks read every module's output eagerly
        log(layout, f"torch.compile: {compile_blocks(engine.module)}, compiled during the first step")
    elif args.deepcompile:  # (optional) the whole model, TP collectives in the graph
        engine.compile()
        log(layout, "DeepCompile with the autotp pass: the whole model, compiled during the first step")
    # 5 and 6. The loop: micro-batches from the DP-aware sampler, one train_step per optimizer step.
    history, evals, stopped_by = [], [], None
    if not args.export_only:
        history, evals, stopped_by = train(run, engine, blocks, device, clock)
    export_dir = None
    if args.export_only or (args.num_steps > 0 and not stopped_by and not args.skip_export):  # (optional)
        export_dir = Path(args.output_dir) / "hf"
        export_hf(engine, tokenizer, layout, export_dir)
        log(layout, f"exported the model (all TP shards gathered) to {export_dir}")
    results = collect_results(run, history, evals, clock, verify_tp=verified, stopped_by=stopped_by,
                              resumed_from=resume_path and str(resume_path),
                              export_dir=export_dir and str(export_dir), deepspeed_config=engine.config)
    write_results(results, Path(args.output_dir), layout)
    dist.barrier()  # leave together: a rank tearing down its process group while rank 0 writes can abort it
    return results


# ==== EVERYTHING ELSE: what the recipe needs around it, one concern per section ===================

# ---- Arguments: every knob, its checks, and the values derived from them -------------------------

def parse_args(argv=None):
    return build_parser().parse_args(argv)


def given_flags(argv=None):
    """The flags given on the command line (not left to their defaults), by name: argparse fills in a default
    only where the namespace it parses into has no value yet."""
    parser, unset = build_parser(), object()
    parsed = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset)))
    return {name for name, value in vars(parsed).items() if value is not unset}


class Parser(argparse.ArgumentParser):
    """argparse, its errors raised as UsageError: one line on rank 0, every rank leaving together."""

    def error(self, message):
        raise UsageError(message.replace("argument ", "", 1))


def checked(kind, accept, what):
    """An argparse type: kind(text), refused in one line unless accept(value)."""
    def parse(text):
        value = kind(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


POSITIVE_INT = checked(int, lambda v: v > 0, "positive")
POSITIVE = checked(float, lambda v: v > 0, "positive")
COUNT = checked(int, lambda v: v >= 0, "zero or positive")
NON_NEGATIVE = checked(float, lambda v: v >= 0, "zero or positive")


def existing_file(suffixes=None):
    """An argparse type: a file that exists, is not empty and (given suffixes) is of a kind the run reads; a
    text file must begin as UTF-8 (its first MiB is read; load_text catches a later fault)."""
    def parse(path):
        if suffixes and Path(path).suffix not in suffixes:
            raise argparse.ArgumentTypeError(f"{path}: use one of {', '.join(suffixes)}")
        if not Path(path).is_file():
            raise argparse.ArgumentTypeError(f"{path} does not exist")
        if Path(path).stat().st_size == 0:
            raise argparse.ArgumentTypeError(f"{path} is empty")
        if Path(path).suffix in TEXT_FILE_BUILDERS and Path(path).suffix != ".parquet":
            with open(path, "rb") as f:
                head = f.read(2 ** 20)
            try:
                codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at the end is no fault
            except UnicodeDecodeError as exc:
                raise argparse.ArgumentTypeError(not_utf8(path, exc, f"at offset {exc.start}")) from None
        return path
    return parse


def not_utf8(path, exc, where):
    return (f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} {where}): convert it, e.g. "
            f"iconv -f latin1 -t utf-8 {path} > {Path(path).stem}.utf8{Path(path).suffix}")


def known_model(name):
    """An argparse type: --model_name, with a builtin: shape that exists."""
    shape = builtin_shape(name)
    if shape is not None and shape not in BUILTIN_SHAPES:
        raise argparse.ArgumentTypeError(f"unknown built-in model {shape!r}: "
                                         f"use one of {', '.join(BUILTIN_SHAPES)}")
    return name


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default said once: argparse's value, unless the help says the default itself (one that
    depends on the run) or there is none."""

    def _get_help_string(self, action):
        if "default" in action.help.lower() or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    """Every knob, with its help and its check. The defaults that depend on the machine (the model and the
    sequence length) are taken here, so that --help shows them."""
    gpu = torch.cuda.is_available()
    p = Parser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    # model
    a("--model_name", type=known_model, default=BUILTIN_PREFIX + ("pythia-410m" if gpu else "tiny"),
      help=f"hub id, local directory, or builtin:NAME (random weights; NAME in {', '.join(BUILTIN_SHAPES)}); "
           "builtin:pythia-410m on a machine with a GPU, builtin:tiny without")
    a("--tokenizer_name", default=None, help="tokenizer to use instead of the model's own")
    a("--random_init", action="store_true",
      help="build a hub/local model from its config with random weights")
    a("--shard_on_load", action=argparse.BooleanOptionalAction, default=None,
      help="slice the empty model on the host and write each rank's shards straight to its device, so that "
           "no device ever holds the whole model. Default: on where the model's weights do not fit "
           f"{100 * STAGING_FRACTION:.0f}%% of one GPU's free memory, and on CPU; --no-shard_on_load stages "
           "it on the GPU")
    a("--trust_remote_code", action="store_true", help="allow model/tokenizer code from the hub")
    a("--partition_config", default=None,
      help="where the layer specs come from: a JSON file (DeepSpeed's partition_config), preset:NAME "
           f"(DeepSpeed's presets: {', '.join(PRESETS)}), tp_plan (the model's Hugging Face tp_plan) or "
           "autotp_parser (DeepSpeed's automatic parser); default: the built-in GPT-NeoX specs. README: "
           "Which specs for which model")
    a("--dry_run", action="store_true", help="print how the specs shard every Linear and the memory per "
      "rank, then stop: no GPU, no weights, no data")
    a("--verify_tp", action="store_true", help="before training, compare the sharded model with the "
      "unsharded one on the first training sequence, module by module; stop if they differ")
    # parallelism
    a("--tp_size", type=POSITIVE_INT, default=None,
      help="tensor-parallel ranks per model replica (default: world_size / dp_size; when neither is given, "
           "the largest divisor of world_size that the model's heads and MLP width divide into)")
    a("--dp_size", type=POSITIVE_INT, default=None, help="DP replicas (default: world_size / tp_size)")
    a("--world_size", type=POSITIVE_INT, default=None, help="with --dry_run: the number of ranks to lay out "
      "(default: --tp_size x --dp_size); every tp x dp of it is listed with its memory per rank")
    a("--gpu_memory_gib", type=POSITIVE, default=None, help="memory of one GPU, for the layouts of --dry_run "
      "and the default micro-batch (default: this machine's GPU)")
    a("--zero_stage", type=int, default=None, choices=[0, 1, 2, 3],
      help="DeepSpeed ZeRO stage: 2 partitions gradients and optimizer states over the DP group, 3 the "
           "weights too (each TP shard again over DP). Default: your --deepspeed_config's stage, else 2")
    a("--offload_optimizer", action="store_true",
      help="keep the fp32 master weights, their gradients and AdamW's moments in host memory and step them "
           "there (DeepSpeed's CPU Adam): the GPU keeps the 16-bit weights. Needs ZeRO 1, 2 or 3 and about "
           "18 bytes of host memory per parameter a rank holds (on too where your --deepspeed_config "
           "offloads it)")
    # DeepSpeed's TP accelerations (tensor_parallel and compile sections of its config)
    a("--vocab_parallel", action=argparse.BooleanOptionalAction, default=None,
      help="split the output head by vocabulary over the TP ranks and compute the loss on the shards "
           "(vocab_parallel_lm_head): 1/tp of the head's weights, gradients, optimizer state and logits per "
           "rank. Default: on where it applies (tp > 1 dividing the vocabulary, an untied head, no "
           "--deepcompile)")
    a("--tp_overlap_comm", action="store_true", help="overlap the all-reduce of each column-parallel layer's "
      "input gradient with its weight-gradient matmul in the backward pass")
    a("--deepcompile", action="store_true",
      help="DeepCompile with its autotp pass (CPU only): the TP collectives become graph ops and the whole "
           "model compiles to one graph, in place of --compile's per-block graphs")
    a("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
      help="set by the deepspeed launcher; torchrun sets LOCAL_RANK instead")
    # data
    a("--dataset_name", default=None, help="Hugging Face datasets name, e.g. wikitext")
    a("--dataset_config_name", default=None, help="its configuration: wikitext-103-raw-v1")
    a("--train_file", type=existing_file(TEXT_FILE_BUILDERS), default=None,
      help="txt (one document per paragraph), json/jsonl, csv or parquet")
    a("--validation_file", type=existing_file(TEXT_FILE_BUILDERS), default=None,
      help="same formats; default: hold out part of the training text")
    a("--text_column", default="text", help="column holding the text")
    a("--validation_split_percentage", default=5.0,
      type=checked(float, lambda v: 0 < v < 100, "between 0 and 100"),
      help="documents held out for evaluation when there is no validation split or file")
    a("--preprocessing_num_workers", type=POSITIVE_INT, default=None,
      help="processes for tokenization (default: half the cores, at most 8, for 8,000 documents or more)")
    a("--cache_dir", default=os.path.join(Path.home(), ".cache", "autotp_custom_patterns"),
      help="where the embedded corpus and trained tokenizers are kept")
    # optimisation
    a("--batch_size", type=POSITIVE_INT, default=None,
      help="micro-batch per rank (sequences). Default: 1 on CPU; on a GPU the largest power of two whose "
           "activations fit beside the model states (estimated, printed)")
    a("--gradient_accumulation_steps", type=POSITIVE_INT, default=1, help="micro-batches per step")
    a("--seq_length", type=checked(int, lambda v: v >= 2, "at least 2 (a token and the next one to predict)"),
      default=2048 if gpu else 512,
      help="tokens per training sequence: 2048 on a machine with a GPU, 512 without")
    a("--num_steps", type=COUNT, default=50, help="optimizer steps; 0 evaluates only")
    a("--learning_rate", type=POSITIVE, default=1e-4, help="peak learning rate (AdamW)")
    a("--weight_decay", type=NON_NEGATIVE, default=0.01,
      help="AdamW weight decay for matrices (not biases, norms)")
    a("--warmup_steps", type=COUNT, default=None,
      help="linear warmup steps before cosine decay (default 10%%)")
    a("--max_grad_norm", type=NON_NEGATIVE, default=1.0, help="clip the global gradient norm; 0 disables")
    a("--precision", default="bf16", choices=list(DTYPES), help="training dtype")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile each transformer block and the loss (after AutoTP has sharded them): faster steps "
           "once the first one has paid for the compilation. Default: on with CUDA GPUs, off on CPU")
    a("--activation_checkpointing", action="store_true",
      help="recompute each layer's activations in the backward pass: less memory, ~30%% more compute")
    a("--seed", type=int, default=42, help="seed of the weights, data order and tokenizer")
    # reporting
    a("--log_interval", type=POSITIVE_INT, default=5, help="log every N steps (each log syncs the host)")
    a("--eval_interval", type=COUNT, default=25,
      help="evaluate every N steps (and at the end); 0: only at the end")
    a("--peak_tflops", type=POSITIVE, default=None,
      help="accelerator peak TFLOP/s for MFU (default: detected)")
    a("--report_to", default=None, choices=list(MONITORS),
      help="also send the logged metrics to this DeepSpeed monitor (files under <output_dir>/monitor; other "
           "monitor settings through --deepspeed_config)")
    a("--deepspeed_config", type=existing_file(), default=None,
      help="a DeepSpeed config (JSON) merged into the one the script builds: its settings win, except those "
           "the script sets from its flags (micro-batch, accumulation, clipping, precision, ZeRO stage, "
           "tensor_parallel, compile), which must agree with them")
    a("--output_dir", default="output",
      help="results.json, loss_curve.png, checkpoints/ and the exported Hugging Face model hf/")
    # checkpoints and export
    a("--save_interval", type=COUNT, default=0,
      help="write a DeepSpeed checkpoint every N steps and at the last step; 0: only on SIGTERM/SIGINT")
    a("--keep_last", type=COUNT, default=2, help="checkpoints kept on disk (the newest); 0 keeps all")
    a("--resume_from_checkpoint", default=None,
      help="continue from a checkpoint: its directory, a checkpoints/ directory, or 'latest' "
           "(<output_dir>/checkpoints); on another tp x dp or ZeRO stage through a universal checkpoint")
    a("--export_only", action="store_true",
      help="with --resume_from_checkpoint: write the Hugging Face model to <output_dir>/hf and stop")
    a("--skip_export", action="store_true", help="do not write <output_dir>/hf at the end of training")
    return p


def builtin_shape(name):
    """NAME of a --model_name builtin:NAME (a Pythia shape with random weights), else None."""
    return name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else None


def check_args(args):
    """The checks argparse cannot make alone, between flags. Raises UsageError naming the flag to change."""
    if args.world_size and not args.dry_run:
        raise UsageError("--world_size describes the ranks of --dry_run; "
                         "a launch takes its size from the launcher")
    if args.export_only and not args.resume_from_checkpoint:
        raise UsageError("--export_only exports a checkpoint: give --resume_from_checkpoint too")
    if args.dataset_name and args.train_file:
        raise UsageError("give either --dataset_name or --train_file, not both")


def check_tp_features(args, layout):
    """What DeepSpeed cannot run of the TP accelerations, ZeRO stages and the offloaded optimizer together
    (each error says why; the vocabulary-parallel head's: vocab_parallel_refusal), before any weight loads."""
    if args.offload_optimizer and args.zero_stage == 0:
        raise UsageError("--offload_optimizer (or offload_optimizer in your --deepspeed_config) needs ZeRO: "
                         "use --zero_stage 1, 2 or 3")
    if args.deepcompile and args.zero_stage == 3:
        raise UsageError("--deepcompile cannot be combined with --zero_stage 3: DeepSpeed's autotp pass "
                         "compiles the whole model as one graph, which ZeRO-3's parameter gathering breaks; "
                         "use --zero_stage 1 or 2, or drop --deepcompile")
    wanted = [f"--{name}" for name in ("vocab_parallel", "tp_overlap_comm", "deepcompile")
              if getattr(args, name)]
    if wanted and layout.tp == 1:
        raise UsageError(f"{' and '.join(wanted)} act on tensor-parallel layers: use them with --tp_size > 1")
    if args.deepcompile and torch.cuda.is_available():
        raise UsageError("--deepcompile is refused on GPUs: there its autotp pass lets the weights the TP "
                         "ranks hold whole drift apart (README: Troubleshooting); use --compile")
    if args.deepcompile and (args.tp_overlap_comm or args.compile):
        raise UsageError("--deepcompile cannot be combined with "
                         f"--{'compile' if args.compile else 'tp_overlap_comm'}: "
                         "DeepSpeed's autotp pass " + ("compiles the whole model itself" if args.compile
                                                       else "does not support it"))


def choose_layout(args, config):
    """This rank's place in tp x dp: the sizes given, or tp as large as the model's heads and MLP width allow.
    A plain `python ... --dry_run` lays out --world_size (or tp x dp) ranks."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.dry_run and "WORLD_SIZE" not in os.environ:
        world = args.world_size or (args.tp_size or 1) * (args.dp_size or 1)
    tp = args.tp_size or (None if args.dp_size else max(fitting_tps(config, world)))
    layout = resolve_layout(int(os.environ.get("RANK", 0)), world, tp, args.dp_size)
    if args.tp_size is None and args.dp_size is None and tp < world:
        log(layout, f"tp {tp} x dp {world // tp}: the model's heads and MLP width do not divide into {world} "
                    "TP ranks")
    return layout


def derive_args(args, layout, config, shapes_only, source):
    """The flags with every value that follows from them, the machine, the layout and the model, in a new
    namespace that nothing changes afterwards. A default that does not apply to this model or layout is
    turned off with one line saying why, never refused."""
    user = user_ds_config(args)  # kept in each checkpoint's run.json too
    args = argparse.Namespace(**vars(args) | {
        "user_deepspeed_config": user,
        "zero_stage": dig(user, "zero_optimization.stage", 2) if args.zero_stage is None else args.zero_stage,
        "offload_optimizer": args.offload_optimizer or dig(
            user, "zero_optimization.offload_optimizer.device", None) in ("cpu", "nvme")})
    check_tp_features(args, layout)
    why_not = vocab_parallel_refusal(args, config, shapes_only, source, layout.tp)
    if args.vocab_parallel and why_not:
        raise UsageError(f"--vocab_parallel cannot apply: {why_not}; use --no-vocab_parallel")
    if args.vocab_parallel is None and why_not and layout.tp > 1:
        log(layout, f"the output head stays whole on every TP rank (--vocab_parallel is off): {why_not}")
    derived = {"tp_size": layout.tp, "dp_size": layout.dp,
               "vocab_parallel": why_not is None if args.vocab_parallel is None else args.vocab_parallel,
               "compile": decide_compile(args, shapes_only),
               "warmup_steps": args.num_steps // 10 if args.warmup_steps is None else args.warmup_steps,
               "micro_batch_sized": args.batch_size is None and torch.cuda.is_available()}
    derived["batch_size"] = args.batch_size or 1
    if derived["micro_batch_sized"]:
        sized = argparse.Namespace(**vars(args) | derived)
        derived["batch_size"] = default_micro_batch(sized, config, layout)
    derived["global_batch_size"] = derived["batch_size"] * args.gradient_accumulation_steps * layout.dp
    derived["tokens_per_step"] = derived["global_batch_size"] * args.seq_length
    return argparse.Namespace(**vars(args) | derived)


def vocab_parallel_refusal(args, config, shapes_only, source, tp):
    """Why the vocabulary-parallel head cannot apply at this tp, or None where it does. DeepSpeed splits a
    head whose name is in the spec source's lm_head_patterns (by default its own)."""
    heads = (source.tp_config and source.tp_config.lm_head_patterns) or AutoTPConfig().lm_head_patterns
    head = shapes_only.get_output_embeddings()
    name = next((n for n, m in shapes_only.named_modules() if m is head), "").split(".")[-1]
    if tp == 1:
        return "tp is 1"
    if args.deepcompile:
        return "DeepCompile's autotp pass cannot take it"
    if config.vocab_size % tp:
        return f"tp {tp} does not divide the {config.vocab_size}-token vocabulary"
    if not isinstance(head, torch.nn.Linear) or name not in heads:
        return f"the model has no Linear output head named {' or '.join(heads)}"
    if head.weight is shapes_only.get_input_embeddings().weight:
        return "the output head shares its weight with the input embedding"
    return None


def fitting_tps(config, world_size):
    """The tp sizes of this world that the model's heads and MLP width divide into."""
    return [tp for tp in range(1, world_size + 1) if world_size % tp == 0 and tp_misfit(config, tp) is None]


# ---- A DeepSpeed config of your own (--deepspeed_config) and DeepSpeed's monitors (--report_to) --

# What the script sets from its flags: a config of the user's may repeat these values, not change them.
SCRIPT_OWNED = {
    "train_micro_batch_size_per_gpu": "--batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "train_batch_size": "--batch_size, --gradient_accumulation_steps and dp",
    "gradient_clipping": "--max_grad_norm", "bf16.enabled": "--precision", "fp16.enabled": "--precision",
    "zero_optimization.stage": "--zero_stage",
    "tensor_parallel": "--tp_size, --partition_config, --vocab_parallel or --tp_overlap_comm",
    "compile": "--deepcompile"}


def read_json(path, flag):
    """A JSON file a user gave with `flag`: its content, or one line saying where it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} {path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{flag} {path} cannot be read ({exc.strerror})") from None


def user_ds_config(args):
    """The settings to merge into the script's DeepSpeed config: --deepspeed_config's, and the monitor that
    --report_to asks for (files under <output_dir>/monitor). A monitor whose package is missing is refused."""
    config = {}
    if args.deepspeed_config:
        config = read_json(args.deepspeed_config, "--deepspeed_config")
        if not isinstance(config, dict):
            raise UsageError(f"--deepspeed_config {args.deepspeed_config} is not a DeepSpeed config (a JSON "
                             f"object of its sections, e.g. {{\"zero_optimization\": {{...}}}}), got a "
                             f"{type(config).__name__}")
    if args.report_to:
        section = config.setdefault(args.report_to, {})
        section.setdefault("enabled", True)
        if args.report_to in ("tensorboard", "csv_monitor"):
            section.setdefault("output_path", str(Path(args.output_dir) / "monitor"))
            section.setdefault("job_name", "train")
    for name, package in MONITORS.items():
        enabled = isinstance(config.get(name), dict) and config[name].get("enabled")
        if enabled and package and importlib.util.find_spec(package) is None:
            raise UsageError(f"the {name} monitor needs the {package} package: pip install {package}")
    return config


def merge_user_config(args, ours, theirs):
    """A user's DeepSpeed config merged over the script's, key by key: theirs wins, except where the script's
    flags set the value (SCRIPT_OWNED): the same value is fine, another one is refused, naming the flag."""
    for key, flag in SCRIPT_OWNED.items():
        value = dig(theirs, key)
        mine = args.global_batch_size if key == "train_batch_size" else dig(ours, key)
        if isinstance(value, dict) and isinstance(mine, dict):  # a script's section: each key must agree
            key, value, mine = next(((f"{key}.{k}", v, mine.get(k, MISSING)) for k, v in value.items()
                                     if mine.get(k, MISSING) != v), (key, MISSING, mine))
        if value is MISSING or value == mine:
            continue
        raise UsageError(f"--deepspeed_config sets {key} to {json.dumps(value)}, the script's flags to "
                         f"{'nothing' if mine is MISSING else json.dumps(mine)}: set it with {flag} instead")
    return deep_merge(ours, theirs)


MISSING = object()


def training_settings(user_config):
    """A user's DeepSpeed settings that a resumed run must repeat: all but the monitors."""
    return {k: v for k, v in (user_config or {}).items() if k not in MONITORS}


def dig(config, dotted, default=MISSING):
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return default
        config = config[part]
    return config


def deep_merge(base, over):
    merged = dict(base)
    for key, value in over.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = deep_merge(base[key], value) if both_dicts else value
    return merged


def check_ds_config(ds_config, where):
    """DeepSpeed's own reading of the merged config (DeepSpeedConfig, no process group needed): what it
    rejects, and top-level keys it never reads (a misspelt section it would ignore), each a one-line error."""
    read = set()

    class Reading(dict):  # records the keys DeepSpeed looks at
        def get(self, key, *default):
            read.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            read.add(key)
            return super().__contains__(key)

    config = Reading({k: v for k, v in ds_config.items() if k != "train_batch_size"})  # already checked vs dp
    try:
        DeepSpeedConfig(config)
    except Exception as exc:  # pydantic's ValidationError, DeepSpeed's asserts: the message is what counts
        raise UsageError(f"{where}: DeepSpeed rejects the resulting config: "
                         f"{' '.join(str(exc).split())[:400]}")
    unread = sorted(set(config) - read)
    if unread:
        raise UsageError(f"{where}: DeepSpeed does not read {unread} "
                         "(misspelt? it would ignore them silently)")


def report(engine, prefix, record):
    """The logged figures to the DeepSpeed monitors the config enables (rank 0 writes), against the step."""
    if engine.monitor.enabled:
        engine.monitor.write_events([(f"{prefix}/{name}", value, record["step"])
                                     for name, value in record.items()
                                     if name != "step" and value is not None])


# ---- Where the specs come from, and the partition plan, checked before any weight loads ----------

@dataclass(frozen=True)
class SpecSource:
    """Where the layer specs come from, as DeepSpeed will read them: the entries of its config's
    tensor_parallel section, and its AutoTPConfig of the specs (None: its parser decides, in initialize)."""
    name: str
    tensor_parallel: dict
    tp_config: AutoTPConfig | None
    every_spec_matches: bool = True  # not for a converted tp_plan: it lists names with and without the
    #                                  model's prefix, and norms, which the plan of Linears does not cover

    @classmethod
    def of(cls, name, partition_config, every_spec_matches=True):
        """The source of a partition_config: DeepSpeed reads it from the config, and so does the plan."""
        return cls(name, {"partition_config": partition_config}, autotp_config(partition_config),
                   every_spec_matches)

    def plan(self, model, tp, vocab_parallel=False, sharded=None):
        """plan_partition of these specs on the shapes-only model; where DeepSpeed's parser decides, the plan
        read off the `sharded` model (the layer types it swapped in), or None before there is one."""
        if self.tp_config:
            return plan_partition(model, self.tp_config, tp, vocab_parallel, self.every_spec_matches)
        if sharded is None:
            return None
        layers = {name: type(m) for name, m in sharded.named_modules() if isinstance(m, TensorParallel_Layer)}
        return walk_plan(model, tp, lambda name, _: parser_spec(layers[name]) if name in layers else None)


PRESETS = [name for name in vars(AutoTPPresets)
           if not name.startswith("_") and AutoTPPresets.get_preset(name)]


def spec_source(args, config, shapes_only):
    """The SpecSource --partition_config names (its --help lists them; none: the built-in GPT-NeoX specs).
    DeepSpeed's own objects read each (AutoTPPresets, TPPlanConverter, AutoTPConfig); none is copied here."""
    given, model_type = args.partition_config, config.model_type
    hf_plan = _get_hf_tp_plan(shapes_only)
    if given is None:
        if model_type != "gpt_neox":
            hint = " tp_plan (the model's own)," if hf_plan else ""
            raise UsageError(f"the built-in layer specs are for GPT-NeoX; for {model_type} pass "
                             f"--partition_config with a spec file,{hint} or preset:NAME "
                             f"({', '.join(PRESETS)}); README: Which specs")
        return SpecSource.of("the built-in GPT-NeoX specs", builtin_partition_config())
    if given.startswith("preset:"):
        name = given.split(":", 1)[1]
        if name not in PRESETS:
            raise UsageError(f"--partition_config {given}: DeepSpeed has no AutoTP preset {name!r}; it has "
                             f"{', '.join(PRESETS)}")
        return SpecSource(f"DeepSpeed's preset {name}", {"preset_model": name},
                          AutoTPPresets.get_preset(name))
    if given == "tp_plan":
        if not hf_plan:
            raise UsageError(f"--partition_config tp_plan: {model_type} has no Hugging Face tp_plan; use a "
                             "spec file, preset:NAME or autotp_parser")
        try:
            specs = TPPlanConverter.convert(hf_plan)
        except ValueError as exc:  # a style DeepSpeed cannot convert: it would refuse the whole plan too
            raise UsageError(f"--partition_config tp_plan: DeepSpeed cannot convert {model_type}'s tp_plan: "
                             f"{str(exc).split('. ')[0]}; write a spec file (README: Adapt it to your model)")
        return SpecSource("the model's Hugging Face tp_plan", {}, AutoTPConfig(layer_specs=specs),
                          every_spec_matches=False)
    if given == "autotp_parser":
        if hf_plan:
            raise UsageError(f"--partition_config autotp_parser: DeepSpeed uses {model_type}'s Hugging Face "
                             "tp_plan when there is one, never its automatic parser: "
                             "use --partition_config tp_plan")
        for name, module in shapes_only.named_modules():  # the parser would split every projection
            if type(module).__name__ == "Conv1D":
                check_splits_as_linear(name, module)
        return SpecSource("DeepSpeed's automatic parser", {}, None)
    if not Path(given).is_file():
        raise UsageError(f"--partition_config {given} is no file, nor preset:NAME, tp_plan or autotp_parser")
    return SpecSource.of(f"the spec file {given}", load_partition_config(given))


def head_kept_whole(source, args, shapes_only, layout, quiet):
    """The source, or, where its own specs (a preset's, a tp_plan's) split the output head over a tp that
    does not divide it and the vocabulary-parallel head is off, the same specs behind one that keeps the head
    whole, as the built-in specs leave it (one line says so, unless derive_args did)."""
    head = shapes_only.get_output_embeddings()
    name = next((n for n, m in shapes_only.named_modules() if m is head), None)
    spec = source.tp_config and name and source.tp_config.find_matching_spec(name + ".weight",
                                                                              shapes_only.config.model_type)
    if (args.vocab_parallel or not spec or spec.partition_type == PartitionType.SKIP
            or head.weight.shape[spec.get_partition_dim()] % layout.tp == 0):
        return source
    if not quiet:
        log(layout, f"the output head stays whole on every TP rank: {source.name} splits it, and tp "
                    f"{layout.tp} does not divide its {head.weight.shape[spec.get_partition_dim()]} rows")
    specs = [{k: v.value if isinstance(v, PartitionType) else v for k, v in dataclasses.asdict(s).items()
              if v is not None} for s in source.tp_config.layer_specs]
    whole = {"patterns": [rf"^{re.escape(name)}\.weight$"], "partition_type": "skip"}
    kept = {k: v for k, v in dataclasses.asdict(source.tp_config).items()
            if k not in ("tp_size", "layer_specs")}
    partition_config = kept | {"layer_specs": [whole, *specs]}
    # the source's own head spec now matches nothing: not a fault here
    return SpecSource.of(source.name, partition_config, every_spec_matches=False)


# What each spec source was measured to do on tiny random models at tp 2 and 4, per model type: None, it
# passes --verify_tp and keeps the whole weights in step for three training steps; a reason: it is wrong
# there. A spec file is named by its file name. "<type>, grouped-query" is looked up first for such models.
QK_NORMS = "q_norm and k_norm need their gradients summed over the TP ranks (the tp_plan does it)"
SOURCE_VERDICTS = {
    "gpt_neox": {"builtin": None, "gpt_neox.json": None, "tp_plan": None},
    "llama": {"llama.json": None, "preset:llama": None, "tp_plan": None},
    "mistral": {"llama.json": None, "preset:llama": None, "tp_plan": None},
    "qwen2": {"llama.json": None, "preset:qwen2": None, "tp_plan": None},
    "qwen3": {"tp_plan": None, "llama.json": QK_NORMS, "preset:qwen2": QK_NORMS},
    "gemma": {"llama.json": None, "preset:llama": None, "tp_plan": None},
    "phi3": {"preset:phi3": None},
    "phi3, grouped-query": {"preset:phi3": "its shape (3, -1) cuts a grouped-query qkv_proj into three equal "
                                           "blocks"},
    "mixtral": {"mixtral.json": None},
    "opt": {"autotp_parser": None},
    "bloom": {"preset:bloom": "the ALiBi biases are built for all heads, not each rank's",
              "autotp_parser": "the ALiBi biases are built for all heads, not each rank's"},
    "falcon": {"autotp_parser": "its row-parallel output is modified in place in the backward pass"}}


def source_verdict(config, key):
    """What SOURCE_VERDICTS says of spec source `key` for this model: None (verified), the reason it is wrong,
    or MISSING (never measured)."""
    verdicts = SOURCE_VERDICTS.get(config.model_type, {})
    if getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads):
        verdicts = verdicts | SOURCE_VERDICTS.get(f"{config.model_type}, grouped-query", {})
    return verdicts.get(key, MISSING)


def warn_about_source(source, config, layout, args):
    """One line where this source was measured wrong for this model type, or has no measurement behind it
    and --verify_tp is not on."""
    given = args.partition_config or "builtin"
    verdict = source_verdict(config, Path(given).name if Path(given).suffix == ".json" else given)
    if verdict is MISSING and not args.verify_tp:
        log(layout, f"warning: {source.name} has not been verified here for {config.model_type}: run once "
                    "with --verify_tp (and watch for the whole weights drifting apart at the first logs)")
    elif verdict not in (None, MISSING):
        log(layout, f"warning: {source.name} was measured wrong for {config.model_type}: {verdict}; "
                    "README: Which specs")


@functools.cache
def parser_spec(layer):
    """The spec of a layer class DeepSpeed's parser swapped in: row-parallel where an all-reduce follows."""
    row = issubclass(layer, (LinearAllreduce, SubParamLinearAllreduce))
    return TPLayerSpec(patterns=[f"({layer.__name__})"], partition_type="row" if row else "column")


PARTITION_CONFIG_KEYS = {f.name for f in dataclasses.fields(AutoTPConfig)}  # DeepSpeed partition_config keys
SPEC_FIELDS = {f.name for f in dataclasses.fields(TPLayerSpec)}  # and those of each of its layer_specs


def load_partition_config(path):
    """--partition_config FILE -> DeepSpeed's partition_config. The file holds that object as it stands in
    a DeepSpeed config ({"layer_specs": [...], "use_default_specs": ..., "strict_mode": ...}), or just the
    list of layer specs; it goes to DeepSpeed as written."""
    data = read_json(path, "--partition_config")
    data = {"layer_specs": data} if isinstance(data, list) else data
    if not isinstance(data, dict) or not isinstance(data.get("layer_specs"), list) or not data["layer_specs"]:
        raise UsageError(f"--partition_config {path}: expected DeepSpeed's partition_config, "
                         f"{{\"layer_specs\": [...]}} with at least one spec, or the list of specs, got "
                         f"{sorted(data) if isinstance(data, dict) else data}")
    unknown = set(data) - PARTITION_CONFIG_KEYS
    if unknown:
        raise UsageError(f"--partition_config {path}: unknown key(s) {sorted(unknown)}; DeepSpeed's "
                         f"partition_config takes {', '.join(sorted(PARTITION_CONFIG_KEYS))}")
    autotp_config(data, f"--partition_config {path}")
    return data


def autotp_config(partition_config, where="--partition_config"):
    """DeepSpeed's own reading of a partition_config (AutoTPConfig.from_dict, which deepspeed.initialize
    uses), after checking what it would take silently (an unknown or misspelt field: ignored) or fail on only
    later (a pattern that is no regular expression)."""
    for i, spec in enumerate(partition_config["layer_specs"]):
        here = f"{where} layer spec {i}"
        if not isinstance(spec, dict) or set(spec) - SPEC_FIELDS:
            unknown = sorted(set(spec) - SPEC_FIELDS) if isinstance(spec, dict) else spec
            raise UsageError(f"{here}: unknown field(s) {unknown}; DeepSpeed knows "
                             f"{', '.join(sorted(SPEC_FIELDS))}")
        if not spec.get("patterns") or not all(isinstance(p, str) for p in spec["patterns"]):
            raise UsageError(f"{here}: \"patterns\" must be a non-empty list of regular expressions")
        for pattern in spec["patterns"]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"{here}: pattern {pattern!r} is not a valid regular expression ({exc})")
        try:
            AutoTPConfig.from_dict({"layer_specs": [spec]})
        except (ValueError, TypeError) as exc:  # partition_type, shape, partition_dim, checked by DeepSpeed
            raise UsageError(f"{here}: {exc} (partition_type: column, row or skip; "
                             "shape e.g. [[4096, 1024, 1024], -1])")
    return AutoTPConfig.from_dict(partition_config)


def check_spec_shape(name, weight_shape, spec, tp):
    """A `shape` cuts a fused weight into blocks and splits each block over the TP ranks: the blocks
    must add up to the weight, and each must divide by tp."""
    shape, dim = spec.shape, spec.get_partition_dim()
    if shape is None:
        if dim < len(weight_shape) and weight_shape[dim] % tp:
            raise UsageError(f"{name} {tuple(weight_shape)}: dim {dim} ({weight_shape[dim]}) does not divide "
                             f"by --tp_size {tp}")
        return
    if len(shape) != len(weight_shape):
        return  # a reshape of another rank (e.g. experts): DeepSpeed checks it
    blocks = (list(shape[dim]) if isinstance(shape[dim], tuple)
              else [weight_shape[dim] // max(shape[dim], 1)] * shape[dim])
    if sum(blocks) != weight_shape[dim] or any(b % tp for b in blocks):
        raise UsageError(f"{name} {tuple(weight_shape)}: shape {json.dumps(shape)} splits dim {dim} into "
                         f"blocks {blocks}, which must add up to {weight_shape[dim]} and each divide by "
                         f"--tp_size {tp}")


def describe_spec(spec):
    return spec.partition_type.value + (f", shape={json.dumps(spec.shape)}" if spec.shape else "")


def expected_local_shape(global_shape, spec, tp):
    """Per-rank shape of a weight (or bias: 1-D) under `spec`: column splits dim 0, row splits dim 1;
    a row-parallel bias is not split (it is added once, after the all-reduce)."""
    if spec is None or spec.partition_type == PartitionType.SKIP:
        return tuple(global_shape)
    dim = spec.get_partition_dim()  # past a bias's one dimension: not split
    return tuple(n // tp if d == dim else n for d, n in enumerate(global_shape))


# The output head under --vocab_parallel: DeepSpeed splits it by vocabulary before any spec is consulted.
VOCAB_PARALLEL_HEAD = TPLayerSpec(patterns=["(the output head, --vocab_parallel)"],
                                  partition_type=PartitionType.COLUMN)


def walk_plan(model, tp, spec_for):
    """Map every parameter of the modules AutoTP routes through the specs (those with a 2-D weight: Linears,
    embeddings) to (spec_for(name, module) or None, global shape, expected per-rank shape)."""
    plan, seen = {}, set()
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and id(weight) not in seen:
            seen.add(id(weight))  # a tied head is its embedding: planned once, under the embedding's name
            spec = spec_for(module_name, module)
            for kind, param in module.named_parameters(recurse=False):
                plan[f"{module_name}.{kind}"] = (spec, tuple(param.shape),
                                                 expected_local_shape(param.shape, spec, tp))
    return plan


def plan_partition(model, tp_config, tp, vocab_parallel=False, every_spec_matches=True):
    """The plan of these specs, matched the way deepspeed.initialize will (AutoTPConfig.find_matching_spec).
    Fails on a spec that matches nothing (unless every_spec_matches is False: SpecSource says when), on a
    transformer-block Linear that no spec covers, and, with strict_mode, on any Linear left unmatched
    (DeepSpeed would fail there, after loading the weights)."""
    def spec_for(module_name, module):
        spec = tp_config.find_matching_spec(module_name + ".weight", model.config.model_type)
        if vocab_parallel and isinstance(module, torch.nn.Linear) and (
                module_name.split(".")[-1] in tp_config.lm_head_patterns):
            spec = VOCAB_PARALLEL_HEAD
        if spec is None and tp_config.strict_mode and not isinstance(module, torch.nn.Embedding):
            raise UsageError(f"partition_config strict_mode: no layer spec matches {module_name}.weight; "
                             "add one (partition_type skip keeps it whole) or drop strict_mode")
        if spec is not None and spec.partition_type != PartitionType.SKIP:
            check_splits_as_linear(module_name, module)
            check_spec_shape(module_name + ".weight", module.weight.shape, spec, tp)
        return spec

    plan = walk_plan(model, tp, spec_for)
    if vocab_parallel and not any(spec is VOCAB_PARALLEL_HEAD for spec, _, _ in plan.values()):
        raise UsageError("--vocab_parallel: this model has no Linear named "
                         f"{' or '.join(tp_config.lm_head_patterns)} (the output heads DeepSpeed can split "
                         "by vocabulary): use --no-vocab_parallel")
    for i, spec in enumerate(tp_config.layer_specs if every_spec_matches else []):
        if not any(planned is spec for planned, _, _ in plan.values()):
            example = next((n for n in plan if n.endswith(".weight") and ".layers." in n),
                           next(iter(plan), "?"))
            excluded = (spec.model_types
                        and f" (its model_types {spec.model_types} leave out {model.config.model_type})")
            raise UsageError(f"layer spec {i} {spec.patterns} matches no Linear weight of this "
                             f"model{excluded or ''}: fix its pattern (names look like {example}; "
                             "--dry_run lists them all)")
    missed = [n for n, (spec, _, _) in plan.items() if spec is None and ".layers." in n]
    if missed:
        raise UsageError(f"no layer spec covers {missed[0]} (and {len(missed) - 1} more): it would stay "
                         "replicated on every TP rank; add a pattern for it")
    return plan


def check_splits_as_linear(module_name, module):
    """DeepSpeed's AutoTP training layers split a torch.nn.Linear, whose weight is (out, in). Other layers
    with a 2-D weight (GPT-2's Conv1D keeps it (in, out)) would be cut on the wrong side: refused."""
    if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        raise UsageError(f"{module_name} is a {type(module).__name__}, not a torch.nn.Linear: DeepSpeed's "
                         "AutoTP training layers split a Linear's (out, in) weight and cannot split this "
                         "one; give it no spec (it stays whole) or use a model whose projections are Linear "
                         "layers (README: Which specs)")


def check_partition(model, plan):
    """After deepspeed.initialize: every planned parameter has its expected local shape."""
    local = {name: local_shape(p) for name, p in model.named_parameters(remove_duplicate=False)}  # tied too
    for name, (_, global_shape, expected) in plan.items():
        if local.get(name) != expected:
            raise RuntimeError(f"AutoTP left {name} as {local.get(name)}, expected {expected} "
                               f"(global {global_shape}); check the layer specs and the DeepSpeed version")


def plan_rows(plan, source):
    """One row per planned weight: its spec (numbered as in the source), type, global and per-rank shape."""
    specs, rows = source.tp_config.layer_specs if source.tp_config else [], []
    for name, (spec, global_shape, local_shape) in plan.items():
        if not name.endswith(".weight"):
            continue
        number = next((f"{i}: " for i, s in enumerate(specs) if s is spec), "")  # none: head or parser spec
        label = "-" if spec is None else number + spec.patterns[0]
        rows.append({"weight": name, "type": spec.partition_type.value if spec else "replicated",
                     "spec": label + (f" shape={json.dumps(spec.shape)}" if spec and spec.shape else ""),
                     "global": global_shape, "per_rank": local_shape})
    return rows


def plan_table(plan, source, tp, every_weight=False):
    """The plan as text, grouped by spec: one line per spec with a count and an example (the training log), or
    every weight (--dry_run)."""
    lines, groups = [f"AutoTP partition (tp={tp}) from {source.name}, global -> per-rank shapes:"], {}
    for r in plan_rows(plan, source):
        groups.setdefault((r["type"], r["spec"]), []).append(r)
    for (kind, spec), group in groups.items():
        if every_weight:
            lines += [f"  {r['weight']:56s} {kind:10s} {spec:46s} {r['global']} -> {r['per_rank']}"
                      for r in group]
        else:
            lines.append(f"  {kind:10s} {spec:46s} {len(group):3d} weight{'s' * (len(group) > 1)}, e.g. "
                         f"{group[0]['weight']} {group[0]['global']} -> {group[0]['per_rank']}")
    return "\n".join(lines)


def tp_misfit(config, tp):
    """What of the model tp does not divide (its heads, its MLP width), or None."""
    for name in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, name, None)
        if heads and heads % tp:
            return f"the {heads} attention heads ({name})"
    if getattr(config, "intermediate_size", None) and config.intermediate_size % tp:
        return f"the MLP width {config.intermediate_size}"
    return None


def check_model_fits_tp(config, tp, seq_length):
    misfit = tp_misfit(config, tp)
    if misfit:
        raise UsageError(f"--tp_size {tp} must divide {misfit}")
    if seq_length > getattr(config, "max_position_embeddings", seq_length):
        raise UsageError(f"--seq_length {seq_length} exceeds the model's maximum of "
                         f"{config.max_position_embeddings} positions")


# ---- Memory per rank: the estimate, the micro-batch it sizes, the layouts it advises; --dry_run ------

GPU_MEMORY_USABLE = 0.85  # of a GPU's memory the estimate may fill: the allocator and NCCL need the rest


def memory_per_rank_gib(local_params, dp, args):
    """Model states per rank: weights in the training dtype (ZeRO-3: 1/dp of them); gradients in the training
    dtype up to ZeRO-1, an fp32 partition (1/dp) from ZeRO-2 on; AdamW's two moments plus fp32 master weights
    (training in 16 bits; ZeRO-0 in bf16 keeps none, so there this is a bound), partitioned over dp from
    ZeRO-1 on. Offloaded (--offload_optimizer), the fp32 gradients, masters and moments live on the host
    ("host": (16 + w) bytes per parameter, 1/dp of them) and the GPU keeps the weights and their gradients in
    the training dtype on their way out (a bound: they are sent in buckets). "total" is the GPU's part."""
    width = DTYPES[args.precision].itemsize
    parts = {"weights": local_params * width / (dp if args.zero_stage == 3 else 1),
             "gradients": local_params * 4 / dp if args.zero_stage >= 2 else local_params * width,
             "optimizer": local_params * (8 + (4 if width < 4 else 0)) / (dp if args.zero_stage >= 1 else 1)}
    if args.offload_optimizer:
        parts |= {"gradients": local_params * width, "optimizer": 0.0}
    parts["total"] = parts["weights"] + parts["gradients"] + parts["optimizer"]
    if args.offload_optimizer:
        parts["host"] = local_params * (16 + width) / dp
    return {k: v / 2 ** 30 for k, v in parts.items()}


def estimated_memory_gib(args, config, tp, dp, vocab_split):
    """Per rank on the GPU, (model states, activations per sequence) in GiB. States: 12 L h^2 block weights
    split over tp, the embedding and the head V h each (the head split too when vocab_split), as
    memory_per_rank_gib counts them; ZeRO-3 adds the weights it gathers for the layers at work (two blocks
    and the head). Activations: s * L * h * (10 + 24 / tp) bytes in the blocks (Korthikanti et al.'s count for
    bf16 without the attention scores, which SDPA never stores; with --activation_checkpointing, each block's
    input and one block's activations) and 8 bytes per token and vocabulary entry for the logits and their
    fp32 loss where --compile fuses it, 16 where not (the fp32 copy, its log-softmax and its gradient stay),
    /tp when split."""
    L, h, V, s = config.num_hidden_layers, config.hidden_size, config.vocab_size, args.seq_length
    head = V * h / (tp if vocab_split else 1)
    local_params = 12 * L * h * h / tp + V * h + head
    states = memory_per_rank_gib(local_params, dp, args)["total"]
    if args.zero_stage == 3 and dp > 1:
        states += (2 * 12 * h * h / tp + head) * DTYPES[args.precision].itemsize / 2 ** 30
    blocks = (2 * L * h + h * (10 + 24 / tp)) if args.activation_checkpointing else L * h * (10 + 24 / tp)
    return states, s * (blocks + (8 if args.compile else 16) * V / (tp if vocab_split else 1)) / 2 ** 30


def gpu_memory_gib(args):
    """The memory of one GPU: --gpu_memory_gib, or this machine's first GPU; None on a machine without one."""
    if args.gpu_memory_gib:
        return args.gpu_memory_gib
    return torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if torch.cuda.is_available() else None


def default_micro_batch(args, config, layout):
    """The largest power of two of sequences whose activations fit beside the model states in
    GPU_MEMORY_USABLE of the GPU's memory (estimated_memory_gib)."""
    states, per_sequence = estimated_memory_gib(args, config, layout.tp, layout.dp, args.vocab_parallel)
    fits = int((GPU_MEMORY_USABLE * gpu_memory_gib(args) - states) // per_sequence)
    return 2 ** int(math.log2(fits)) if fits >= 1 else 1


def remedies(args):
    """What else a run can be where it does not fit as asked, in the order layout advice tries them: ZeRO-3
    also partitions the weights (it pays from dp 2 on; eager, as compile is off under it), then the
    optimizer's states go to the host (which needs a ZeRO optimizer). Name -> (the settings it changes, its
    flags)."""
    zero = {"zero_stage": 2} if args.zero_stage == 0 else {}
    return {"as asked": ({}, ""), "ZeRO-3": ({"zero_stage": 3, "compile": False}, "--zero_stage 3"),
            "optimizer offloaded": ({"offload_optimizer": True} | zero,
                                    "--zero_stage 2 " * bool(zero) + "--offload_optimizer")}


def layout_table(args, config, shapes_only, source, world_size, wanted):
    """Every tp x dp of this world the model divides into, with its estimated memory per rank at the run's
    micro-batch as asked and with each of the remedies, and whether each fits the GPU (when its memory is
    known). Recommended: the smallest tp that fits as asked, or where none does, the smallest with a remedy
    that fits (`choice` names it). wanted: --vocab_parallel as given (None: where it applies)."""
    memory, rows = gpu_memory_gib(args), []
    for tp in fitting_tps(config, world_size):
        split = wanted is not False and vocab_parallel_refusal(args, config, shapes_only, source, tp) is None
        row = {"tp": tp, "dp": world_size // tp}
        for name, (change, _) in remedies(args).items():
            states, per_sequence = estimated_memory_gib(argparse.Namespace(**vars(args) | change), config, tp,
                                                        world_size // tp, split)
            total = states + args.batch_size * per_sequence
            row[name] = {"gib_per_rank": total, "states_gib": states,
                         "fits": None if memory is None else total <= GPU_MEMORY_USABLE * memory}
        rows.append(row | {"gib_per_rank": row["as asked"]["gib_per_rank"], "fits": row["as asked"]["fits"],
                           "recommended": False, "choice": None})
    for name in remedies(args):
        best = next((r for r in rows if r[name]["fits"]), None)
        if best:
            best["recommended"], best["choice"] = True, name
            break
    return rows


def advise_layout(args, layouts, layout):
    """A run on GPUs that another layout of the same GPUs serves better says so: a smaller tp that fits (TP
    costs throughput per GPU), or where none fits as asked, one with ZeRO-3 or the optimizer offloaded."""
    best = next((r for r in layouts if r["recommended"]), None)
    if best and torch.cuda.is_available() and (best["tp"] < layout.tp or best["choice"] != "as asked"):
        flags = remedies(args)[best["choice"]][1]
        log(layout, f"note: tp {best['tp']} x dp {best['dp']}{' with ' + flags if flags else ''} would fit "
                    f"({best[best['choice']]['gib_per_rank']:.0f} GiB per rank estimated, of "
                    f"{gpu_memory_gib(args):.0f}) and TP costs throughput per GPU (README: TP where it "
                    f"pays): --tp_size {best['tp']} --dp_size {best['dp']} {flags}".rstrip())


def check_fits(args, config, shapes_only, source, layout, wanted):
    """A GPU run whose estimate exceeds the GPU's memory (a sized micro-batch counting as one sequence) is
    refused before any weight loads, in one line naming what would fit: this world's layouts with a remedy,
    activation checkpointing, or more GPUs."""
    if args.dry_run or not torch.cuda.is_available():
        return
    memory = gpu_memory_gib(args)
    usable = GPU_MEMORY_USABLE * memory
    states, per_sequence = estimated_memory_gib(args, config, layout.tp, layout.dp, args.vocab_parallel)
    if states + args.batch_size * per_sequence <= usable:
        return

    def fitting(settings, world):
        rows = layout_table(settings, config, shapes_only, source, world, wanted)
        return [f"tp {r['tp']} x dp {r['dp']}{' ' + flags if flags else ''} ({r[n]['gib_per_rank']:.0f} GiB)"
                for r in rows for n, (_, flags) in remedies(args).items() if r[n]["fits"]]

    one = argparse.Namespace(**vars(args) | {"batch_size": 1 if args.micro_batch_sized else args.batch_size})
    ways = fitting(one, layout.world_size)[:3]
    if not args.activation_checkpointing:
        ways += [f"{w} with --activation_checkpointing" for w in fitting(
            argparse.Namespace(**vars(one) | {"activation_checkpointing": True}), layout.world_size)[:1]]
    for world in (w for w in (2, 4, 8, 16, 32, 64, 128, 256) if w > layout.world_size):
        larger = fitting(one, world)
        if larger:
            ways.append(f"{world} GPUs at {larger[0]}")
            break
    what = (f"the model states alone need {states:.1f} GiB" if states > usable else
            f"{states:.1f} GiB of model states and {args.batch_size} x {per_sequence:.1f} GiB of activations "
            f"need {states + args.batch_size * per_sequence:.1f} GiB")
    raise UsageError(f"{what} per GPU at tp {layout.tp} x dp {layout.dp} (estimate), more than the "
                     f"{usable:.0f} GiB usable of {memory:.0f}: "
                     + (f"what fits: {'; '.join(ways)}" if ways else "nothing fits on 256 GPUs of this size")
                     + " (README: TP where it pays)")


def dry_run(run):
    """--dry_run: every Linear weight with the spec that matched it and its global and per-rank shapes, the
    estimated memory per rank, and every layout of the world. Needs the config only (no weights)."""
    args, layout, plan, source = run.args, run.layout, run.plan, run.source
    total = run.stats["parameters"]
    local = sum(math.prod(plan[n][2]) if n in plan else p.numel()
                for n, p in run.shapes_only.named_parameters())
    rows, table = plan_rows(plan, source), plan_table(plan, source, layout.tp, every_weight=True)
    memory = memory_per_rank_gib(local, layout.dp, args)
    lines = [f"dry run: {args.model_name} ({total / 1e6:,.1f}M parameters), tp={layout.tp}, dp={layout.dp}, "
             f"ZeRO-{args.zero_stage}, {args.precision}", table,
             "memory per rank (estimate, GiB; activations and communication buckets not included): "
             + ", ".join(f"{k} {v:.2f}" for k, v in memory.items())]
    head = [r for r in rows if plan[r["weight"]][0] is VOCAB_PARALLEL_HEAD]
    if head:  # what the whole head would cost on top, per rank
        rest = sum(math.prod(r["global"]) - math.prod(r["per_rank"]) for r in head)
        whole = memory_per_rank_gib(local + rest, layout.dp, args)
        lines.append(f"the vocab-parallel head ({head[0]['global']} -> {head[0]['per_rank']} per rank) saves "
                     f"{whole['total'] - memory['total']:.2f} GiB per rank of weights, gradients and "
                     f"optimizer state, and its logits take 1/{layout.tp} of the memory")
    warnings = [f"warning: {r['weight']} {r['global']} ({math.prod(r['global']) / 1e6:.1f}M parameters, "
                f"{100 * math.prod(r['global']) / total:.0f}% of the model) stays whole on every TP rank"
                for r in rows if r["type"] == "replicated" and math.prod(r["global"]) > 0.02 * total]
    gpu = gpu_memory_gib(args)
    where = (f"{gpu:.0f} GiB ({GPU_MEMORY_USABLE:.0%} usable)" if gpu
             else "a GPU (give --gpu_memory_gib to judge)")
    lines += warnings + [f"layouts of {layout.world_size} ranks at micro-batch {args.batch_size} x "
                         f"{args.seq_length} tokens (estimate: model states + activations, GiB per rank as "
                         f"asked; with ZeRO-3; with the optimizer offloaded), on {where}:"]

    def fit(cell):
        return "" if cell["fits"] is None else ", fits" if cell["fits"] else ", does not fit"

    for r in run.layouts:
        mark = ""
        if r["recommended"]:
            flags = remedies(args)[r["choice"]][1]
            mark = f"   <- recommended: the smallest tp that fits{' with ' + flags if flags else ''}"
        others = [f"{name} {r[name]['gib_per_rank']:.1f}{fit(r[name])}" for name in remedies(args)
                  if name != "as asked"]
        lines.append(f"  tp {r['tp']} x dp {r['dp']}: {r['gib_per_rank']:.1f} GiB per rank{fit(r)}; "
                     + "; ".join(others) + mark)
    log(layout, "\n".join(lines))
    return {"dry_run": rows, "memory_per_rank_gib": memory, "warnings": warnings, "layouts": run.layouts}


# ---- Processes and data: the process group, text, tokenizer, packed blocks -----------------------

def init_distributed(local_rank):
    """Start the process group: NCCL on GPUs, gloo on DeepSpeed's CPU accelerator. A plain
    `python autotp_custom_patterns.py` runs as a world of one."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        # DeepSpeed would JIT-compile a shared-memory all-reduce here (~30 s, needs a compiler);
        # gloo is plenty for CPU runs of small models.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        accelerator.set_device(local_rank)  # before any collective: NCCL binds to the current device
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=60))
    global CPU_GROUP  # a gloo group for the host-side agreements (stop signals, leaving together on an error)
    CPU_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=5))
    return torch.device(accelerator.device_name(local_rank))  # "cpu" on DeepSpeed's CPU accelerator


class LeaderFailed(Exception):
    """A fault (not bad input) on a leader rank, raised on every rank so that all leave together (exit 1)."""


def leader_first(fn, leader):
    """Run fn on the leader ranks (local rank 0: filling the node's caches; rank 0: a conversion), then on the
    others (finding the work done). An error on a leader is raised on every rank, so none waits forever."""
    error, result = None, None
    if leader:
        try:
            result = fn()
        except UsageError as exc:
            error = (True, str(exc))
        except Exception as exc:  # a fault: the leader shows where, and every rank hears of it
            traceback.print_exception(exc)
            error = (False, f"{type(exc).__name__}: {exc}")
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = next((e for e in errors if e is not None), None)
    if failed:
        usage, message = failed
        raise (UsageError if usage else LeaderFailed)(message)
    return result if leader else fn()


def write_atomically(path, text):
    """Nodes sharing a file system may write the same cache file at once: each writes its own."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one


def embedded_corpus(cache_dir, large=False):
    """Text that ships with every Python, one JSON line per document: its English help topics
    (pydoc_data.topics, ~465 KB), or, large, the source of its standard library outside the test folders
    (~12 MB of .py files, enough for full 2048-token batches on a GPU)."""
    path = Path(cache_dir) / f"{'stdlib' if large else 'pydoc_topics'}_{sys.version.split()[0]}.jsonl"
    if not path.exists():
        if large:
            stdlib, docs = Path(os.__file__).parent, []
            skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
            for file in sorted(stdlib.rglob("*.py")):
                if not skip & set(file.relative_to(stdlib).parts):
                    docs.append(file.read_text(encoding="utf-8", errors="replace"))
        else:
            from pydoc_data.topics import topics
            docs = [topics[k] for k in sorted(topics)]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, "".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return str(path)


def load_text(args):
    """A DatasetDict with 'train' and 'validation' splits of raw documents in args.text_column."""
    def load_file(path):
        builder = TEXT_FILE_BUILDERS[Path(path).suffix]
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            return datasets.load_dataset(builder, data_files=path, split="train", **extra)
        except datasets.exceptions.DatasetGenerationError as exc:
            if isinstance(exc.__cause__, UnicodeDecodeError):  # past the part the flag's check read
                raise UsageError(not_utf8(path, exc.__cause__, "past its first MiB")) from None
            raise

    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name,
                                    trust_remote_code=args.trust_remote_code or None)
        train, validation = raw["train"], raw.get("validation")
    else:
        train = load_file(args.train_file or embedded_corpus(args.cache_dir, large=torch.cuda.is_available()))
        validation = None
    if args.validation_file:
        validation = load_file(args.validation_file)
    for name, split in (("training", train), ("validation", validation)):
        if split is not None and args.text_column not in split.column_names:
            raise UsageError(f"the {name} data has no column {args.text_column!r} (it has "
                             f"{', '.join(split.column_names)}): set --text_column")
    if validation is None:
        if len(train) < 2:
            raise UsageError(f"the training data has {len(train)} document(s), too few to hold some out for "
                             "evaluation: give --validation_file or more documents")
        held_out = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        train, validation = held_out["train"], held_out["test"]
    columns = [args.text_column]
    return datasets.DatasetDict(train=train.select_columns(columns),
                                validation=validation.select_columns(columns))


def train_bpe_tokenizer(train_text, text_column, vocab_size, cache_dir):
    """Byte-level BPE trained on the training text (for built-in shapes, which ship no tokenizer).
    Deterministic for the same text, and cached under a key derived from the data's fingerprint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    key = hashlib.sha256(f"{train_text._fingerprint}-{vocab_size}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"bpe-{key}" / "tokenizer.json"
    if not path.exists():
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        batches = (train_text[i:i + 1000][text_column] for i in range(0, len(train_text), 1000))
        tokenizer.train_from_iterator(batches, trainer=trainer, length=len(train_text))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, tokenizer.to_str())
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")


# Files of which a directory holding a tokenizer has at least one (Hugging Face's fast and slow formats)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def tokenizer_name(args):
    """Where the tokenizer comes from: --tokenizer_name, the model's own, or None: a byte-level BPE trained on
    the training text, for built-in shapes and for a model directory that holds no tokenizer."""
    if args.tokenizer_name:
        return args.tokenizer_name
    directory = Path(args.model_name)
    if builtin_shape(args.model_name) is not None or (
            directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES)):
        return None
    return args.model_name


def load_tokenizer(args, raw, vocab_size):
    name = tokenizer_name(args)
    if name is None:
        return train_bpe_tokenizer(raw["train"], args.text_column, min(BUILTIN_TOKENIZER_VOCAB, vocab_size),
                                   args.cache_dir)
    return from_hub(AutoTokenizer.from_pretrained, name, "--tokenizer_name" if args.tokenizer_name
                    else "--model_name", trust_remote_code=args.trust_remote_code)


def pack_into_blocks(raw, tokenizer, seq_length, text_column, num_proc=None):
    """Tokenize, join documents with EOS, cut into full seq_length blocks (no padding; the tail of
    each map batch that does not fill a block is dropped). Cached by `datasets`."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer has no EOS token to separate documents: "
                         "pick another --tokenizer_name")

    def pack(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False, verbose=False)["input_ids"]
        flat = [token for doc in ids for token in doc + [eos]]
        usable = len(flat) // seq_length * seq_length
        return {"input_ids": [flat[i:i + seq_length] for i in range(0, usable, seq_length)]}

    return raw.map(pack, batched=True, batch_size=1000, remove_columns=[text_column], num_proc=num_proc,
                   desc=f"tokenize + pack into {seq_length}-token blocks")


def prepare_data(args, vocab_size):
    """Raw text -> tokenizer -> packed blocks. Run on local rank 0 first (leader_first)."""
    raw = load_text(args)
    for name, split in raw.items():
        if len(split) == 0:
            raise UsageError(f"the {name} data has no documents")
    tokenizer = load_tokenizer(args, raw, vocab_size)
    workers = args.preprocessing_num_workers
    if workers is None and len(raw["train"]) >= 8000:  # worth the processes: half the cores, at most 8
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    blocks = pack_into_blocks(raw, tokenizer, args.seq_length, args.text_column, workers)
    return tokenizer, blocks.with_format("torch")


def check_data(run, tokenizer, blocks):
    """The data fits the model and fills at least one global batch and one evaluation block."""
    args = run.args
    if len(tokenizer) > run.config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens, "
                         f"the model only {run.config.vocab_size} embeddings")
    n = len(blocks["train"])
    if n < args.global_batch_size:
        fits = n // (args.gradient_accumulation_steps * args.dp_size)
        fix = "lower --seq_length/--batch_size or add data"
        if args.micro_batch_sized and fits:
            fix = f"pass --batch_size {2 ** int(math.log2(fits))} (the default was sized to the GPU's memory)"
        raise UsageError(f"{n} training blocks of {args.seq_length} tokens cannot fill one global batch of "
                         f"{args.global_batch_size}: {fix}")
    if len(blocks["validation"]) == 0:
        raise UsageError(f"the held-out text fills no block of {args.seq_length} tokens: raise "
                         "--validation_split_percentage, lower --seq_length or give --validation_file")


# ---- Model: config, weights, and torch.compile of the sharded blocks -----------------------------

def load_config(args):
    """The model's config, cheap: checks run on it before any weight is loaded."""
    shape = builtin_shape(args.model_name)
    if shape is not None:
        layers, hidden, heads, vocab = BUILTIN_SHAPES[shape]
        # Pythia's other settings are GPTNeoXConfig's defaults (rotary on 25% of each head, parallel
        # residual, untied output head, 2048 positions).
        return GPTNeoXConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                             intermediate_size=4 * hidden, vocab_size=vocab, max_position_embeddings=2048,
                             bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return from_hub(AutoConfig.from_pretrained, args.model_name, "--model_name",
                    trust_remote_code=args.trust_remote_code)


def from_hub(load, name, flag, **kwargs):
    """load(name) for a local directory or a hub id. Where the hub cannot be reached, only the local cache
    is asked (transformers would retry for ~25 s first); a name found nowhere ends in one line saying why."""
    offline = None if Path(name).is_dir() else hub_unreachable()
    try:
        return load(name, local_files_only=offline is not None, **kwargs)
    except (OSError, ValueError) as exc:  # what transformers raises for a name it cannot resolve
        if Path(name).is_dir():
            raise UsageError(f"{flag} {name}: this directory does not hold a loadable model "
                             f"({str(exc).splitlines()[0]})") from None
        if isinstance(exc, ValueError):
            raise
        where = (f"the Hugging Face hub cannot be reached from here ({offline}) and the local cache does not "
                 "have it" if offline
                 else "the Hugging Face hub has no such repository (or it is private or gated: log in "
                 "with `hf auth login`)")
        raise UsageError(f"{flag} {name} is not a local directory and {where}: pass a local directory "
                         "holding the model, or builtin:NAME for a Pythia shape with random weights "
                         f"({', '.join(BUILTIN_SHAPES)})") from None


def hub_unreachable():
    """Why the Hugging Face hub cannot be reached, or None when a TCP connection to it opens within 3 s."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as exc:
        return f"{url.hostname}: {exc.strerror or exc}"
    return None


def build_model(args, config, dtype, where="cpu", weights=None):
    """The whole model on `where`, its weights from `weights` (default: those of the run, see model_weights):
    the unsharded reference of --verify_tp and of the tests."""
    model = empty_model(args, config, dtype, where)
    weights = weights or model_weights(args, config, dtype, where, meta_model(config, args.trust_remote_code))
    fill_weights(model, weights, tp_rank=0, tp=1)
    return model


def meta_model(config, trust_remote_code=False, dtype=None):
    """The model's modules with shapes and names only (on the meta device): no memory, no computation. It
    gets its own copy of the config, which the training switches (use_cache) may change."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype,
                                                trust_remote_code=trust_remote_code)


def empty_model(args, config, dtype, where):
    """The model's modules with uninitialised parameters on `where` (nothing is written, so nothing is
    computed, and on the host no memory is touched until a value lands in it) and its buffers computed as
    transformers computes them when it loads a checkpoint (the rotary inv_freq). Ties restored."""
    model = meta_model(config, args.trust_remote_code, dtype)
    model.to_empty(device=where)
    model.tie_weights()
    for param in model.parameters():
        param._is_hf_initialized = True  # transformers' mark for "loaded": initialize_weights skips it
    model.initialize_weights()  # so this computes the buffers only
    model.config.use_cache = False
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class RandomWeights:
    """Random weights, one module at a time: its parameters made whole on the device, initialised by the
    model's own _init_weights from a generator seeded by the run's seed and the module's name. So the weights
    depend on the seed and the device type only, not on tp, dp or which loading path made them."""
    description = "random weights"
    has_buffers = False  # the buffers are computed when the empty model is built (empty_model)

    def __init__(self, shapes_only, seed, device):
        self.shapes_only, self.seed, self.device = shapes_only, seed, device

    def whole(self, wanted):
        """(name, whole tensor) of every parameter named in `wanted` (name -> the tensor to fill)."""
        for module_name, module in self.shapes_only.named_modules():
            own = {f"{module_name}.{n}".lstrip("."): n for n, _ in module.named_parameters(recurse=False)}
            if not own.keys() & wanted.keys():
                continue
            full = copy.copy(module)  # the module alone, wanted parameters whole and real (others stay meta)
            full._modules = {}
            full._parameters = dict(module._parameters) | {
                n: torch.nn.Parameter(torch.empty_like(module._parameters[n], dtype=wanted[name].dtype,
                                                       device=self.device))
                for name, n in own.items() if name in wanted}
            key = hashlib.sha256(f"{self.seed}/{module_name}".encode()).digest()
            torch.manual_seed(int.from_bytes(key[:8], "little") >> 1)
            self.shapes_only._init_weights(full)
            for name, n in own.items():
                if name in wanted:
                    yield name, full._parameters[n].detach()


class CheckpointWeights:
    """A checkpoint's tensors, read by the model's names (`read(name)`): from its safetensors files (see
    safetensors_weights), or from the state dict transformers loaded whole on the host."""
    has_buffers = True

    def __init__(self, read, description):
        self.read, self.description = read, description

    def whole(self, wanted):
        for name in wanted:
            yield name, self.read(name)


def safetensors_weights(directory, shapes_only, where):
    """CheckpointWeights over a directory's safetensors files, memory-mapped: a tensor read from them is
    backed by the file's pages, so taking a rank's slice reads only that slice into memory. Their names become
    the model's through transformers' own renaming (Pythia's embed_out becomes lm_head), and names and shapes
    are checked against the model up front. None where transformers must transform a tensor (fuse, split) as
    it loads it: only its own loading can read such a checkpoint."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            files = {key: "model.safetensors" for key in f.keys()}
    opened = {file: safe_open(str(directory / file), "pt") for file in set(files.values())}
    mapping = get_model_conversion_mapping(shapes_only)
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
    expected = dict(shapes_only.named_parameters()) | persistent_buffers(shapes_only)
    tensors = {}  # the model's name -> (the file holding it, the name there)
    for key, file in files.items():
        name, converted = rename_source_key(key, renamings, converters, shapes_only.base_model_prefix,
                                            expected)
        if converted:
            return None
        tensors[name if name in expected else key] = (opened[file], key)
    for name, tensor in expected.items():
        if name not in tensors:
            missing = [n for n in expected if n not in tensors]
            raise UsageError(f"{where}: the checkpoint in {directory} has no tensor {name} (and "
                             f"{len(missing) - 1} more): is it a checkpoint of this model?")
        file, key = tensors[name]
        shape = tuple(file.get_slice(key).get_shape())
        if shape != tuple(tensor.shape):
            raise UsageError(f"{where}: the checkpoint in {directory} holds {name} as {shape}, the model "
                             f"expects {tuple(tensor.shape)}: is it a checkpoint of this model?")
    return CheckpointWeights(lambda name: tensors[name][0].get_tensor(tensors[name][1]),
                             f"the checkpoint {directory}")


def persistent_buffers(model):
    return {name: b for name, b in model.named_buffers() if name in model.state_dict()}


def model_weights(args, config, dtype, device, shapes_only):
    """Where the weights come from: random for builtin: shapes and --random_init, otherwise the model's
    safetensors files (downloaded first, by one rank per node); a checkpoint that has none, or whose tensors
    transformers transforms on load, is loaded whole on the host by transformers."""
    if builtin_shape(args.model_name) is not None or args.random_init:
        return RandomWeights(shapes_only, args.seed, device)
    directory = Path(args.model_name)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download
        directory = Path(from_hub(lambda name, **kw: snapshot_download(name, allow_patterns=["*.safetensors",
                                  "*.safetensors.index.json"], **kw), args.model_name, "--model_name"))
    why = "it has no safetensors files"
    if any(directory.glob("*.safetensors")):
        weights = safetensors_weights(directory, shapes_only, f"--model_name {args.model_name}")
        if weights:
            return weights
        why = "transformers transforms its tensors on load"
    model = from_hub(AutoModelForCausalLM.from_pretrained, args.model_name, "--model_name", config=config,
                     dtype=dtype, trust_remote_code=args.trust_remote_code)
    return CheckpointWeights(model.state_dict().__getitem__,
                             f"{args.model_name}, read whole on the host ({why})")


def is_zero3(param):
    """A parameter ZeRO-3 has partitioned over the DP group: outside a forward or backward pass its values
    live in param.ds_tensor, this rank's piece of the flattened (TP-local) tensor; param.data is empty."""
    return hasattr(param, "ds_id")


def local_shape(param):
    """The shape of this TP rank's parameter, whether or not ZeRO-3 has partitioned it further."""
    return tuple(param.ds_shape) if is_zero3(param) else tuple(param.shape)


def zero3_piece(param, flat):
    """This DP rank's piece of a ZeRO-3 parameter's flattened values (ZeRO-3 cuts them into equal pieces in
    DP-rank order, the last one padded): (start, length)."""
    size = param.ds_tensor.numel()
    start = size * dist.get_rank(group=param.ds_process_group)
    return start, max(0, min(size, flat - start))


@torch.no_grad()
def fill_weights(model, weights, tp_rank, tp, show_progress=False):
    """Write every parameter (and persistent buffer) of `model` from `weights`: where AutoTP split it, only
    this rank's slice, cut by the record DeepSpeed keeps on each split parameter (the one its universal
    checkpoints are restored with: the layer's own split sizes, uneven and fused layouts included); where
    ZeRO-3 partitioned it further over the DP group, only this DP rank's piece of that slice (ds_tensor, which
    ZeRO-3's flat 16-bit buffer holds: refresh_fp32_params then copies it to the fp32 masters)."""
    wanted = dict(model.named_parameters())
    if weights.has_buffers:
        wanted |= persistent_buffers(model)
    left = set(wanted)
    for name, full in tqdm(weights.whole(wanted), total=len(wanted), desc="loading weights", unit="tensor",
                           delay=3, disable=not show_progress):
        target = wanted[name]
        mine = _resolve_autotp_partition(target, None, full, tp_rank, tp) if tp > 1 else None
        mine = full if mine is None else mine
        if is_zero3(target):
            start, length = zero3_piece(target, mine.numel())
            target.ds_tensor.zero_()[:length].copy_(mine.reshape(-1)[start:start + length])
        else:
            target.copy_(mine.view(target.shape))
        left.discard(name)
    if left:
        raise RuntimeError(f"{weights.description} wrote no value to {sorted(left)[:3]}")


def staging_place(args, n_params, dtype, device):
    """Where the whole, still empty model stands while deepspeed.initialize slices it: on the GPU when its
    weights fit STAGING_FRACTION of the free memory (the fastest slicing), else on the host, where memory
    the slicing never writes to is never touched (--shard_on_load). Returns (place, why)."""
    size_gib = n_params * dtype.itemsize / 2 ** 30
    if device.type == "cpu":
        return torch.device("cpu"), "on the host (CPU run)"
    if args.shard_on_load:
        return torch.device("cpu"), "on the host (--shard_on_load)"
    free_gib = torch.cuda.mem_get_info(device)[0] / 2 ** 30
    if args.shard_on_load is None and size_gib > STAGING_FRACTION * free_gib:
        return torch.device("cpu"), (f"on the host: its {size_gib:.1f} GiB of weights exceed "
                                     f"{STAGING_FRACTION:.0%} of the GPU's {free_gib:.1f} GiB free")
    return device, f"on the GPU ({size_gib:.1f} GiB of weights, {free_gib:.1f} GiB free)"


def build_sharded_model(run, device, clock, probe=None):
    """Each rank builds or reads only the weights it will hold: the model stands empty (on the GPU, or on the
    host when it does not fit, see staging_place), deepspeed.initialize cuts it into this rank's shards, then
    fill_weights writes every shard and ZeRO's fp32 master weights are refreshed from them.
    With a probe (--verify_tp), rank 0 first computes the unsharded reference on a whole model, then frees it.
    Returns the engine and the reference (None without a probe or off rank 0)."""
    args, config, layout = run.args, run.config, run.layout
    dtype = DTYPES[args.precision]
    place, why = staging_place(args, run.stats["parameters"], dtype, device)
    weights = leader_first(lambda: model_weights(args, config, dtype, device, run.shapes_only),
                           args.local_rank == 0)
    reference = None
    if probe is not None and layout.rank == 0:
        whole = build_model(args, config, dtype, place, weights)
        reference = module_outputs(whole, probe.to(place))
        del whole
    model = empty_model(args, config, dtype, place)
    if device.type == "cuda":  # GPU memory before deepspeed.initialize slices: the whole model when staged
        clock.figures["gpu_memory_before_slicing_gib"] = torch.cuda.memory_allocated(device) / 2 ** 30
    clock.lap("model", f"{weights.description}; the empty model {why}")
    try:
        engine = build_engine(model, args, layout, run.ds_config, training=run.training)
    except (AssertionError, ValueError, NotImplementedError) as exc:  # DeepSpeed refusing the model or specs
        raise UsageError(f"deepspeed.initialize could not shard {args.model_name} with {run.source.name}: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    del model
    tp_rank = groups.get_tensor_model_parallel_rank() if layout.tp > 1 else 0
    fill_weights(engine.module, weights, tp_rank, layout.tp, show_progress=layout.rank == 0)
    transformers.set_seed(args.seed)  # random weights reseed per module: the run's streams start from --seed
    if hasattr(engine.optimizer, "refresh_fp32_params"):  # ZeRO's master copy was taken from the empty model
        engine.optimizer.refresh_fp32_params()
    held = (f"tp rank {tp_rank} of {layout.tp} holds "
            f"{sum(math.prod(local_shape(p)) for p in engine.module.parameters()) / 1e6:,.1f}M parameters")
    if device.type == "cuda":  # the peak since DeepSpeed last reset it inside deepspeed.initialize
        clock.figures["loading_peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        held += (f", GPU memory {clock.figures['gpu_memory_before_slicing_gib']:.1f} GiB before slicing, "
                 f"peak {clock.figures['loading_peak_gpu_memory_gib']:.1f} GiB while loading")
    clock.lap("sharding and loading", held)
    return engine, reference


def repeated_blocks(model):
    """The blocks that --compile compiles one by one: the classes transformers lists in _no_split_modules
    (GPTNeoXLayer)."""
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in kinds]


def decide_compile(args, model):
    """--compile / --no-compile as given; by default on with CUDA GPUs, where it was measured faster, and
    off on CPU, where compiling takes longer than a short run saves and needs a C++ compiler, and under
    ZeRO-3: there the compiled blocks computed wrong gradients on a GPU (ZeRO-3 gathers each layer's weights
    in hooks around its forward and backward). --dry_run lays out a GPU run, so its memory estimate assumes
    the GPU's default. Checked on the shapes-only model, before any weight loads."""
    blocks = repeated_blocks(model)
    if args.compile is None:
        return ((get_accelerator().device_name() == "cuda" or args.dry_run) and bool(blocks)
                and not args.deepcompile and args.zero_stage != 3)
    if args.compile and args.zero_stage == 3:
        raise UsageError("--compile cannot be combined with --zero_stage 3: its compiled blocks computed "
                         "wrong gradients under ZeRO-3's weight gathering; use --no-compile or --zero_stage "
                         "1 or 2")
    if args.compile and not blocks:
        raise UsageError(f"--compile: {type(model).__name__} names no repeated blocks (_no_split_modules); "
                         "use --no-compile")
    return args.compile


def compile_blocks(model):
    """torch.compile each transformer block and the loss, not the whole model: compiled whole, the model
    hands attention an explicit causal mask instead of none, and the slower attention kernels that takes
    cost more than the fusion saves. Identical blocks share one compiled graph, so compiling costs about one
    block's time."""
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile()  # in place: parameter names, hooks and checkpoints stay as they were
    model.loss_function = torch.compile(model.loss_function)  # fuses the fp32 upcast of the logits into it
    return f"{len(blocks)} {type(blocks[0]).__name__} blocks and the loss"


# ---- --verify_tp: the sharded model against the unsharded one, module by module ------------------

VERIFY_TOKENS = 256  # of the first training sequence: enough to exercise attention, cheap at 6.9B


# Largest relative difference ||sharded - unsharded|| / ||unsharded|| accepted for a module's output. A
# wrong split (heads mixed up, a fused block cut in the wrong place) gives differences of order 1.
VERIFY_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}


def module_outputs(model, input_ids, keep=True, vocab_parallel=False):
    """One forward pass; returns the loss, the logits (whole, gathered from the TP ranks under
    --vocab_parallel) and the first tensor output of every module (fp32, on the host), in the order they
    ran. Ranks that keep nothing still take part in the collectives."""
    outputs = {}

    def record(name):
        def hook(module, inputs, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if keep and torch.is_tensor(tensor) and name not in outputs:
                outputs[name] = tensor.detach().float().cpu()
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, labels=input_ids)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    logits = gather_vocab_shards(out.logits) if vocab_parallel else out.logits
    return out.loss.float().item(), logits.detach().float().cpu(), outputs


@contextlib.contextmanager
def model_code_errors(where):
    """The model's own code failing on its shards (a spec that splits a fused weight other than the forward
    expects it, a count it reads for the whole model) or running out of memory: one line, not a traceback
    on every rank."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UsageError(f"out of memory {where}: lower --batch_size or --seq_length, raise --tp_size, or "
                         "add --activation_checkpointing") from None
    except RuntimeError as exc:
        raise UsageError(f"the sharded model failed {where}: {str(exc).splitlines()[0][:300]}. The specs may "
                         "split a weight in a way the model's code does not expect: --verify_tp names the "
                         "first module that differs (README: Which specs)") from None


def check_replicated_in_sync(model, layout, step):
    """At each log: every weight the TP ranks hold whole must still be the same on all of them. Specs
    can pass --verify_tp (the forward) yet train wrong: a weight used on each rank's heads only (Qwen3's
    q_norm, k_norm) gets a partial gradient on each rank unless its spec sums the gradient over the TP group
    (grad_allreduce), and the copies drift apart (with AdamW, from the second step). Under ZeRO-3 each rank
    compares the piece it owns (TP peers own the same piece)."""
    if layout.tp == 1:
        return
    whole = [(n, p) for n, p in model.named_parameters()
             if not getattr(p, "tensor_model_parallel", False)]  # AutoTP marks the weights it splits
    pieces = [p.ds_tensor[:zero3_piece(p, p.ds_numel)[1]] if is_zero3(p) else p.detach() for _, p in whole]
    sums = torch.stack([torch.stack([v.double().sum(), v.double().abs().sum()]) for v in pieces])
    gathered = [torch.empty_like(sums) for _ in range(layout.tp)]
    dist.all_gather(gathered, sums, group=groups.get_tensor_model_parallel_group())
    # Equal to rounding (1e-6 of the weight size): a partial gradient moves them by the learning rate's order.
    spread = (torch.stack(gathered) - gathered[0]).abs().amax(dim=(0, 2))
    bad = (spread > 1e-6 * (gathered[0][:, 1] + 1e-12)).float()
    # every rank takes the same verdict: other TP groups (and under ZeRO-3 other pieces) checked other values
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    differ = [n for (n, _), b in zip(whole, bad) if b]
    if differ:
        raise UsageError(f"at step {step} {differ[0]} (and {len(differ) - 1} more) differ across the TP "
                         "ranks that hold them whole: each rank's gradient is only part of the sum; "
                         'give them a spec with "partition_type": "skip", "grad_allreduce": true '
                         "(the model's tp_plan may have one)")


def gather_vocab_shards(logits):
    """The whole logits from a vocab-parallel head's per-rank slices (TP rank r holds vocabulary slice r)."""
    shards = [torch.empty_like(logits) for _ in range(groups.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, logits.contiguous(), group=groups.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def verify_tp(engine, probe, reference, plan, run):
    """Compare the sharded model with the unsharded one module by module (where both produce the same
    shape: column-parallel outputs are shards, checked through the modules after them). Rank 0 judges,
    every rank learns the verdict; a difference beyond the precision's tolerance stops the run."""
    args, layout = run.args, run.layout
    with model_code_errors("in its first forward pass (--verify_tp)"):
        loss, logits, outputs = module_outputs(engine.module, probe, keep=layout.rank == 0,
                                               vocab_parallel=args.vocab_parallel)
    verdict = [None, None]
    if layout.rank == 0:
        verdict = first_disagreement(reference, (loss, logits, outputs), plan,
                                     VERIFY_TOLERANCE[args.precision], args.precision)
    dist.broadcast_object_list(verdict, src=0)
    error, report = verdict
    if error:
        raise UsageError(error)
    log(layout, f"verify_tp: sharded = unsharded on {probe.shape[1]} tokens: loss {report['loss']:.6f} vs "
                f"{report['reference_loss']:.6f}, logits max diff {report['logits_max_diff']:.2e}, "
                f"worst module {report['worst_module']} (relative {report['worst_relative_diff']:.2e}, "
                f"tolerance {report['tolerance']:.0e})")
    return report


def first_disagreement(reference, sharded, plan, tolerance, precision):
    """The first module where the sharded and unsharded outputs disagree: (error message naming it, None), or
    (None, report) when none does. Modules in execution order; at the first one over tolerance, the
    suspects are the sharded Linears that ran since the last output that agreed (a column-parallel
    output is a shard, so it cannot be compared itself: a wrong fused-QKV split shows up one module later)."""
    (ref_loss, ref_logits, ref_out), (loss, logits, out) = reference, sharded
    worst, since_last_good, compared = ("", 0.0), [], 0
    for name, expected in ref_out.items():  # hooks fire when a module finishes: children before parents
        got = out.get(name)
        since_last_good.append(name)
        if got is None or got.shape != expected.shape:
            continue
        compared += 1
        rel = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        worst = max(worst, (name, rel), key=lambda w: w[1])
        if not rel <= tolerance:
            suspects = [f"{n} ({describe_spec(plan[n + '.weight'][0])})" for n in since_last_good
                        if plan.get(n + ".weight", (None,))[0] is not None]
            return (f"--verify_tp: the sharded model differs from the unsharded one first at {name} "
                    f"(relative difference {rel:.2e}, tolerance {tolerance:.0e} for {precision}; "
                    f"loss {loss:.4f} vs {ref_loss:.4f}); sharded layers since the last agreeing output: "
                    f"{', '.join(suspects) or 'none'}: check their specs (a fused weight needs the split "
                    "that matches its layout)"), None
        since_last_good = []
    return None, {"loss": loss, "reference_loss": ref_loss,
                  "logits_max_diff": (logits - ref_logits).abs().max().item(), "worst_module": worst[0],
                  "worst_relative_diff": worst[1], "modules_compared": compared, "tolerance": tolerance}


# ---- Checkpoints, resume, stopping on a signal, and the Hugging Face export ----------------------

POINTER = "latest"  # DeepSpeed's own name: engine.load_checkpoint(dir) follows it too


def check_output_dir(path):
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output_dir {path} is not writable ({exc.strerror}): pick another directory")
    if not os.access(path, os.W_OK):
        raise UsageError(f"--output_dir {path} is not writable: pick another directory")


# What a checkpoint fixes (the model, its tokenizer and specs, the data and its order, the shapes and the
# precision): a resumed run or an export takes them from its run.json, and a flag given again must agree.
SAME_ON_RESUME = ("model_name", "tokenizer_name", "partition_config", "dataset_name", "dataset_config_name",
                  "train_file", "validation_file", "text_column", "validation_split_percentage", "seq_length",
                  "precision", "seed", "offload_optimizer")
# The rest of the run's plan: taken from the checkpoint too, unless given again (then the new value holds).
RESUMED_PLAN = ("random_init", "trust_remote_code", "num_steps", "learning_rate", "weight_decay",
                "warmup_steps", "max_grad_norm", "deepspeed_config", "zero_stage", "log_interval",
                "eval_interval", "save_interval", "keep_last")


def locate_checkpoint(args):
    """--resume_from_checkpoint -> (the checkpoint's directory, its run.json). A directory with no complete
    checkpoint is refused with the list of those beside it."""
    given = args.resume_from_checkpoint
    path = Path(args.output_dir) / "checkpoints" if given == "latest" else Path(given)
    if (path / POINTER).is_file():  # a checkpoints/ directory: follow its pointer
        path = path / (path / POINTER).read_text().strip()
    if not (path / "run.json").is_file():
        why = "no run.json: a save that did not finish" if path.is_dir() else "no such directory"
        for root in (path, path.parent):
            beside = [d.name for d in complete_checkpoints(root)]
            if beside:
                break
        where = (f"the complete ones in {root}: {', '.join(beside)}" if beside else
                 "none is beside it (a run writes them with --save_interval N, and on SIGTERM)")
        raise UsageError(f"--resume_from_checkpoint {given}: no complete checkpoint at {path} ({why}); "
                         f"{where}")
    return path, json.loads((path / "run.json").read_text())


def complete_checkpoints(root):
    """The checkpoints in root that were written whole (their run.json last), oldest first."""
    dirs = [d for d in root.iterdir() if d.name.startswith("step_")] if root.is_dir() else []
    return sorted((d for d in dirs if (d / "run.json").is_file() and not d.name.endswith(UNIVERSAL)),
                  key=lambda d: (d / "run.json").stat().st_mtime)


def checkpoint_settings(args, meta, given):
    """The flags of a resumed run (or an export): SAME_ON_RESUME and RESUMED_PLAN from the checkpoint's
    run.json where not given; given SAME_ON_RESUME flags that disagree with it are refused in one line."""
    saved = meta["args"]
    clashes = [f"--{name} {getattr(args, name)} (it has {saved.get(name)})" for name in SAME_ON_RESUME
               if name in given and getattr(args, name) != saved.get(name)]
    if clashes:
        raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint} was written with other "
                         f"settings: {'; '.join(clashes)}: leave these flags out and the checkpoint's are "
                         "taken")
    taken = {name: saved[name] for name in SAME_ON_RESUME + RESUMED_PLAN
             if name not in given and name in saved}
    return argparse.Namespace(**vars(args) | taken)


def resume_plan(args, layout, path, meta):
    """How the checkpoint resumes: a Resume, through DeepSpeed's universal form where tp, dp or the ZeRO stage
    changed. Its DeepSpeed settings must be this run's; a change of schedule is said in one line."""
    saved = meta["args"]
    written = training_settings(saved.get("user_deepspeed_config"))
    now = training_settings(args.user_deepspeed_config)
    if written != now:
        raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint} was written with the "
                         f"--deepspeed_config settings {json.dumps(written)[:300]}, this run has "
                         f"{json.dumps(now)[:300]}: use the same")
    universal = topology(saved) != topology(vars(args))
    if {saved["zero_stage"], args.zero_stage} in ({1, 3}, {2, 3}):
        stage = saved["zero_stage"]
        raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint} was written with "
                         f"ZeRO-{stage}, this run has ZeRO-{args.zero_stage}: DeepSpeed's universal "
                         "checkpoints do not carry over between ZeRO-3 and ZeRO-1/2 (their optimizer files "
                         f"differ); resume with --zero_stage {stage}, at any tp x dp")
    if universal and 0 in (saved["zero_stage"], args.zero_stage):
        tp, dp, zero = topology(saved)
        raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint} was written at tp {tp} x "
                         f"dp {dp} with ZeRO-{zero}: another tp, dp or ZeRO stage goes through DeepSpeed's "
                         "universal checkpoint, which needs ZeRO-1 or 2 on both sides; "
                         f"resume with --tp_size {tp} --dp_size {dp} --zero_stage {zero}")
    before, after = lr_at(argparse.Namespace(**saved), meta["step"]), lr_at(args, meta["step"])
    if not math.isclose(before, after, rel_tol=1e-6) and not args.export_only:
        log(layout, f"the learning-rate schedule changes at step {meta['step']}: {before:.2e} in the "
                    f"checkpoint's ({saved['num_steps']} steps, {saved['warmup_steps']} of warmup, peak "
                    f"{saved['learning_rate']:.1e}), {after:.2e} from here ({args.num_steps} steps, "
                    f"{args.warmup_steps} of warmup, peak {args.learning_rate:.1e})")
    return Resume(path, meta, universal)


def lr_at(args, step):
    """The learning rate the recipe's schedule gives the step after `step` optimizer steps."""
    optimizer = torch.optim.SGD([torch.zeros(1)], lr=args.learning_rate)
    return args.learning_rate * warmup_cosine_factory(args)(optimizer).lr_lambdas[0](step)


def resume_checkpoint(run):
    """The checkpoint to load: as written, or its universal form where the topology changed (converted once,
    by rank 0)."""
    resume, layout = run.resume, run.layout
    if resume.meta["samples_consumed"] != resume.meta["step"] * run.args.global_batch_size:
        log(layout, f"the global batch is now {run.args.global_batch_size} sequences: the data goes on after "
                    f"the {resume.meta['samples_consumed']} samples the checkpoint consumed, "
                    "not where this batch would be")
    if not resume.universal:
        return resume.path
    log(layout, "{} was written at tp {} x dp {} (ZeRO-{}), resuming at tp {} x dp {} (ZeRO-{}) through "
                "a universal checkpoint".format(resume.path, *topology(resume.meta["args"]),
                                                *topology(vars(run.args))))
    return leader_first(lambda: universal_checkpoint(resume.path, layout), layout.rank == 0)


def save_checkpoint(engine, args, layout, step, samples, history, evals):
    """Every rank writes its shards and optimizer state under checkpoints/<tag>; rank 0 then marks it
    complete (run.json) and only then moves the pointer, atomically. A kill at any moment leaves the
    pointer on the previous complete checkpoint. A tag is never reused, so nothing is overwritten."""
    root = Path(args.output_dir) / "checkpoints"
    tag = [f"step_{step:07d}"]
    if layout.rank == 0:
        tag[0] = next(t for t in (f"step_{step:07d}" + (f".{i}" if i else "") for i in count())
                      if not (root / t).exists())
    dist.broadcast_object_list(tag, src=0)
    tag = tag[0]
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, root / tag / f"rng_rank{layout.rank:05d}.pt")
    dist.barrier()  # every rank's files are on disk
    if layout.rank == 0:
        meta = {"step": step, "samples_consumed": samples, "args": vars(args), "history": history,
                "evals": evals, "deepspeed_config": engine.config}
        write_atomically(root / tag / "run.json", json.dumps(meta, indent=1))
        write_atomically(root / POINTER, tag)
        prune_checkpoints(root, args.keep_last)
    dist.barrier()
    return root / tag


def prune_checkpoints(root, keep_last):
    """Delete leftovers of interrupted saves and conversions (no run.json) and all but the newest keep_last
    checkpoints, each with its universal copy."""
    complete = complete_checkpoints(root)
    doomed = ([d for d in root.iterdir() if d.name.startswith("step_") and not (d / "run.json").is_file()]
              + (complete[:-keep_last] if keep_last else []))
    for d in doomed + [d.with_name(d.name + UNIVERSAL) for d in doomed]:
        shutil.rmtree(d, ignore_errors=True)


UNIVERSAL = "_universal"  # suffix of a checkpoint's universal copy, kept beside it


def topology(run_args):
    return run_args["tp_size"], run_args["dp_size"], run_args["zero_stage"]


def universal_checkpoint(path, layout):
    """DeepSpeed's universal form of a checkpoint (ds_to_universal: every parameter and optimizer state whole,
    loadable at any tp x dp), converted once and kept beside it; one killed part-way is redone."""
    target = path.with_name(path.name + UNIVERSAL)
    if (target / "run.json").is_file():
        log(layout, f"reusing the universal checkpoint {target}")
        return target
    log(layout, f"converting {path} to a universal checkpoint (once; kept as {target})")
    from deepspeed.checkpoint import ds_to_universal
    # Written at tp 1, the checkpoint has no AutoTP record of how its weights split (nothing was split); the
    # converter then needs only the version stamp that inject_missing_state adds.
    written_at_tp1 = json.loads((path / "run.json").read_text())["args"]["tp_size"] == 1
    with written_whole(target) as partial:
        with open(partial / "convert.log", "w") as out, contextlib.redirect_stdout(out):
            try:
                ds_to_universal.main(argparse.Namespace(
                    input_folder=str(path), output_folder=str(partial), strict=True, num_extract_workers=4,
                    num_merge_workers=2, keep_temp_folder=False, inject_missing_state=written_at_tp1))
            except AssertionError as exc:  # DeepSpeed's checks of what it can convert
                raise UsageError(f"DeepSpeed cannot convert {path} to a universal checkpoint: {exc} "
                                 f"(its log: {partial / 'convert.log'})") from None
        (path.parent / "latest_universal").unlink(missing_ok=True)  # converter's pointer: the tag is passed
        shutil.copy2(path / "run.json", partial / "run.json")
    return target


@contextlib.contextmanager
def written_whole(target):
    """A directory written as target.partial and renamed to target once complete, so that neither a reader nor
    a later run ever takes a half-written one (an interrupted run's .partial is cleared first)."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def load_checkpoint(engine, path, layout):
    """Weights, optimizer state (this rank's ZeRO partition), LR schedule, and, written at this topology,
    each rank's RNG state. A universal checkpoint has no RNG states for ranks that did not exist."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside ZeRO's
    decay = [group["weight_decay"] for group in base.param_groups] if base is not None else []
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise UsageError(f"DeepSpeed could not load the checkpoint at {path}")
    if path.name.endswith(UNIVERSAL) and engine.zero_optimization_partition_weights():
        # ZeRO-3's universal load gives every param group the first group's hyperparameters (biases and norms
        # would decay like matrices) and every state one shared `step` tensor, which AdamW then advances once
        # per group and step: each group gets its own decay back, each state its own step.
        for group, own in zip(base.param_groups, decay):
            group["weight_decay"] = own
        for state in base.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    for param, state in (base.state.items() if base is not None and base.defaults.get("fused") else ()):
        if torch.is_tensor(state.get("step")):  # a universal checkpoint restores AdamW's step counts on CPU;
            state["step"] = state["step"].to(param.device)  # the fused AdamW wants them beside the weights
    if path.name.endswith(UNIVERSAL):
        dropout = any(m.p > 0 for m in engine.module.modules() if isinstance(m, torch.nn.Dropout))
        log(layout, "random number streams start afresh (they are per rank)" + ("" if dropout else
                    ": this model uses no dropout, so no computation changes"))
        return
    state = torch.load(path / f"rng_rank{layout.rank:05d}.pt", weights_only=False)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def export_hf(engine, tokenizer, layout, out_dir):
    """Gather the TP shards into one plain Hugging Face model (safetensors) plus its tokenizer.
    A collective: every rank sends its shards, rank 0 writes. (engine.save_16bit_model() would write
    rank 0's shards only under AutoTP.)"""
    if layout.tp > 1 or engine.zero_optimization_partition_weights():  # TP shards or ZeRO-3 pieces
        state = engine._consolidated_16bit_state_dict()  # full tensors on rank 0, None elsewhere
    else:
        state = engine.module.state_dict()
    if layout.rank == 0:
        engine.module.config.use_cache = True  # training switched the KV cache off; generation wants it
        with written_whole(Path(out_dir)) as partial:
            engine.module.save_pretrained(partial, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(partial)
    dist.barrier()


class StopSignal:
    """SIGTERM or SIGINT (a scheduler's warning before preemption, Ctrl-C) sets a flag; at each step the
    ranks agree whether anyone got one, over a CPU (gloo) group so the accelerator stream is not
    synchronised. A second signal gets the default behaviour: it kills."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)

    def agreed(self):
        flag = torch.tensor([self.received is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=CPU_GROUP)
        return bool(flag.item())


# ---- The training loop, evaluation and metrics ---------------------------------------------------

def train(run, engine, blocks, device, clock):
    """The loop, from step 1 or from the checkpoint's run.json. Returns one record per logged step, the
    evaluations, and the name of the signal that stopped it early (or None)."""
    args, layout = run.args, run.layout
    resumed = run.resume.meta if run.resume else dict(step=0, history=[], evals=[], samples_consumed=0)
    first, history, evals = resumed["step"] + 1, list(resumed["history"]), list(resumed["evals"])
    samples = resumed["samples_consumed"]  # where this rank's reading of the data resumes:
    skip = samples // (args.batch_size * layout.dp)  # exactly, when the global batch is the checkpoint's
    data_wait = [0.0]  # host seconds spent waiting for the next batch
    batches = timed(train_batches(blocks["train"], layout, args.batch_size, args.global_batch_size, args.seed,
                                  device, skip=skip), data_wait)
    stop = StopSignal()
    first_bad = torch.full((), math.inf, device=device)  # step of first non-finite loss/grad norm, on device
    bar = tqdm(total=args.num_steps, initial=first - 1, unit="step",
               disable=None if layout.rank == 0 else True)
    window_start, window_steps = time.perf_counter(), 0
    for step in range(first, args.num_steps + 1):
        lr = engine.get_lr()[0]  # the rate this step uses; the scheduler advances inside engine.step
        with model_code_errors("at step 1") if step == first else contextlib.nullcontext():
            loss = train_step(engine, batches)
        samples += args.global_batch_size
        if step == first:  # the start-up ends with the first step (and its compilation)
            get_accelerator().synchronize()
            clock.first_step()
        first_bad = mark_non_finite(first_bad, step, loss, applied_grad_norm(engine))
        window_steps += 1
        bar.update()
        if step % args.log_interval == 0 or step == args.num_steps:
            check_finite(first_bad)
            check_replicated_in_sync(engine.module, layout, step)
            loss = dp_mean(loss, engine, layout)  # the host sync: all queued accelerator work finishes here
            elapsed = time.perf_counter() - window_start
            history.append(step_record(run, engine, step, loss, lr, elapsed / window_steps,
                                       data_wait[0] / elapsed, clock.peak_memory_gib(device)))
            data_wait[0] = 0.0
            log(layout, format_record(history[-1]))
            report(engine, "train", history[-1])
            bar.set_postfix(loss=f"{loss:.3f}")
            window_start, window_steps = time.perf_counter(), 0
        stopping = stop.agreed()
        pause_start = time.perf_counter()  # evaluation and checkpoints stay out of the throughput
        if step == args.num_steps or (args.eval_interval and step % args.eval_interval == 0):
            evals.append(evaluate(run, engine, blocks["validation"], device, step))
        if stopping or (args.save_interval and (step % args.save_interval == 0 or step == args.num_steps)):
            check_finite(first_bad)  # never checkpoint a diverged model
            log(layout, "saved checkpoint "
                        f"{save_checkpoint(engine, args, layout, step, samples, history, evals)}")
        window_start += time.perf_counter() - pause_start
        if stopping:
            log(layout, f"received {stop.received}: stopped after step {step} with a checkpoint; continue "
                        "with --resume_from_checkpoint latest")
            break
    bar.close()
    if args.num_steps == 0:
        evals.append(evaluate(run, engine, blocks["validation"], device, 0))
    return history, evals, stop.received


def timed(iterator, total):
    """Yield from iterator, adding the time each next() takes to total[0]."""
    while True:
        start = time.perf_counter()
        item = next(iterator)
        total[0] += time.perf_counter() - start
        yield item


@torch.no_grad()
def evaluate(run, engine, dataset, device, step):
    """Mean loss over every held-out block, each counted exactly once whatever dp is: DP rank d takes
    blocks d, d + dp, d + 2 dp, ... (shards may differ by one block). Blocks all have seq_length tokens, so
    the mean of their mean losses is the mean loss per token. Under ZeRO-3 each forward pass gathers weights
    over the DP group, so a rank whose shard is shorter runs the others' last pass too, uncounted."""
    layout, batch_size = run.layout, run.args.batch_size
    engine.eval()
    shard = list(range(layout.dp_rank, len(dataset), layout.dp))  # TP peers pass the same dp_rank
    longest = math.ceil(len(dataset) / layout.dp)  # DP rank 0's shard
    passes = math.ceil((longest if engine.zero_optimization_partition_weights() else len(shard)) / batch_size)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # sum of block losses, block count
    for i in range(passes):
        blocks = shard[i * batch_size:(i + 1) * batch_size]
        input_ids = dataset[blocks or [0]]["input_ids"].to(device)
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        if blocks:  # (a pass only ZeRO-3 needs is not counted)
            count = torch.tensor(len(blocks), dtype=torch.float64, device=device)
            totals += torch.stack([loss.double() * count, count])
    dist.all_reduce(totals, group=engine.data_parallel_group)
    engine.train()
    loss = (totals[0] / totals[1]).item()
    record = {"step": step, "loss": loss, "perplexity": math.exp(min(loss, 80.0)),
              "blocks": int(totals[1].item())}
    log(layout, f"eval  {step:5d} | loss {loss:.4f} | perplexity {record['perplexity']:.2f}")
    report(engine, "eval", record)
    return record


def peak_flops(args, device, world_size):
    """Peak dense bf16 FLOP/s of all the run's accelerators together: --peak_tflops, or looked up from the
    GPU's name; None where unknown (CPU, an unlisted GPU): no MFU then."""
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)
    return peak and peak * world_size


def step_record(run, engine, step, loss, lr, step_time, data_wait_fraction, peak_memory):
    """What one log line and results.json say of the steps since the last log. MFU counts the FLOPs per token
    of model_statistics against peak_flops."""
    grad_norm = engine.get_global_grad_norm()
    tokens_per_s = run.args.tokens_per_step / step_time
    peak = peak_flops(run.args, engine.device, run.layout.world_size)
    return {"step": step, "loss": loss, "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "step_time_s": step_time, "tokens_per_s": tokens_per_s,
            "mfu": run.stats["flops_per_token"] * tokens_per_s / peak if peak else None,
            "peak_memory_gib": peak_memory, "data_wait_fraction": data_wait_fraction}


class Clock:
    """The start-up, phase by phase: one line each with its seconds and the host memory's peak so far
    (HostMemory), and for results.json the phases and the seconds from the process's start (imports
    included) to the end of the first optimizer step."""

    def __init__(self, layout):
        self.layout, self.phases, self.first_step_s, self.figures = layout, {}, None, {}
        self.host = HostMemory()
        self.started = self.last = psutil.Process().create_time()
        self.lap("imports and checks")

    def lap(self, phase, detail=""):
        now = time.time()
        self.phases[phase], self.last = round(now - self.last, 3), now
        peak = self.host.peak_gib()
        memory = f"host memory peak {peak:.1f} GiB" if peak is not None else ""
        log(self.layout, f"start-up: {phase} {self.phases[phase]:.1f} s "
                         f"({'; '.join(filter(None, [detail, memory]))})")

    def first_step(self):
        self.lap("first step", "compilation included where it is on")
        self.first_step_s = round(self.last - self.started, 3)
        log(self.layout, f"start-up: the first step ended {self.first_step_s:.1f} s "
                         "after the process started")

    def peak_memory_gib(self, device):
        """This rank's peak memory: the accelerator's allocated peak, or on CPU the host's."""
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2 ** 30
        return self.host.peak_gib()

    def summary(self):
        return self.phases | {"first_step_s": self.first_step_s} | self.figures


class HostMemory:
    """Peak anonymous resident memory of this process (what it allocated itself, not the file pages it maps,
    such as a memory-mapped checkpoint), sampled every 20 ms on a thread."""

    def __init__(self):
        self.process, self.stopped = psutil.Process(), threading.Event()
        self.peak = self.read()
        if self.peak is not None:
            watcher = threading.Thread(target=self.watch, daemon=True)
            watcher.start()
            atexit.register(lambda: (self.stopped.set(), watcher.join()))  # not reading while Python exits

    def read(self):
        """Resident memory less its file-backed and shared pages (RssAnon on Linux); None where unknown."""
        memory = self.process.memory_info()
        return memory.rss - memory.shared if hasattr(memory, "shared") else None

    def watch(self):
        while not self.stopped.wait(0.02):
            self.peak = max(self.peak, self.read())

    def peak_gib(self):
        return None if self.peak is None else max(self.peak, self.read()) / 2 ** 30


def log(layout, message):
    """The one way the script talks: rank 0 only, above any progress bar, at once (stdout may be a pipe)."""
    if layout.rank == 0:
        tqdm.write(message)
        sys.stdout.flush()


def format_record(r):
    grad_norm = "n/a" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (f"step {r['step']:5d} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad norm {grad_norm} | "
            f"{1000 * r['step_time_s']:.0f} ms/step | {r['tokens_per_s']:,.0f} tok/s | MFU {mfu} | "
            f"peak mem {r['peak_memory_gib']:.2f} GiB")


def throughput_summary(history):
    """Mean of the logged windows, leaving out the first (warm-up) when there are more."""
    steady = history[1:] or history
    if not steady:
        return {}
    mfus = [r["mfu"] for r in steady if r["mfu"] is not None]
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "step_time_s": sum(r["step_time_s"] for r in steady) / len(steady),
            "mfu": sum(mfus) / len(mfus) if mfus else None,
            "peak_memory_gib": max(r["peak_memory_gib"] for r in history),
            "windows": len(steady)}


def plot_losses(history, evals, path):
    """Train and eval loss over steps as a PNG; matplotlib is optional. Returns the path or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train (DP mean)")
    ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="eval")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def model_statistics(model, seq_length):
    """Parameters, those outside the input embedding and output head (N), and the FLOPs per token of a
    training step, 6 N + 12 L H S (L layers, H hidden, S sequence: the attention scores)."""
    embeddings = {model.get_input_embeddings().weight, model.get_output_embeddings().weight}
    n_non_embedding = sum(p.numel() for p in model.parameters() if p not in embeddings)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "non_embedding_parameters": n_non_embedding, "flops_per_token": 6 * n_non_embedding
            + 12 * model.config.num_hidden_layers * model.config.hidden_size * seq_length}


def describe_run(run, device):
    """The run's derived settings, printed once at the start."""
    args, layout, config = run.args, run.layout, run.config
    sized = " (sized to the GPU memory; --batch_size to set)" if args.micro_batch_sized else ""
    n_params, n_non_embedding = run.stats["parameters"], run.stats["non_embedding_parameters"]
    return "\n".join([
        "versions: " + ", ".join(f"{name} {version}" for name, version in library_versions().items()),
        f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU, gloo'})",
        f"layout: world {layout.world_size} = tp {layout.tp} x dp {layout.dp}; TP groups "
        f"{[list(range(d * layout.tp, (d + 1) * layout.tp)) for d in range(layout.dp)]}, DP groups "
        f"{[list(range(t, layout.world_size, layout.tp)) for t in range(layout.tp)]}",
        f"model: {args.model_name}, {n_params / 1e6:,.1f}M parameters "
        f"({n_non_embedding / 1e6:,.1f}M non-embedding), {config.num_hidden_layers} layers, "
        f"hidden {config.hidden_size}, {config.num_attention_heads} heads, {args.precision}",
        f"batch: {args.batch_size} per rank{sized} x {args.gradient_accumulation_steps} accumulation "
        f"x {layout.dp} DP = {args.global_batch_size} sequences of {args.seq_length} "
        f"= {args.tokens_per_step:,} tokens per step, {args.num_steps} steps",
        "deepspeed config: " + json.dumps(run.ds_config),
    ])


def collect_results(run, history, evals, clock, **outcome):
    layout = run.layout
    host_peaks = [None] * layout.world_size  # peak anonymous resident memory of each rank's process
    dist.all_gather_object(host_peaks, clock.host.peak_gib())
    return {"args": vars(run.args),
            "layout": dataclasses.asdict(layout) | {"tp_rank": layout.tp_rank, "dp_rank": layout.dp_rank},
            "model": run.stats, "train": history, "eval": evals, "throughput": throughput_summary(history),
            "host_memory_gib_per_rank": host_peaks, "startup": clock.summary(), **outcome,
            "versions": library_versions()}


def library_versions():
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__}


def write_results(results, output_dir, layout):
    """results.json and loss_curve.png, by rank 0."""
    if layout.rank == 0:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        log(layout, f"wrote {output_dir / 'results.json'}")
        if results["train"]:
            plot = plot_losses(results["train"], results["eval"], output_dir / "loss_curve.png")
            log(layout, f"wrote {plot}" if plot else "no loss_curve.png: pip install matplotlib to get one")


if __name__ == "__main__":
    try:
        main()
    except (UsageError, Diverged, LeaderFailed) as exc:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        # Every rank raised the same error: leave together, once rank 0 has said why (a rank that exits
        # first makes torchrun kill the others, rank 0 too). On the host-side gloo group, which a collective
        # interrupted by the error cannot have left out of step; errors found before the process group
        # exists get a small gloo group for this one barrier.
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        if dist.is_initialized():
            dist.barrier(group=globals().get("CPU_GROUP"))
        sys.exit({UsageError: 2, Diverged: 3}.get(type(exc), 1))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

