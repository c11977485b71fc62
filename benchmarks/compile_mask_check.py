"""What attention mask each GPT-NeoX layer receives, run eagerly and with the whole model under torch.compile.

Why the script's --compile compiles each block rather than the whole model: with torch 2.11 and
transformers 5.17 (the H100 machine) the whole-model graph hands every layer an explicit boolean causal
mask, where the eager model hands it none (and SDPA then runs with is_causal=True); the cuDNN attention
kernels were 3x slower with the mask. A block compiled on its own receives what the eager model gives it.
With torch 2.13 and transformers 5.23 (the CPU machine) both runs receive no mask: newer versions may make
whole-model compilation as fast, but per block is fast with either.

  python benchmarks/compile_mask_check.py      (a tiny random model; on the GPU if there is one)
"""
import sys
from pathlib import Path

import torch
import transformers
import transformers.models.gpt_neox.modeling_gpt_neox as gpt_neox

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import autotp_custom_patterns as S  # noqa: E402


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = S.load_config(S.parse_args(["--model_name", "builtin:tiny"]))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device)
    seen = []
    forward = gpt_neox.GPTNeoXAttention.forward

    def recording(self, hidden_states, attention_mask, *args, **kwargs):
        seen.append(None if attention_mask is None else (tuple(attention_mask.shape), attention_mask.dtype))
        return forward(self, hidden_states, attention_mask, *args, **kwargs)

    gpt_neox.GPTNeoXAttention.forward = recording
    ids = torch.randint(0, config.vocab_size, (2, 64), device=device)
    for name, run in (("eager", model), ("whole model compiled", torch.compile(model))):
        seen.clear()
        run(input_ids=ids, labels=ids)
        print(f"{name}: mask per layer {seen}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device}")


if __name__ == "__main__":
    main()
