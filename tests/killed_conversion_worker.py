"""One process of the killed-conversion test (tests/test_checkpoints.py runs it with python; not a test itself).

Converts a checkpoint with the script's universal_checkpoint, but DeepSpeed's converter is replaced at its second
step by a SIGKILL of this process: the first step has written its ZeRO fragments into the .partial directory by
then (a real conversion of the tiny model takes 0.4 s, too short to hit from outside).

usage: python tests/killed_conversion_worker.py CHECKPOINT_DIR
"""
import os
import pathlib
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import autotp_custom_patterns as S  # noqa: E402
from deepspeed.checkpoint import ds_to_universal  # noqa: E402

ds_to_universal._merge_tp_slice_files = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
S.universal_checkpoint(pathlib.Path(sys.argv[1]), S.Layout(0, 1, 1, 1))
