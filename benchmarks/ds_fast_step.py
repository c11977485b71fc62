"""A faster ZeRO-1/2 optimizer step for DeepSpeed 0.19.8: the same update, without the host waits and the
per-tensor launches. install() patches DeepSpeedZeroOptimizer (deepspeed/runtime/zero/stage_1_and_2.py):

  get_grad_norm_direct    one torch._foreach_norm over the gradients (fp32 accumulation per tensor, the sum of
                          squares in fp64) instead of an fp64 copy and a vector_norm per tensor; the non-finite
                          mask with torch.where instead of mask_nan_or_inf_with_val_inplace, whose
                          torch.tensor(-1.0, device=cuda) waits for the GPU
  unscale_and_clip_grads  no bool() on the norm (is_invalid_grad_norm: a host sync per parameter group); with a
                          fused torch Adam/AdamW the clip divisor goes to the optimizer as `grad_scale` and is
                          applied inside its kernel, saving one pass over the fp32 gradients (fold=True)
  step                    the flat fp32 gradient is written in one pass from the bf16 pieces (torch.cat, then
                          .to(float32) in DeepSpeed: two passes and a bf16 copy of all gradients)

Semantics kept: the same clip factor (norm from the same gradients, +1e-6, clamped at 1), a non-finite norm clips
with an infinite norm as DeepSpeed does, get_global_grad_norm() returns the same device tensor, TP/DP reductions
of the norm unchanged. Only the bf16/fp32 path without CPU offload, ZenFlow or torch_autocast is touched.

  import ds_fast_step; ds_fast_step.install()      # before deepspeed.initialize or after: patches the class
  DS_FAST_STEP=1 (or =nofold) python ds_fast_step.py autotp_custom_patterns.py ...  # runs the script patched
"""
import os
import runpy
import sys

import torch

_ORIGINAL = {}
NORM_DTYPE = torch.float32  # float64 reproduces DeepSpeed's norm exactly (and its per-tensor casts): for tests


def _grad_norm_direct(self, gradients, params, norm_type=2):
    from deepspeed import comm as dist
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter
    if float(norm_type) != 2.0:
        return _ORIGINAL["get_grad_norm_direct"](self, gradients, params, norm_type)
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    kept = [g for g, p in zip(grads, params)
            if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
            and (is_model_parallel_parameter(p) or self.model_parallel_rank == 0)]
    if kept:
        if NORM_DTYPE == torch.float32:
            norms = torch._foreach_norm([g.detach() for g in kept], 2, dtype=torch.float32)
        else:
            norms = torch._foreach_norm([g.detach().to(NORM_DTYPE) for g in kept], 2)
        total = torch.stack(norms).double().pow(2).sum().float()
    else:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    return torch.where(torch.isfinite(total), total, torch.full_like(total, -1.0))  # DeepSpeed's -1 sentinel


def _foldable(self):
    opt = self.optimizer
    return (_ORIGINAL.get("fold") and getattr(opt, "_step_supports_amp_scaling", False)
            and all(g.get("fused") for g in opt.param_groups) and not self.torch_autocast_gradscaler
            and not self.cpu_offload)


def _unscale_and_clip(self, grad_groups_flat, total_norm):
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined = self.loss_scale
    if self.clip_grad > 0.0:
        valid = torch.isfinite(total_norm) & (total_norm >= 0)
        norm = torch.where(valid, total_norm, torch.full_like(total_norm, float("inf")))
        combined = torch.clamp((norm / self.loss_scale + 1e-6) / self.clip_grad, min=1.0) * self.loss_scale
    if torch.is_tensor(combined) and _foldable(self):
        self.optimizer.grad_scale = combined.float()  # the fused kernel divides each gradient by it
        return
    for grad in grad_groups_flat:
        for g in (grad if isinstance(grad, list) else [grad]):
            g.data.mul_(1.0 / combined)


def _optimizer_step(self, group_no):
    try:
        _ORIGINAL["_optimizer_step"](self, group_no)
    finally:
        self.optimizer.__dict__.pop("grad_scale", None)


def _flatten_as(dtype):
    def flatten(tensors):
        out = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=tensors[0].device)
        views = list(out.split([t.numel() for t in tensors]))
        torch._foreach_copy_([v.view(t.shape) for v, t in zip(views, tensors)], list(tensors))
        return out
    return flatten


def _step(self, closure=None):
    masters = self.single_partition_of_fp32_groups
    if self.cpu_offload or self.zenflow or not masters or masters[0].dtype == self.dtype:
        return _ORIGINAL["step"](self, closure)
    saved = self.flatten
    self.flatten = _flatten_as(masters[0].dtype)  # within step() it only builds the flat gradient partition
    try:
        return _ORIGINAL["step"](self, closure)
    finally:
        self.flatten = saved


def install(fold=True):
    """Patch DeepSpeedZeroOptimizer; idempotent. fold: hand the clip factor to a fused torch Adam(W)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Z
    if not _ORIGINAL:
        for name in ("get_grad_norm_direct", "unscale_and_clip_grads", "_optimizer_step", "step"):
            _ORIGINAL[name] = getattr(Z, name)
        Z.get_grad_norm_direct = _grad_norm_direct
        Z.unscale_and_clip_grads = _unscale_and_clip
        Z._optimizer_step = _optimizer_step
        Z.step = _step
    _ORIGINAL["fold"] = fold


def uninstall():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Z
    for name, fn in list(_ORIGINAL.items()):
        if name != "fold":
            setattr(Z, name, fn)
    _ORIGINAL.clear()


if __name__ == "__main__":  # run a script with the patch: python ds_fast_step.py SCRIPT ARGS...
    if os.environ.get("DS_FAST_STEP", "1") != "0":
        install(fold=os.environ.get("DS_FAST_STEP") != "nofold")
        print(f"ds_fast_step: DeepSpeedZeroOptimizer patched (fold={_ORIGINAL['fold']})", flush=True)
    # the deepspeed launcher puts --local_rank=N before the script's own arguments: the script is the first .py
    script = next(a for a in sys.argv[1:] if a.endswith(".py"))
    rest = sys.argv[1:]
    rest.remove(script)
    sys.argv = [script] + rest
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
