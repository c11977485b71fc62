"""Exported models read back by plain transformers, in a process that never imports DeepSpeed (the tests in
tests/test_checkpoints.py run it with python; not a test itself). Prints one number, the largest logit difference:

  python tests/plain_worker.py models HF_A HF_B      two exported models on the same random tokens
  python tests/plain_worker.py saved LOGITS.pt HF    an exported model against logits saved by the sharded model
"""
import sys

import torch
import transformers

assert "deepspeed" not in sys.modules
mode, first, second = sys.argv[1:4]
if mode == "models":
    ids = torch.randint(0, 8000, (2, 48), generator=torch.Generator().manual_seed(0))
    a, b = (transformers.AutoModelForCausalLM.from_pretrained(d)(input_ids=ids).logits for d in (first, second))
else:
    saved = torch.load(first)
    a = transformers.AutoModelForCausalLM.from_pretrained(second)(input_ids=saved["input_ids"]).logits
    b = saved["logits"]
print((a - b).abs().max().item())
