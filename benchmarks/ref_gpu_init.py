"""Run ../shared/bench/plain_compiled.py unchanged except that its model is built on the GPU: random init of
1.4B fp32 weights on the host takes ~55 s, on the GPU well under a second; the timed loop is the same.

  python ref_gpu_init.py shared_bench/plain_compiled.py --shape 1.4b --mbs 10
"""
import runpy
import sys

import torch
import transformers

build = transformers.AutoModelForCausalLM.from_config


def from_config_on_gpu(*args, **kwargs):
    with torch.device("cuda"):
        return build(*args, **kwargs)


transformers.AutoModelForCausalLM.from_config = from_config_on_gpu
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
