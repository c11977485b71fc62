"""One process of the spec-source table (tests/test_sources.py launches it with torchrun; not a test itself).

For each architecture below and each source of TP specs that claims to cover it (a file of partition_configs/,
a DeepSpeed preset, the model's Hugging Face tp_plan, DeepSpeed's automatic parser), a tiny random model (fp32)
goes through the script's own steps: spec_source and plan_partition on the shapes-only model, build_engine
(which localizes the head counts), and verify_tp against the same model unsharded, on one 32-token sequence. Each cell
is one record: "passes" (with the logits' max difference), "differs" (the first module that disagrees), "drifts"
(the forward agrees, but after three training steps the weights held whole differ across TP ranks:
check_replicated_in_sync), "refused" (the script's one-line check, before any weight loads) or "crashes" (the
error DeepSpeed or the model raised). Rank 0 writes them as JSON to argv[1].

usage: torchrun --standalone --nproc_per_node T tests/sources_worker.py OUT.json --tp_size T [ARCH ...]
"""
import json
import os
import sys
from pathlib import Path

import torch
import transformers

from worker import S, run_worker, start

CONFIGS = Path(__file__).resolve().parents[1] / "partition_configs"
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, vocab_size=512,
             max_position_embeddings=128, tie_word_embeddings=False)
GQA = dict(SMALL, num_key_value_heads=4)  # 8 query heads, 4 key/value heads
MHA = dict(SMALL, num_key_value_heads=8)

# name: (config, the sources that claim to cover it); "file:X" is partition_configs/X, "file:phi3@sizes" the
# Phi-3 specs written for this model's sizes (the rule of partition_configs/phi3_*.json)
ARCHITECTURES = {
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(**dict(SMALL, intermediate_size=256)),
                 ["builtin", "file:gpt_neox.json", "tp_plan"]),
    "llama": (lambda: transformers.LlamaConfig(**GQA), ["file:llama.json", "preset:llama", "tp_plan"]),
    "mistral": (lambda: transformers.MistralConfig(**GQA), ["file:llama.json", "preset:llama", "tp_plan"]),
    "qwen2": (lambda: transformers.Qwen2Config(**GQA), ["file:llama.json", "preset:qwen2", "tp_plan"]),
    "qwen3": (lambda: transformers.Qwen3Config(**GQA, head_dim=8), ["file:llama.json", "preset:qwen2", "tp_plan"]),
    "gemma": (lambda: transformers.GemmaConfig(**GQA, head_dim=8), ["file:llama.json", "preset:llama", "tp_plan"]),
    "phi3": (lambda: transformers.Phi3Config(**MHA, pad_token_id=0),
             ["file:phi3_mini.json", "file:phi3@sizes", "preset:phi3", "tp_plan"]),
    "phi3 GQA": (lambda: transformers.Phi3Config(**dict(SMALL, hidden_size=128, num_key_value_heads=2), pad_token_id=0),
                 ["file:phi3_medium.json", "file:phi3@sizes", "preset:phi3", "tp_plan"]),
    "mixtral": (lambda: transformers.MixtralConfig(**GQA, num_local_experts=2, num_experts_per_tok=1),
                ["file:mixtral.json", "file:llama.json", "preset:mixtral", "tp_plan"]),
    "falcon": (lambda: transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                                 vocab_size=512, new_decoder_architecture=False, multi_query=False),
               ["autotp_parser"]),
    "opt": (lambda: transformers.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, ffn_dim=128,
                                           vocab_size=512, word_embed_proj_dim=64), ["autotp_parser"]),
    "gpt2": (lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=8, vocab_size=512, n_positions=128),
             ["autotp_parser"]),
    # last: its forward fails part-way under DeepSpeed's parser, which leaves the ranks' collectives out of step
    "bloom": (lambda: transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=8, vocab_size=512),
              ["preset:bloom", "autotp_parser"]),
}


def phi3_specs_at(config, path):
    """The Phi-3 specs with this model's sizes: qkv_proj is [Q; K; V] (q = heads x head_dim, kv = kv_heads x
    head_dim), gate_up_proj [gate; up] (the MLP width each)."""
    head_dim = config.hidden_size // config.num_attention_heads
    q, kv, width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim, config.intermediate_size
    specs = json.loads((CONFIGS / "phi3_medium.json").read_text())
    specs["layer_specs"][0]["shape"] = [[q, kv, kv], -1]
    specs["layer_specs"][2]["shape"] = [[width, width], -1]
    path.write_text(json.dumps(specs))
    return str(path)


def partition_flag(source, config, workdir):
    """The --partition_config value of a source (None for the built-in specs)."""
    if source == "builtin":
        return None
    if source == "file:phi3@sizes":  # a file per rank: ranks writing one file at once could read half of it
        return phi3_specs_at(config, workdir / f"phi3_at_sizes_rank{os.environ['RANK']}.json")
    return str(CONFIGS / source.removeprefix("file:")) if source.startswith("file:") else source


def cell(arch, source, tp, device, workdir):
    """One verification; the record of what happened. The model's config is saved where the script's
    preflight reads it (--model_name DIR --random_init), so the specs go through the script's own checks."""
    config = ARCHITECTURES[arch][0]()
    model_dir = workdir / f"{arch.replace(' ', '_')}_rank{os.environ['RANK']}"
    config.save_pretrained(model_dir)
    flag = partition_flag(source, config, workdir)
    try:
        run = S.preflight(["--model_name", str(model_dir), "--random_init", "--precision", "fp32", "--seq_length", "32",
                           "--tp_size", str(tp), "--no-vocab_parallel", "--verify_tp",
                           *(["--partition_config", flag] if flag else [])])
    except S.UsageError as exc:
        return {"result": "refused", "detail": str(exc)}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    probe = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    reference = S.module_outputs(model, probe) if run.layout.rank == 0 else None
    try:
        engine = S.build_engine(model, run.args, run.layout, run.ds_config)
        plan = run.plan or run.source.plan(run.shapes_only, tp, sharded=engine.module)
        S.check_partition(engine.module, plan)
        report = S.verify_tp(engine, probe.to(device), reference, plan, run)
        for _ in range(3):  # then three optimizer steps on it: the weights held whole must stay in step
            S.train_step(engine, iter([probe.to(device)]))
        S.check_replicated_in_sync(engine.module, run.layout, 3)
    except S.UsageError as exc:
        kind = "differs" if str(exc).startswith("--verify_tp") else "drifts" if str(exc).startswith("at step") else "crashes"
        return {"result": kind, "detail": str(exc)}
    except Exception as exc:  # what DeepSpeed or the model's forward raises: the cell records it
        return {"result": "crashes", "detail": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    return {"result": "passes", "detail": f"logits {report['logits_max_diff']:.1e}",
            "logits_max_diff": report["logits_max_diff"]}


def main():
    out_path, argv = sys.argv[1], sys.argv[2:]
    tp = int(argv[argv.index("--tp_size") + 1])
    archs = argv[argv.index("--tp_size") + 2:] or list(ARCHITECTURES)
    run, device = start("--model_name", "builtin:tiny", "--tp_size", tp)
    workdir = Path(out_path).parent
    records = []
    for arch in archs:
        for source in ARCHITECTURES[arch][1]:
            records.append({"architecture": arch, "source": source, "tp": tp, **cell(arch, source, tp, device, workdir)})
            if run.layout.rank == 0:
                print(json.dumps(records[-1]), flush=True)
    if run.layout.rank == 0:
        Path(out_path).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    run_worker(main)
