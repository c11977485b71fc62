"""One process of the recipe test (tests/test_recipe.py launches it with torchrun; not a test itself).

The script's recipe section, with the script's imports and nothing else, is run as a module of its own and
driven by the few lines below: a tiny GPT-NeoX trained at tp 2 for four steps. The same lines then drive the
script's own functions on the same model and data; rank 0 writes both runs' losses as JSON to argv[1].

usage: torchrun --standalone --nproc_per_node 2 tests/recipe_worker.py OUT.json
"""
import ast
import json
import sys
import types
from pathlib import Path

import datasets
import deepspeed
import torch
import torch.distributed as dist
import transformers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "autotp_custom_patterns.py"


def recipe_source():
    """The script's import statements, then its recipe section (from the recipe's banner to the next one)."""
    text = SCRIPT.read_text()
    imports = [ast.get_source_segment(text, node) for node in ast.parse(text).body
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    start = text.index("# ==== THE RECIPE")
    return "\n".join(imports) + "\n\n" + text[start:text.index("\n# ==== ", start + 1)]


def losses(recipe, layout, steps=4):
    args = types.SimpleNamespace(batch_size=2, gradient_accumulation_steps=1, max_grad_norm=1.0, zero_stage=2,
                                 precision="fp32", tp_size=layout.tp, vocab_parallel=True, tp_overlap_comm=False,
                                 deepcompile=False, offload_optimizer=False, learning_rate=1e-2, weight_decay=0.01, warmup_steps=1,
                                 num_steps=steps)
    config = transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        intermediate_size=256, vocab_size=1024, tie_word_embeddings=False)
    transformers.set_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    ds_config = recipe.build_ds_config(args, {"partition_config": recipe.builtin_partition_config()})
    engine = recipe.build_engine(model, args, layout, ds_config)
    ids = torch.randint(0, 64, (32, 32), generator=torch.Generator().manual_seed(1))
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    batches = recipe.train_batches(dataset, layout, args.batch_size, args.batch_size * layout.dp, 0, torch.device("cpu"))
    return [recipe.dp_mean(recipe.train_step(engine, batches), engine, layout) for _ in range(steps)]


def main():
    recipe = types.ModuleType("recipe")
    exec(compile(recipe_source(), "the recipe section", "exec"), recipe.__dict__)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # CPU: gloo is enough, nothing to compile
    deepspeed.init_distributed()
    layout = recipe.resolve_layout(dist.get_rank(), dist.get_world_size(), tp=2)
    import autotp_custom_patterns as script  # only now: the recipe ran without it
    result = {"recipe": losses(recipe, layout), "script": losses(script, layout), "tp": layout.tp}
    if layout.rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from worker import run_worker
    run_worker(main)
