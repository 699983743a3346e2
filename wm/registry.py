"""One registry of trainable model types: the only place a model type name is dispatched on.

Each entry says how a model is configured from a store and the user's options, how it is built from
its config and a normalizer, which controllers it can serve, how it is validated during training
and how its checkpoint becomes an inference model. `wm-train`, `wm-eval` and the benchmarks look
names up here; nothing else branches on a type string.

A registered model is an `nn.Module` with
    io_spec: wm.spec.IOSpec                        what it reads and writes
    window_spec() -> wm.data.windows.WindowSpec    the step offsets a training window needs
    compute_loss(batch) -> (loss, metrics)         the one trainer's interface
and, to train from a feature cache, `feature_cache_source() -> (frozen encoder, camera key(s)) | None`
(with `frames_beside_features() -> (camera, window offsets)` where training still needs some pixels).

Adding a model: write its module (a config dataclass with `from_dict` / `to_dict`, and the model),
a `ModelEntry` for it (its `configure`, validation and, for a policy, its controller; see
`wm/dino_entry.py` or `policies/diffusion/entry.py`), and add one line to `MODELS` below; then
`wm-train model=<name>` needs a `configs/model/<name>.yaml` with `type: <name>` and its defaults.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wm.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from wm.data.normalize import Normalizer

# name -> "module:attribute" of a ModelEntry; modules load only when their entry is used
MODELS: dict[str, str] = {
    "dino_wm": "wm.dino_entry:ENTRY",
    "diffusion_unet": "policies.diffusion.entry:UNET",
    "diffusion_transformer": "policies.diffusion.entry:TRANSFORMER",
    "consistency": "policies.diffusion.consistency:ENTRY",
    "uwm": "wm.uwm_entry:ENTRY",
    "autoencoder": "wm.autoencoder:ENTRY",
}

CONTROLLERS = ("mpc", "policy")


def camera_names(listed: str | Sequence[str]) -> list[str]:
    """The cameras an `image_keys` option lists: one name, or a list of them (a name given alone was
    split into its letters: no camera 'w', 'r', 'i', ...)."""
    return [listed] if isinstance(listed, str) else [str(k) for k in listed]


@dataclass(frozen=True)
class TrainContext:
    """What a model's `configure` may read: the store's facts and the app's model-level options.

    image_key / proprio_key: the camera and proprioception keys chosen (proprio None when the store
    has none); key_shapes: every store key's per-step shape; teacher: a teacher run directory for
    models distilled from another (None otherwise); in_memory: whether training loads the store into
    memory (what `configure` trains first, UWM's default autoencoder, does the same)."""

    store: str
    image_key: str
    proprio_key: str | None
    key_shapes: dict[str, tuple[int, ...]]
    teacher: str | None = None
    in_memory: bool = True

    def cameras(self, listed: str | Sequence[str] | None) -> list[str]:
        """The cameras a model option lists (`camera_names`), else the chosen image_key."""
        return camera_names(listed) if listed else [self.image_key]

    def camera_size(self, image_keys: Sequence[str]) -> tuple[int, int]:
        """The frame size (H, W) every camera of `image_keys` shares; a camera the store lacks, a key that
        is not a camera, or two sizes is one clear error."""
        bad = [k for k in image_keys if len(self.key_shapes.get(k, ())) != 3]
        if bad or not image_keys:
            cams = sorted(k for k, s in self.key_shapes.items() if len(s) == 3)
            raise ValueError(f"{self.store}: no camera(s) {bad or '(none given)'}; its cameras: {cams}")
        sizes = {k: tuple(int(v) for v in self.key_shapes[k][:2]) for k in image_keys}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{self.store}: cameras {list(image_keys)} differ in frame size {sizes}")
        return sizes[image_keys[0]]


@dataclass(frozen=True)
class ModelEntry:
    """A trainable model type.

    configure(options, ctx) -> config dict: the user's `model.*` options completed with what the store
        says (keys, shapes, dims); `config_type.from_dict` validates it.
    build(config, normalizer) -> the model to train.
    controllers: "mpc" (a world model planners use) and/or "policy" (the model is served by
        `policy(model)`, a controller satisfying `policies.base.Policy`); none, `()`, for a component
        model: trained and loaded like the others but serving no controller (the autoencoder whose
        latents UWM denoises).
    proprio_norm: how proprioception is normalized ("meanstd" | "minmax"); actions are min-max.
    normalizer(ctx) -> a ready normalizer instead of one fitted on the training episodes (a distilled
        model keeps its teacher's), or None to fit one.
    validation(model, data_path, val_episodes, in_memory, frames_from) -> a trainer `val_fn`, or None;
        `frames_from` is the store when `data_path` is its feature cache (None otherwise), where
        validation wants pixels too (DINO-WM's decoded prediction strip).
    val_metrics: the names of the metrics `validation`'s val_fn returns, first the one
        `trainer.best_metric=auto` keeps best.pt by: wm-train checks a best_metric against them before
        any work (a misspelt one was refused only at the first validation).
    inference(config, normalizer) -> the model evaluated and deployed (default: `build`); its weights
        are the checkpoint's (the trainer's EMA copy when `use_ema`), with `state_prefix` stripped from
        their names when given.
    trainer_overrides: trainer settings the model needs whatever the user sets (a model that keeps
        its own EMA turns the trainer's off); `wm-train` says when it applies them.
    overridable: config fields a user may change at load time (`load_model(..., overrides)`), dotted
        for nested ones ("noise.edm_solver").
    needs_actions: the model reads actions at all (False: frames only, e.g. an image autoencoder, which
        trains on any store with the camera and brings its own (empty) normalizer).
    action_free: the model trains on windows without actions too (a batch's `has_action` (B,) says
        which have them): stores without an action key, episodes flagged action-free, `video_store=`.
    distilled: the model learns from a trained teacher (`teacher=DIR`); the others refuse one.
    """

    config_type: type
    build: Callable[[Any, Normalizer], nn.Module]
    configure: Callable[[dict[str, Any], TrainContext], dict[str, Any]]
    controllers: tuple[str, ...]
    description: str = ""
    proprio_norm: str = "minmax"
    normalizer: Callable[[TrainContext], Normalizer | None] | None = None
    validation: Callable[[nn.Module, str, list[int], bool, str | None], Any] | None = None
    val_metrics: tuple[str, ...] = ()
    policy: Callable[[nn.Module], Any] | None = None
    inference: Callable[[Any, Normalizer], nn.Module] | None = None
    state_prefix: str = ""
    use_ema: bool = True
    trainer_overrides: Mapping[str, Any] = field(default_factory=dict)
    overridable: tuple[str, ...] = field(default_factory=tuple)
    action_free: bool = False
    needs_actions: bool = True
    distilled: bool = False

    def __post_init__(self) -> None:
        bad = [c for c in self.controllers if c not in CONTROLLERS]
        if bad:
            raise ValueError(f"controllers must be among {CONTROLLERS}, got {self.controllers}")
        if "policy" in self.controllers and self.policy is None:
            raise ValueError("an entry serving the 'policy' controller needs policy(model)")
        if (self.validation is None) != (not self.val_metrics):
            raise ValueError("an entry with validation names its val_metrics, and only then")


def model_names() -> list[str]:
    return sorted(MODELS)


def model_entry(name: str) -> ModelEntry:
    """The entry registered as `name`; an unknown name is a one-line error listing the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model type {name!r}; valid: {', '.join(model_names())}")
    module, attr = MODELS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def merge_options(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, nested mappings key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_options(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


@dataclass
class LoadedModel:
    """A checkpoint made ready for inference: the model (eval mode, on the device), its entry and type,
    and the checkpoint dict (for its run config)."""

    model: nn.Module
    entry: ModelEntry
    model_type: str
    checkpoint: dict[str, Any]
    config: dict[str, Any]

    def inference_settings(self) -> dict[str, Any]:
        """The value of every load-time overridable setting the model was built with, by dotted name."""
        out = {}
        for dotted in self.entry.overridable:
            node: Any = self.config
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            out[dotted] = node
        used = getattr(self.model, "precision", None)  # the inference precision in use, "auto" resolved
        for key in out:
            if key.endswith("precision") and isinstance(used, str):
                out[key] = used
        return out

    def policy(self) -> Any:
        """The model as a `Policy` controller (entries serving "policy")."""
        if self.entry.policy is None:
            raise CheckpointError(
                f"{self.checkpoint['path']} holds a {self.model_type!r} model, which serves "
                f"{'/'.join(self.entry.controllers) or 'no controller (a component model)'}, not a policy"
            )
        return self.entry.policy(self.model)


def load_model(
    checkpoint: str,
    device: torch.device | str = "cpu",
    overrides: Mapping[str, Any] | None = None,
    controller: str | None = None,
) -> LoadedModel:
    """Rebuild the model a checkpoint file or run directory holds, in eval mode on `device`, with
    `overrides` (inference settings among the entry's `overridable` fields) merged into its config
    before it is built. `controller` ("mpc" | "policy"), when given, must be one the model serves."""
    if controller is not None and controller not in CONTROLLERS:
        raise ValueError(f"unknown controller {controller!r}; valid: {', '.join(CONTROLLERS)}")
    ckpt = load_checkpoint(checkpoint)
    name = ckpt["model_type"]
    if name not in MODELS:
        raise CheckpointError(f"{ckpt['path']} holds an unknown model type {name!r}; known: {model_names()}")
    entry = model_entry(name)
    if controller is not None and controller not in entry.controllers:
        need = [n for n in model_names() if controller in model_entry(n).controllers]
        raise CheckpointError(
            f"checkpoint {ckpt['path']} holds a {name!r} model, which cannot serve controller={controller}"
            f" (expected one of {need})"
        )
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(over) - set(entry.overridable))
    if unknown:
        raise ValueError(
            f"{name} models take no load-time override of {unknown}; valid: {list(entry.overridable)}"
        )
    normalizer = checkpoint_normalizer(ckpt)
    nested: dict[str, Any] = {}
    for dotted, v in over.items():  # "noise.edm_solver" -> {"noise": {"edm_solver": v}}
        *parents, leaf = dotted.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    try:  # the checkpoint's own config first: what fails there is the file's, not an option given here
        entry.config_type.from_dict(dict(ckpt["model_config"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {ckpt['path']}: its model config does not build ({type(e).__name__}: {e}); written "
            "by another version of this project?"
        ) from e
    cfg = entry.config_type.from_dict(merge_options(ckpt["model_config"], nested))
    model = (entry.inference or entry.build)(cfg, normalizer)
    if entry.state_prefix:
        ckpt = _strip_prefix(ckpt, entry.state_prefix)
    load_model_weights(model, ckpt, use_ema=entry.use_ema)
    return LoadedModel(model.to(device).eval(), entry, name, ckpt, cfg.to_dict())


def checkpoint_normalizer(ckpt: dict[str, Any]) -> Normalizer:
    """The statistics a checkpoint's model was trained with; CheckpointError (one line) when it has none
    or they cannot be read (a damaged file: a TypeError from deep in `Normalizer.from_dict` before)."""
    if ckpt.get("normalizer") is None:
        raise CheckpointError(f"checkpoint {ckpt['path']} has no normalizer; the model needs its statistics")
    try:
        return Normalizer.from_dict(ckpt["normalizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {ckpt['path']} has an unreadable normalizer ({type(e).__name__}: {e}); "
            "it cannot be used"
        ) from e


def _strip_prefix(ckpt: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The checkpoint with only the weights under `prefix`, renamed without it."""
    out = dict(ckpt)
    for key in ("state_dict", "ema_state_dict"):
        if out.get(key) is not None:
            out[key] = {k[len(prefix) :]: v for k, v in out[key].items() if k.startswith(prefix)}
    return out
