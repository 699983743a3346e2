"""Precision names, the resolver of "auto", and the cached bf16 copies inference runs on.

Names. `PRECISIONS` ("fp32", "bf16") are what runs: the trainer's `TrainerConfig.precision` (bf16
autocast for training) accepts only these. Inference settings (`DiffusionPolicyConfig.precision`,
`PredictorConfig.precision`) also accept "auto" (`INFERENCE_PRECISIONS`), which `resolve_precision`
turns into the precision used on a device: bf16 where the hardware has bf16 units (a CPU with
AVX512-BF16 or AMX-BF16, a CUDA GPU that supports bf16), fp32 elsewhere. The resolved name is what
models report as their precision. Under "auto" a layer may also run on int8 weights
(`quantize_int8_rows`: the diffusion UNet's large convolutions on a CPU, where measured faster and
within `wm.kernels.INT8_TOL`); "fp32" and "bf16" never do.

bf16 copies. `tensor_key` identifies the current values of tensors (storage pointer and version
counter) and `Shadow` keeps a bf16 (or channels-last) copy of a module rebuilt whenever that key
changes, so an optimizer step, `load_state_dict` (both bump the versions) or a device move (new
storage) refreshes the copy on the next call. A write the version counter does not see (through
`.data`, or into inference tensors under `torch.inference_mode`) is not noticed: set the module's
inference precision again after one (`Shadow.clear`).
"""

from __future__ import annotations

import copy
import functools
import itertools
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")
AUTO = "auto"
INFERENCE_PRECISIONS = (*PRECISIONS, AUTO)
# /proc/cpuinfo flags of x86 CPUs with bf16 arithmetic units (AVX512-BF16 dot products, AMX tiles)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def check_precision(precision: str, allow_auto: bool = False) -> str:
    """Return `precision` if it is a valid name ("auto" only with `allow_auto`), else raise a
    ValueError naming the valid ones."""
    valid = INFERENCE_PRECISIONS if allow_auto else PRECISIONS
    if precision not in valid:
        raise ValueError(f"precision must be one of {valid}, got {precision!r}")
    return precision


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, tuple[str, ...]]:
    """(model, its bf16 flags among `BF16_CPU_FLAGS`) of this machine's CPU, from /proc/cpuinfo (Linux);
    elsewhere the platform's processor string and no flags. The model is the model name with the
    numbers that tell CPUs of one name apart (x86: family, model, stepping, as a VM's "AMD EPYC" names
    several generations; ARM, which has no model name: implementer, part, variant)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text)


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """`cpu_info` of a /proc/cpuinfo text."""
    import platform

    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())  # the first processor's
    ids = [("family", "cpu family"), ("model", "model"), ("stepping", "stepping")]
    ids += [("implementer", "CPU implementer"), ("part", "CPU part"), ("variant", "CPU variant")]
    numbers = " ".join(f"{short} {fields[key]}" for short, key in ids if fields.get(key))
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    model = f"{model} ({numbers})" if numbers else model
    flags = set(fields.get("flags", "").split())
    return model, tuple(f for f in BF16_CPU_FLAGS if f in flags)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic units (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_info()[1])


@functools.lru_cache(maxsize=16)
def _auto(device_type: str, index: int | None = None) -> str:
    if device_type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    if device_type == "cuda" and torch.cuda.is_available():
        # bf16 units from Ampere (compute capability 8) on, per GPU: torch.cuda.is_bf16_supported() also
        # counts emulated bf16 (a V100 or T4: slower than fp32) and asks the current device only
        major, _ = torch.cuda.get_device_capability(index)
        return "bf16" if major >= 8 else "fp32"
    return "fp32"


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """The precision inference runs in on `device`: "fp32" / "bf16" as given; "auto" -> bf16 where the
    hardware has bf16 units (see the module docstring), else fp32."""
    check_precision(precision, allow_auto=True)
    if precision != AUTO:
        return precision
    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None and torch.cuda.is_available():
        index = torch.cuda.current_device()  # (cached per GPU: "cuda" is whichever is current)
    return _auto(device.type, index)


def describe_hardware() -> str:
    """One line for benchmark output: the CPU model, its bf16 units, and what "auto" resolves to."""
    model, flags = cpu_info()
    units = ", ".join(flags) if flags else "no bf16 units"
    return f"{model} ({units}; auto -> {resolve_precision(AUTO, 'cpu')} on CPU)"


def tensor_key(tensors) -> tuple:
    """What identifies the current values of these tensors: storage pointer and version counter. An
    inference tensor (made under `torch.inference_mode`, e.g. the weights of a bf16 copy built there)
    has no version counter and can only change in place under inference mode: its pointer alone."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of a 2-D weight, w ~ q * scale[:, None]: (int8 (N, K)
    contiguous, fp32 scale (N,)); a row of zeros gets scale 1 (its q is 0)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D float weight matrix, got {tuple(w.shape)} {w.dtype}")
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Shadow:
    """A cached copy of one module for inference (same training mode) in `dtype`, its 4-D weights
    channels-last where `channels_last`, rebuilt when the module's parameters or buffers change. Held
    as a plain attribute (not a submodule: no state-dict entries); a deep copy of the owner gets an
    empty shadow of the same kind, not a copy of the cached one."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, channels_last: bool = False) -> None:
        self.dtype, self.channels_last = dtype, channels_last
        self._key: tuple | None = None
        self._copy: nn.Module | None = None

    def __call__(self, module: nn.Module) -> nn.Module:
        key = tensor_key(itertools.chain(module.parameters(), module.buffers()))
        if self._copy is None or key != self._key:
            # The memo maps this shadow to None, so the copy does not carry a copy of the shadow itself.
            shadow = copy.deepcopy(module, memo={id(self): None}).requires_grad_(False).to(self.dtype)
            if self.channels_last:
                shadow = shadow.to(memory_format=torch.channels_last)
            self._copy, self._key = shadow, key
        if self._copy.training != module.training:
            self._copy.train(module.training)
        return self._copy

    def __deepcopy__(self, memo: dict) -> Shadow:
        return Shadow(self.dtype, self.channels_last)

    def clear(self) -> None:
        self._key = self._copy = None
