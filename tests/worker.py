"""What the torchrun workers of the tests share (not a test itself): the script imported from the repository,
the start of a worker (the script's own preflight, then its process group), random token blocks, a worker's own
options, and the way out.

A worker module starts with `from worker import S, start, run_worker` and ends with `run_worker(main)`.
"""
import os
import sys
import traceback
from pathlib import Path

import datasets
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import autotp_custom_patterns as S  # noqa: E402


def start(*argv):
    """The script's preflight on argv (the layout from torchrun's RANK and WORLD_SIZE), then the process group.
    fp32 means fp32 on GPUs too (no TF32 matrix products). Returns the Run and the device."""
    run = S.preflight([str(a) for a in argv])
    device = S.init_distributed(run.args.local_rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return run, device


def random_blocks(n, seq_length, vocab, seed):
    """Random tokens from a small part of the vocabulary, so the loss has somewhere to fall."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 64), (n, seq_length), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")


def own_option(argv, flag):
    """Remove this worker's `flag VALUE` from argv; returns VALUE or None."""
    if flag not in argv:
        return None
    value = argv[argv.index(flag) + 1]
    del argv[argv.index(flag):argv.index(flag) + 2]
    return value


def run_worker(main):
    """Run a worker's main, destroy the process group, and leave without Python's finalization.

    A gloo thread can still be letting go of the last collective's tensors when the main thread reaches the
    end: if the interpreter is shutting down by then, the thread is stopped while it frees them and the process
    aborts (SIGABRT, "terminate called without an active exception") although its work went well. Seen ~1
    launch in 20 of four processes on two cores, in pt_gloo_runloop under Py_FinalizeEx (pytorch/pytorch
    issue 190489). os._exit skips that shutdown; the worker's output is written and flushed before."""
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
