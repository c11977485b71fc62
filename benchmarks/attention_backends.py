"""Which SDPA kernel the model's attention gets, and what each available one costs, on this GPU.

One Pythia-1.4B attention call (micro-batch 8, 16 heads, seq 2048, head size 128, causal, bf16) through
each of torch's SDPA backends: the largest difference from an fp64 reference for the output and the three
input gradients, and the time of forward + backward. First it names the kernel SDPA picks by itself, as the
Hugging Face model calls it (is_causal=True, no mask).

  python benchmarks/attention_backends.py [--batch_size 8 --heads 16 --seq_length 2048 --head_size 128]
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def run(q, k, v, grad, backend):
    for t in (q, k, v):
        t.grad = None
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("--batch_size", 8), ("--heads", 16), ("--seq_length", 2048), ("--head_size", 128)):
        p.add_argument(name, type=int, default=default)
    args = p.parse_args()
    torch.manual_seed(0)
    shape = (args.batch_size, args.heads, args.seq_length, args.head_size)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference = run(*exact, grad.double(), SDPBackend.MATH)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
    picked = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; SDPA by itself runs: {'; '.join(picked)}")
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        errors = [(got.double() - want).abs().max().item() for got, want in zip(run(q, k, v, grad, backend), reference)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            run(q, k, v, grad, backend)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 100
        print(f"{backend.name:20s} forward+backward {ms:5.2f} ms | largest |error| out {errors[0]:.1e}, "
              f"dq {errors[1]:.1e}, dk {errors[2]:.1e}, dv {errors[3]:.1e}")


if __name__ == "__main__":
    main()
