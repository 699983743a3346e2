"""bf16 inference for the diffusion policy's networks; training always runs in fp32 on fp32 weights.

Modules that can run in bf16 derive from `Bf16Inference`; `set_inference_precision(module, p)` sets
their setting ("fp32", "bf16" or "auto": resolved on each call's device by
`wm.precision.resolve_precision`, bf16 where the hardware has bf16 units) on every one inside `module`.
They take a bf16 path only with autograd off, so a training step, whatever the setting, sees the fp32
weights. Where bf16 runs is then chosen by measurement on CPUs (`wm.kernels`), never by a threshold:

    UNet conv and FiLM layers (`unet.Conv1d`, `unet.ConvTranspose1d`, `unet.Linear`) choose, per
    input shape, among fp32 kernels (PyTorch's; for convolutions also oneDNN and a matrix product)
    and, in bf16, the same on a cached bf16 copy of their weights; with "auto", also among int8
    weights (a cached per-row quantized copy); GroupNorm and Mish stay fp32.
    Whole-network owners (the image backbone, the transformer denoiser) choose per input shape between
    the fp32 network and a bf16 copy kept by a `Shadow` (`Bf16Inference.run_in_precision`); the
    image backbone also per input layout between its weights as they are and a channels-last copy
    (in fp32 too).

Every copy is keyed on the version counters and storage of the fp32 tensors it was made from
(`wm.precision.tensor_key`), so an optimizer step, `load_state_dict` or a device move refreshes it on
the next call. A write the version counter does not see (through `.data`, or into inference tensors
under `torch.inference_mode`) is not noticed: call `set_inference_precision` again after one, which drops
every cached copy. On GPUs the bf16 paths run without measurement.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from wm import kernels
from wm.precision import Shadow, check_precision, resolve_precision, tensor_key

MEMO_LIMIT = 256  # memoized choices per layer (by shape and weights) before they are forgotten

__all__ = [
    "Bf16Inference",
    "Shadow",
    "check_precision",  # also imported from here by policies.diffusion.policy
    "fp32_inference",
    "set_inference_precision",
    "tensor_key",
]


class Bf16Inference:
    """Mixin for modules with a bf16 inference path; `inference_precision` is the setting."""

    inference_precision = "fp32"

    def active_precision(self, x: Tensor) -> str:
        """What a call on `x` runs in: "bf16" or "fp32" (always fp32 with autograd on, or in training
        mode: dropout would make a calibration compare two different draws)."""
        p = self.inference_precision
        if p == "fp32" or torch.is_grad_enabled() or getattr(self, "training", False):
            return "fp32"
        return p if p == "bf16" else resolve_precision(p, x.device)

    def bf16_active(self, x: Tensor) -> bool:
        return self.active_precision(x) == "bf16"

    def clear_bf16(self) -> None:
        """Drop cached copies of the network (bf16, channels-last: rebuilt on the next call using one)."""
        for value in list(vars(self).values()):
            for shadow in value.values() if isinstance(value, dict) else (value,):
                if isinstance(shadow, Shadow):
                    shadow.clear()

    def run_in_precision(
        self,
        inputs: tuple[Tensor | None, ...],
        fp32: Callable[[], Tensor],
        bf16: Callable[[], Tensor],
        variants: Mapping[str, Callable[[], Tensor]] | None = None,
    ) -> Tensor:
        """`fp32()` or `bf16()` (the network's bf16 copy, output back in fp32) for a call on `inputs`
        (the first one a tensor): fp32 unless bf16 is active; on a CPU, bf16 only where it was measured
        faster than fp32 by `wm.kernels.MARGIN` and within `wm.kernels.MODULE_BF16_TOL` of it.
        `variants`: other ways to compute the same call (an image network's memory layouts), named
        "fp32_..." or "bf16_...": on a CPU with autograd off each is measured beside the two above where
        its precision is active (fp32 ones within `wm.kernels.FP32_TOL` of `fp32()`)."""
        x = inputs[0]
        assert x is not None
        precision = self.active_precision(x)  # fp32 with autograd on or in training mode
        variants = variants or {}
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return bf16() if precision == "bf16" else fp32()
        # fp32 has nothing to measure without variants, nor with autograd on or in training mode
        training = torch.is_grad_enabled() or getattr(self, "training", False)
        if precision == "fp32" and (not variants or training):
            return fp32()
        candidates = {"fp32": fp32, **({"bf16": bf16} if precision == "bf16" else {})}
        candidates.update({n: f for n, f in variants.items() if n.partition("_")[0] in candidates})
        memo = self.__dict__.setdefault("_precision_memo", {})
        assert isinstance(self, nn.Module)
        weights = tensor_key(self.parameters())  # bf16's accuracy was checked on these weights
        layout = kernels.layout(x)  # PyTorch's own fp32 path is slower on some layouts than others
        mk = (tuple(None if t is None else t.shape for t in inputs), x.dtype, layout, precision)
        mk += (kernels.memo_token(), weights)
        choice = memo.get(mk)
        if choice is None:
            if len(memo) > MEMO_LIMIT:  # entries of earlier weights (a training run's validations)
                memo.clear()
            key = f"module {kernels.module_signature(self)} in={kernels.shapes(*inputs)} {layout} {x.dtype}"
            choice = kernels.choose(
                f"{key} {precision}",
                candidates,
                native="fp32",
                tol={n: kernels.MODULE_BF16_TOL if n[:4] == "bf16" else kernels.FP32_TOL for n in candidates},
                default="bf16" if precision == "bf16" else "fp32",
            )
            kernels.remember(memo, mk, choice)
        return candidates[choice]()


STACKED_CACHE = "_fused_film"  # a module's weights stacked for inference (the UNet's FiLM layers)


def set_inference_precision(module: nn.Module, precision: str) -> None:
    """Run every bf16-capable part of `module` at inference in `precision` ("fp32", "bf16" or "auto");
    training stays fp32. Drops every cached copy of the weights (bf16, int8, stacked FiLM layers)."""
    check_precision(precision, allow_auto=True)
    for m in module.modules():
        m.__dict__.pop(STACKED_CACHE, None)
        if isinstance(m, Bf16Inference):
            m.inference_precision = precision
            m.clear_bf16()


_FP32_HELD = "_fp32_inference_held"  # a part's (blocks holding it at fp32, its own precision)
_fp32_lock = threading.Lock()


@contextlib.contextmanager
def fp32_inference(*modules: nn.Module) -> Iterator[None]:
    """Inside the block every bf16-capable part of `modules` runs fp32 with PyTorch's kernels, whatever
    its setting (restored after the last block holding it ends: two blocks overlapping in two threads
    left it fp32 for good): for the autograd-off parts of a training step, e.g. a distillation teacher
    and target, which a training step must not compute in bf16 or int8. The kernel mode is this
    thread's (`kernels.mode`); the parts' precision is the modules', for every thread using them."""
    parts = list(
        {id(m): m for mod in modules for m in mod.modules() if isinstance(m, Bf16Inference)}.values()
    )
    with _fp32_lock:
        for m in parts:
            held, own = m.__dict__.get(_FP32_HELD, (0, m.inference_precision))
            m.__dict__[_FP32_HELD] = (held + 1, own)
            m.inference_precision = "fp32"
    try:
        with kernels.mode("native"):
            yield
    finally:
        with _fp32_lock:
            for m in parts:
                held, own = m.__dict__.pop(_FP32_HELD)
                if held > 1:
                    m.__dict__[_FP32_HELD] = (held - 1, own)
                else:
                    m.inference_precision = own
