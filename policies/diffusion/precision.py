"""bf16 inference for the diffusion policy's networks; training always runs in fp32 on fp32 weights.

Modules that can run in bf16 derive from `Bf16Inference`; `set_inference_precision(module, p)` sets the
flag on every one inside `module`. They take their bf16 path only with autograd off, so a training
step, whatever the flag, sees the fp32 weights. Two kinds:

    UNet conv layers (`unet.Conv1d`, `unet.ConvTranspose1d`) keep a bf16 copy of their own weights
    and run only the convolution in bf16 (GroupNorm, Mish, FiLM stay fp32).
    Whole-network owners (the ResNet-18 image backbone, the transformer denoiser) run a bf16 copy
    of a submodule kept by a `Bf16Shadow`.

Every copy is keyed on the version counters and storage of the fp32 tensors it was made from, so an
optimizer step, `load_state_dict` (both bump the versions) or a device move (new storage) refreshes
it on the next call; no stale weights are ever used.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from wm.precision import check_precision  # also imported from here by policies.diffusion.policy


def tensor_key(tensors) -> tuple:
    """What identifies the current values of these tensors: storage pointer and version counter."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


class Bf16Shadow:
    """A cached bf16 copy of one module for inference (same training mode), rebuilt when the module's
    parameters or buffers change. Held as a plain attribute (not a submodule: no state-dict entries)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._copy: nn.Module | None = None

    def __call__(self, module: nn.Module) -> nn.Module:
        key = tensor_key(itertools.chain(module.parameters(), module.buffers()))
        if self._copy is None or key != self._key:
            # The memo maps this shadow to None, so the copy does not carry a copy of the shadow itself.
            shadow = copy.deepcopy(module, memo={id(self): None})
            self._copy, self._key = shadow.requires_grad_(False).bfloat16(), key
        if self._copy.training != module.training:
            self._copy.train(module.training)
        return self._copy

    def clear(self) -> None:
        self._key = self._copy = None


class Bf16Inference:
    """Mixin for modules with a bf16 inference path; `bf16_active()` says whether to take it now."""

    bf16_inference = False

    def bf16_active(self) -> bool:
        return self.bf16_inference and not torch.is_grad_enabled()

    def clear_bf16(self) -> None:
        """Drop cached bf16 copies (they are rebuilt on the next bf16 call)."""
        shadow = getattr(self, "_bf16", None)
        if shadow is not None:
            shadow.clear()


def set_inference_precision(module: nn.Module, precision: str) -> None:
    """Run every bf16-capable part of `module` in fp32 or bf16 at inference (training stays fp32)."""
    check_precision(precision)
    for m in module.modules():
        if isinstance(m, Bf16Inference):
            m.bf16_inference = precision == "bf16"
            m.clear_bf16()
