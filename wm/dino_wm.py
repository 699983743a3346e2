"""DINO-WM style world model: a patch encoder, a frame-block-causal ViT predictor over patch tokens,
action and proprioception embeddings tiled onto every patch token, and a pixel decoder.

Single-purpose methods (house style rule 5): `encode` observations to a latent, `predict` the next
latents with teacher forcing, `rollout` action sequences with a KV cache, `decode` latents to
pixels, and `cost` between predicted and goal latents for planners. A planner sees only these.

Latents are dicts: "visual" (..., P, D) patch features and "proprio" (..., Dp) normalized
proprioception; rollouts also carry "visual" for every predicted step so costs can weight all
frames. Training (`compute_loss`) is teacher-forced next-frame MSE on detached targets plus an
optional multi-step rollout loss; a trainable encoder (the small CNN) is kept from collapsing by a
reconstruction loss through its own small head (`recon_head`). The video decoder behind `decode`
is another module: it decodes the whole latent (patch features and proprio) and trains on detached
latents only, with its gradients clipped apart from the rest (`detached_heads`), so it never
changes what the encoder and predictor learn, i.e. what the planner sees. Trained from cached
features (a frozen encoder), it reads the first frame of each window beside them
(`frames_beside_features`).

Batch keys for `compute_loss` (from `WindowDataset` with `window_spec()`):
    <image_key>  (B, n_hist + 1, C, H, W) float in [0, 1]   (or cached features (B, n_hist + 1, P, D))
    <proprio_key> (B, n_hist + 1, Dp)        raw; normalized inside with the model's Normalizer
    <action_key> (B, n_hist * frameskip, A)  raw; normalized inside
    *_is_pad masks; padded target frames are left out of the loss
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange, repeat
from torch import nn

from wm.checks import check_finite, check_unit_frames
from wm.data.dataset import frames_key
from wm.data.normalize import Normalizer
from wm.data.windows import WindowSpec
from wm.decoder import Decoder, DecoderConfig
from wm.encoders import EncoderConfig, PatchEncoder, build_encoder
from wm.options import check_numbers, sub_config
from wm.predictor import Predictor, PredictorConfig
from wm.spec import IOSpec

Latent = dict[str, torch.Tensor]


RETIRED_OPTIONS = ("decoder_motion_weight",)  # WorldModelConfig options removed (18bce2e)


@dataclass(frozen=True)
class WorldModelConfig:
    image_key: str = "image"
    proprio_key: str = "proprio"
    action_key: str = "action"
    image_size: tuple[int, int] = (64, 64)
    action_dim: int = 2  # raw action dimension (one simulator step)
    proprio_dim: int = 4
    n_hist: int = 1  # history frames the predictor sees
    frameskip: int = 5  # raw steps per model frame; their actions are concatenated
    action_emb_dim: int = 10
    proprio_emb_dim: int = 10
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    predictor_dim: int = 256
    predictor_depth: int = 4
    predictor_heads: int = 4
    predictor_head_dim: int = 64
    predictor_mlp_dim: int = 512
    predictor_dropout: float = 0.0
    predictor_precision: str = "auto"  # planning precision: fp32 | bf16 | auto (bf16 on bf16 hardware)
    decoder_channels: tuple[int, ...] = (128, 64, 32)  # the video decoder behind `decode`
    decoder_keypoints: int = 8  # image points it places from proprio (wm/decoder.py)
    recon_channels: tuple[int, ...] = (128, 64, 32)  # the trainable encoder's reconstruction head
    rollout_loss_steps: int = 0  # extra open-loop steps in the loss (0: teacher forcing only)
    rollout_loss_weight: float = 0.5
    proprio_loss_weight: float = 1.0
    recon_loss_weight: float = 1.0
    # Pixels that change between the first two frames of a window (a moving agent or object) weigh
    # 1 + this in the reconstruction loss. On the demo, 30 blurred the frame without drawing the
    # 4-px ball (BENCHMARKS.md, decoder visibility), hence 0 by default.
    recon_motion_weight: float = 0.0
    cost_proprio_weight: float = 1.0  # planning objective: visual MSE + this * proprio MSE
    cost_all_frames: bool = False  # False: last predicted frame only (DINO-WM); True: all, later ones heavier

    def __post_init__(self) -> None:
        check_numbers(type(self), vars(self), "model")
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", sub_config(EncoderConfig, self.encoder, "model.encoder"))
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        object.__setattr__(self, "decoder_channels", tuple(self.decoder_channels))
        object.__setattr__(self, "recon_channels", tuple(self.recon_channels))
        if self.n_hist < 1 or self.frameskip < 1:
            raise ValueError(f"n_hist and frameskip must be >= 1, got {self.n_hist}, {self.frameskip}")
        if self.action_dim < 1 or self.proprio_dim < 0:
            raise ValueError(f"bad action_dim {self.action_dim} or proprio_dim {self.proprio_dim}")
        if self.rollout_loss_steps < 0:
            raise ValueError(f"rollout_loss_steps must be >= 0, got {self.rollout_loss_steps}")
        if self.recon_motion_weight < 0:
            raise ValueError(f"recon_motion_weight must be >= 0, got {self.recon_motion_weight}")
        # a negative size was an error from deep in torch; a zero action embedding, a model the actions
        # never reach; a negative loss weight maximised its error, a negative cost weight rewarded moving
        # away from the goal
        sizes = ["action_emb_dim", "predictor_dim", "predictor_depth", "predictor_heads"]
        sizes += ["predictor_head_dim", "predictor_mlp_dim", "decoder_keypoints"]
        sizes += ["proprio_emb_dim"] if self.proprio_dim else []
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        weights = ("rollout_loss_weight", "proprio_loss_weight", "recon_loss_weight", "cost_proprio_weight")
        for name in weights:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.predictor_dropout < 1:
            raise ValueError(f"predictor_dropout must be in [0, 1), got {self.predictor_dropout}")
        for name in ("image_size", "decoder_channels", "recon_channels"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be sizes >= 1, got {list(getattr(self, name))}")

    def window_spec(self, extra_steps: int = 0, padding: bool = True) -> WindowSpec:
        """Offsets a training window needs: n_hist + 1 (+ rollout) frames every `frameskip` steps (known
        from the config alone, so training checks them against the store before building the model).
        A window is anchored at its last history frame. With `padding` (training; validation windows lie
        inside their episodes, as its errors are not masked) a history of several frames may begin up
        to n_hist - 1 frames before an episode: the first frame repeated and the actions before it zero
        (`compute_loss`), as a rollout's history is filled at an episode's start
        (`policies.inputs.ObsHistory`); and a window may end `frameskip` steps past it, its padded
        target (the last frame) left out of the loss, unless that frame is the window's only target (one
        history frame, no rollout: such windows cost a forward pass and trained nothing)."""
        f = self.frameskip
        frames = self.n_hist + 1 + max(extra_steps, self.rollout_loss_steps)
        history = (self.n_hist - 1) * f
        obs = tuple(i * f - history for i in range(frames))
        offsets = {self.image_key: obs, self.action_key: tuple(range(-history, (frames - 1) * f - history))}
        if self.proprio_dim:
            offsets[self.proprio_key] = obs
        after = f if padding and frames > 2 else 0
        return WindowSpec(offsets, max_pad_before=history if padding else 0, max_pad_after=after)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["encoder"] = dataclasses.asdict(self.encoder)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldModelConfig:
        # options that are no more, written by older checkpoints: training-loss weights only, so the
        # weights load as they are (a checkpoint holding one was refused as "unknown option")
        d = {k: v for k, v in d.items() if k not in RETIRED_OPTIONS}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown world-model option(s) {unknown}")
        return cls(**d)


class DinoWorldModel(nn.Module):
    """The world model; `normalizer` holds action and proprio statistics fitted on the training store."""

    def __init__(
        self, cfg: WorldModelConfig, normalizer: Normalizer, load_encoder_weights: bool = True
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.normalizer = normalizer
        self.encoder: PatchEncoder = build_encoder(cfg.encoder, load_weights=load_encoder_weights)
        self.grid = self.encoder.patch_grid(*cfg.image_size)
        D = self.encoder.dim
        self.step_action_dim = cfg.frameskip * cfg.action_dim  # one model step's action
        self.action_emb = nn.Linear(self.step_action_dim, cfg.action_emb_dim)
        self.proprio_emb = nn.Linear(max(cfg.proprio_dim, 1), cfg.proprio_emb_dim)
        self.predictor = Predictor(
            PredictorConfig(
                in_dim=D + cfg.action_emb_dim + cfg.proprio_emb_dim,
                out_dim=D + cfg.proprio_dim,
                dim=cfg.predictor_dim,
                depth=cfg.predictor_depth,
                heads=cfg.predictor_heads,
                head_dim=cfg.predictor_head_dim,
                mlp_dim=cfg.predictor_mlp_dim,
                dropout=cfg.predictor_dropout,
                max_frames=cfg.n_hist,  # attention window: the history the model conditions on
                precision=cfg.predictor_precision,
            )
        )
        up = max(1, cfg.image_size[0] // self.grid[0])
        # Reconstruction through a trainable encoder keeps its features informative; a frozen one
        # needs none. Built before the video decoder, so adding that one changes no initialization.
        self.recon_head = (
            Decoder(DecoderConfig(in_dim=D, channels=cfg.recon_channels, upsample=up))
            if self.encoder.trainable and cfg.recon_loss_weight
            else None
        )
        self.decoder = Decoder(
            DecoderConfig(
                in_dim=D,
                channels=cfg.decoder_channels,
                upsample=up,
                proprio_dim=cfg.proprio_dim,
                keypoints=cfg.decoder_keypoints,
            )
        )

    # ------------------------------------------------------------------ planning interface
    @property
    def action_dim(self) -> int:
        """Action dimension of one planning step (frameskip raw actions concatenated)."""
        return self.step_action_dim

    @property
    def io_spec(self) -> IOSpec:
        """What the world model reads: its camera, proprioception, history of `n_hist` frames
        `frameskip` steps apart and the raw actions executed between them."""
        c = self.cfg
        return IOSpec(
            image_keys=(c.image_key,),
            image_size=c.image_size,
            proprio_key=c.proprio_key if c.proprio_dim else None,
            proprio_dim=c.proprio_dim,
            action_dim=c.action_dim,
            action_key=c.action_key,
            history=c.n_hist,
            frameskip=c.frameskip,
            past_actions=True,
        )

    @property
    def precision(self) -> str:
        """The predictor's inference precision in use ("auto" resolved): what planning runs in."""
        return self.predictor.precision

    def feature_cache_source(self) -> tuple[PatchEncoder, str] | None:
        """A frozen encoder's features can be cached once; a trainable one must see images."""
        return None if self.encoder.trainable else (self.encoder, self.cfg.image_key)

    def frames_beside_features(self) -> tuple[str, tuple[int, ...]]:
        """(camera, window offsets) of the pixels training still needs when it reads cached features:
        the first frame, the video decoder's target (`wm.data.dataset.WithFrames` delivers them)."""
        return self.cfg.image_key, self.window_spec().offsets[self.cfg.image_key][:1]

    def window_spec(self, extra_steps: int = 0, padding: bool = True) -> WindowSpec:
        """Offsets a training window needs: n_hist + 1 (+ rollout) frames every `frameskip` steps."""
        return self.cfg.window_spec(extra_steps, padding)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) float in [0, 1], or already-encoded (B, T, P, D) features -> (B, T, P, D)."""
        if images.ndim == 4:  # cached features
            return images.float()
        if images.dtype == torch.float64:  # (numpy's default float) a dtype error deep in the encoder
            images = images.float()
        B = images.shape[0]
        feats = self.encoder(rearrange(images, "b t c h w -> (b t) c h w"))
        return rearrange(feats, "(b t) p d -> b t p d", b=B)

    def check_obs(self, obs: dict[str, torch.Tensor]) -> None:
        """One clear error for observations (or goals) this model was not trained on."""
        c = self.cfg
        keys = (c.image_key, c.proprio_key) if c.proprio_dim else (c.image_key,)
        for key in keys:
            if key not in obs:
                raise ValueError(f"observation lacks {key!r} (has {sorted(obs)}); the world model needs it")
        img = obs[c.image_key]
        P, D = self.grid[0] * self.grid[1], self.encoder.dim
        if not (img.ndim == 5 and img.shape[2] == 3) and not (
            img.ndim == 4 and tuple(img.shape[2:]) == (P, D)
        ):
            raise ValueError(
                f"{c.image_key!r} must be images (B, T, 3, H, W) or cached features (B, T, {P}, {D}), got "
                f"{tuple(img.shape)}"
            )
        if not img.is_floating_point():
            raise ValueError(
                f"{c.image_key!r} must be float images in [0, 1] (or cached features), got {img.dtype}: "
                f"divide uint8 frames by 255"
            )
        if img.ndim == 5 and not self.training:  # (training reads the store's, in [0, 1] by construction)
            check_unit_frames(img, c.image_key)
        if img.ndim == 5 and tuple(img.shape[-2:]) != tuple(c.image_size):
            raise ValueError(
                f"{c.image_key!r} images are {tuple(img.shape[-2:])} but the world model was trained on "
                f"{tuple(c.image_size)}: an observation or goal from another task or camera setting?"
            )
        if c.proprio_dim and obs[c.proprio_key].shape[-1] != c.proprio_dim:
            raise ValueError(
                f"{c.proprio_key!r} has {obs[c.proprio_key].shape[-1]} dims but the world model was trained "
                f"on {c.proprio_dim}: an observation or goal from another task?"
            )
        lead = tuple(img.shape[:2])  # (B, T)
        if c.proprio_dim and tuple(obs[c.proprio_key].shape) != (*lead, c.proprio_dim):
            raise ValueError(
                f"{c.proprio_key!r} must be (B, T, {c.proprio_dim}) = {(*lead, c.proprio_dim)} beside "
                f"{c.image_key!r} {tuple(img.shape)}, got {tuple(obs[c.proprio_key].shape)}"
            )
        for key in () if self.training else keys:  # (training reads the store's, which refuses NaN)
            check_finite(obs[key], repr(key))  # NaN latents gave NaN costs: a plan from nothing
        past = obs.get("past_action")
        if past is not None and tuple(past.shape) != (lead[0], lead[1] - 1, self.step_action_dim):
            raise ValueError(
                f"'past_action' must be (B, T - 1, frameskip * action_dim) = "
                f"{(lead[0], lead[1] - 1, self.step_action_dim)} beside {c.image_key!r} {tuple(img.shape)}, "
                f"got {tuple(past.shape)}"
            )

    def encode(self, obs: dict[str, torch.Tensor]) -> Latent:
        """Observations {image (B, T, C, H, W), proprio (B, T, Dp)} -> latent {"visual", "proprio"}."""
        c = self.cfg
        self.check_obs(obs)
        z = {"visual": self.encode_images(obs[c.image_key])}
        if c.proprio_dim:
            z["proprio"] = self.normalizer.normalize(c.proprio_key, obs[c.proprio_key].float())
        if "past_action" in obs:  # (B, T - 1, frameskip * A) raw actions between history frames
            z["past_action"] = obs["past_action"]
        return z

    def _tokens(
        self, visual: torch.Tensor, proprio: torch.Tensor | None, actions: torch.Tensor
    ) -> torch.Tensor:
        """(B, T, P, D), (B, T, Dp), (B, T, f*A) normalized -> (B, T, P, D + emb) tokens, embeddings tiled."""
        P = visual.shape[-2]
        a = repeat(self.action_emb(actions), "b t e -> b t p e", p=P)
        if proprio is None:
            proprio = visual.new_zeros(*visual.shape[:2], 1)
        p = repeat(self.proprio_emb(proprio), "b t e -> b t p e", p=P)
        return torch.cat([visual, p, a], dim=-1)

    def _split(self, out: torch.Tensor) -> Latent:
        """Predictor output (..., P, D + Dp) -> {"visual": (..., P, D), "proprio": (..., Dp)}; the proprio
        prediction is the mean over patches of the last Dp channels."""
        D = self.encoder.dim
        z = {"visual": out[..., :D]}
        if self.cfg.proprio_dim:
            z["proprio"] = out[..., D:].mean(dim=-2)
        return z

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Raw step actions (..., f*A) -> normalized, per raw action."""
        shape = actions.shape
        a = actions.reshape(*shape[:-1], self.cfg.frameskip, self.cfg.action_dim)
        return self.normalizer.normalize(self.cfg.action_key, a).reshape(shape)

    def predict(self, z: Latent, actions: torch.Tensor) -> Latent:
        """Teacher-forced next-frame prediction: z over T frames and raw actions (B, T, f*A) -> latents of
        frames 1..T."""
        visual = z["visual"]
        lead = tuple(visual.shape[:2]) if visual.ndim == 4 else None  # (B, T)
        self._check_latent("z", z, lead, "(B, T")
        # finite=False: training data is checked before training, and a check here is a GPU sync per step
        actions = self._check_actions(
            "actions", actions, (*lead, self.step_action_dim), "(B, T, f*A)", finite=False
        )
        tokens = self._tokens(visual, z.get("proprio"), self.normalize_actions(actions))
        return self._split(self.predictor(tokens, self.grid))

    def rollout(self, z0: Latent, actions: torch.Tensor, check: bool = True) -> Latent:
        """Open-loop rollout. z0: history latents with leading (E, Th) and, when Th > 1, "past_action"
        (E, Th - 1, f*A), the raw actions between the history frames; actions (E, N, H, f*A) raw.
        Returns latents with leading (E, N, H): the predicted frames after each action step.
        The history is encoded once per episode and shared by the N samples (expand, no copy).
        `check`: the actions are checked finite (not in training's rollout loss, as in `predict`: its
        data is checked before training, and a check is a GPU sync per step)."""
        vis0 = z0["visual"]  # (E, Th, P, D)
        self._check_latent("z0", z0, tuple(vis0.shape[:2]) if vis0.ndim == 4 else None, "(E, Th")
        E, Th = vis0.shape[:2]
        if actions.ndim != 4 or actions.shape[0] != E or actions.shape[2] < 1:
            raise ValueError(
                f"actions must be (E, N, H, frameskip * action_dim) = ({E}, N, H >= 1, "
                f"{self.step_action_dim}) for z0['visual'] {tuple(vis0.shape)}, got {tuple(actions.shape)}"
            )
        E, N, H, _ = actions.shape
        actions = self._check_actions(
            "actions", actions, (E, N, H, self.step_action_dim), "(E, N, H, f*A)", finite=check
        )
        acts = self.normalize_actions(actions)
        prop0 = z0.get("proprio")
        past = z0.get("past_action")
        if past is None and Th > 1:  # zeros in its place are mid-range actions, not "none": wrong frames
            raise ValueError(
                f"z0 holds {Th} history frames but no 'past_action': give z0['past_action'] "
                f"(E, Th - 1, f*A) = {(E, Th - 1, self.step_action_dim)}, the raw actions taken between them"
            )
        if past is not None:
            past = self._check_actions(
                "z0['past_action']", past, (E, Th - 1, self.step_action_dim), "(E, Th - 1, f*A)", finite=check
            )
        past = self.normalize_actions(past) if past is not None else None

        def per_sample(x: torch.Tensor) -> torch.Tensor:  # (E, ...) -> (E * N, ...)
            return x.unsqueeze(1).expand(E, N, *x.shape[1:]).reshape(E * N, *x.shape[1:])

        vis, prop = per_sample(vis0), per_sample(prop0) if prop0 is not None else None
        a = rearrange(acts, "e n h a -> (e n) h a")
        cache = self.predictor.init_cache(E * N)
        fed: list[torch.Tensor] = []  # every frame's tokens so far, (E * N, P, in_dim)
        for t in range(Th - 1):  # history frames with the actions that followed them
            step_a = per_sample(past[:, t])
            tok = self._tokens(
                vis[:, t : t + 1], None if prop is None else prop[:, t : t + 1], step_a[:, None]
            )
            _, cache = self.predictor.step(tok[:, 0], self.grid, cache)
            fed.append(tok[:, 0])
        cur_v, cur_p = vis[:, -1], None if prop is None else prop[:, -1]
        outs_v, outs_p = [], []
        window = self.predictor.window
        for h in range(H):
            tok = self._tokens(cur_v[:, None], None if cur_p is None else cur_p[:, None], a[:, h : h + 1])
            fed.append(tok[:, 0])
            if len(fed) <= window:  # the cache holds every frame before: exactly what training computed
                out, cache = self.predictor.step(tok[:, 0], self.grid, cache)
            else:  # the window slid: the cache's keys of deeper layers would carry frames before it, a
                # context training never gave; the last `window` frames alone, as trained (DINO-WM's)
                out = self.predictor(torch.stack(fed[-window:], 1), self.grid)[:, -1]
            nxt = self._split(out)
            cur_v, cur_p = nxt["visual"], nxt.get("proprio")
            outs_v.append(cur_v)
            outs_p.append(cur_p)
        z = {"visual": rearrange(torch.stack(outs_v, 1), "(e n) h p d -> e n h p d", e=E)}
        if cur_p is not None:
            z["proprio"] = rearrange(torch.stack(outs_p, 1), "(e n) h d -> e n h d", e=E)
        return z

    def _check_latent(self, name: str, z: Latent, lead: tuple[int, ...] | None, letters: str) -> None:
        """One line for a latent that is not {"visual": (*lead, P, D), "proprio": (*lead, Dp)}, lead
        (B, T) or (E, Th) (None: "visual" is not 4-D)."""
        P, D, Dp = self.grid[0] * self.grid[1], self.encoder.dim, self.cfg.proprio_dim
        visual = z["visual"]
        if lead is None or lead[1] < 1 or tuple(visual.shape[2:]) != (P, D):
            raise ValueError(f"{name}['visual'] must be {letters}, {P}, {D}), got {tuple(visual.shape)}")
        proprio = z.get("proprio")
        if Dp and (proprio is None or tuple(proprio.shape) != (*lead, Dp)):
            got = None if proprio is None else tuple(proprio.shape)
            raise ValueError(f"{name}['proprio'] must be {letters}, {Dp}) = {(*lead, Dp)}, got {got}")
        if not Dp and proprio is not None:  # its embedding was trained on zeros only: any other input
            raise ValueError(  # moved the prediction, or failed as a bare shape error
                f"{name} holds 'proprio' {tuple(proprio.shape)}, but this model reads none (proprio_dim 0)"
            )

    def _check_actions(
        self, name: str, actions: torch.Tensor, shape: tuple[int, ...], letters: str, finite: bool = True
    ) -> torch.Tensor:
        """`actions` of `shape`, finite (unless not `finite`), in the model's dtype (float64 or integer
        actions were a dtype error deep in torch); one line naming `name` otherwise."""
        if tuple(actions.shape) != shape:
            raise ValueError(
                f"{name} must be raw actions {letters} = {shape} (f*A: frameskip {self.cfg.frameskip} x "
                f"action_dim {self.cfg.action_dim}), got {tuple(actions.shape)}"
            )
        if finite:  # NaN actions gave NaN predictions and costs
            check_finite(actions, name)
        return actions.to(self.action_emb.weight.dtype)

    def cost(self, pred: Latent, goal: Latent) -> torch.Tensor:
        """Planning objective. pred leading (E, N, H); goal leading (E,) (its last frame if it has T).
        Visual MSE over patches (+ weighted proprio MSE) at the last frame, or over all frames. A goal
        of batch 1 is every episode's goal."""
        gv = goal["visual"]
        gv = gv[:, -1] if gv.ndim == 4 else gv  # (E, P, D)
        episodes = pred["visual"].shape[0]
        if gv.ndim != 3 or gv.shape[0] not in (1, episodes) or gv.shape[1:] != pred["visual"].shape[-2:]:
            raise ValueError(
                f"goal['visual'] must be (E, [T,] P, D) with E = {episodes} (or 1) and (P, D) = "
                f"{tuple(pred['visual'].shape[-2:])} as the prediction's, got {tuple(goal['visual'].shape)}"
            )
        v = (pred["visual"] - gv[:, None, None]).pow(2).mean(dim=(-1, -2))  # (E, N, H)
        if "proprio" in pred and "proprio" in goal and self.cfg.cost_proprio_weight:
            gp = goal["proprio"]
            gp = gp[:, -1] if gp.ndim == 3 else gp  # (E, Dp)
            if gp.ndim != 2 or gp.shape[0] not in (1, episodes) or gp.shape[1] != pred["proprio"].shape[-1]:
                raise ValueError(
                    f"goal['proprio'] must be (E, [T,] Dp) with E = {episodes} (or 1) and Dp = "
                    f"{pred['proprio'].shape[-1]}, got {tuple(goal['proprio'].shape)}"
                )
            v = v + self.cfg.cost_proprio_weight * (pred["proprio"] - gp[:, None, None]).pow(2).mean(-1)
        if not self.cfg.cost_all_frames:
            return v[..., -1]
        w = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
        return (v * w).sum(-1) / w.sum()

    def cost_vectors(self, z: Latent) -> torch.Tensor:
        """z leading (N, T) or (N,) -> (N, K): the last frame as one vector whose squared distance to
        another is this model's single-frame cost (visual MSE + cost_proprio_weight * proprio MSE)."""
        v = z["visual"]
        v = v[:, -1] if v.ndim == 4 else v  # (N, P, D)
        parts = [v.flatten(1) / v[0].numel() ** 0.5]
        if "proprio" in z and self.cfg.cost_proprio_weight:
            p = z["proprio"]
            p = p[:, -1] if p.ndim == 3 else p  # (N, Dp)
            parts.append(p * (self.cfg.cost_proprio_weight / p.shape[-1]) ** 0.5)
        return torch.cat(parts, dim=1)

    def decode(self, z: Latent) -> torch.Tensor:
        """Latent {"visual": (..., P, D), "proprio": (..., Dp)} -> images (..., 3, H, W) in [0, 1], by
        the video decoder. "proprio" is required when the model has proprioception; other keys
        ("past_action") are ignored."""
        visual = z["visual"]
        lead = visual.shape[:-2]
        proprio = None
        if self.cfg.proprio_dim:
            proprio = z.get("proprio")
            if proprio is None or proprio.shape != (*lead, self.cfg.proprio_dim):
                got = None if proprio is None else tuple(proprio.shape)
                raise ValueError(
                    f"decode needs z['proprio'] of shape {(*lead, self.cfg.proprio_dim)} "
                    f"beside z['visual'] {tuple(visual.shape)}, got {got}"
                )
            proprio = proprio.reshape(-1, self.cfg.proprio_dim)
        imgs = self.decoder(visual.reshape(-1, *visual.shape[-2:]), self.grid, self.cfg.image_size, proprio)
        return imgs.reshape(*lead, *imgs.shape[1:])

    @property
    def detached_heads(self) -> dict[str, nn.Module]:
        """Modules that train on detached latents only (the video decoder). The trainer clips their
        gradients apart from the rest (`wm.trainer.default_param_groups`), so they cannot change how
        the encoder and predictor train."""
        return {"decoder": self.decoder}

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and detached 0-d metric tensors (no host sync: the trainer averages them)."""
        c, f, T = self.cfg, self.cfg.frameskip, self.cfg.n_hist
        z = self.encode(batch)  # visual (B, F, P, D) with F = T + 1 + rollout steps
        B, n_frames = z["visual"].shape[:2]
        # Actions outside the episode are raw zeros, as a rollout's history has them before an episode's
        # first frame (`ObsHistory`); the edge action repeated would be a motion the robot never made.
        raw, pad = batch[c.action_key], batch.get(c.action_key + "_is_pad")
        raw = raw if pad is None else raw.masked_fill(pad[..., None], 0.0)
        actions = rearrange(raw, "b (t f) a -> b t (f a)", f=f)  # (B, F - 1, f*A)
        valid = ~batch[c.image_key + "_is_pad"][:, 1:]  # (B, F - 1): targets inside the episode
        target = {k: v.detach() for k, v in z.items()}
        # Teacher forcing over the first T + 1 frames: inputs 0..T-1 predict 1..T.
        pred = self.predict({k: v[:, :T] for k, v in z.items()}, actions[:, :T])
        loss_v = _masked_mse(pred["visual"], target["visual"][:, 1 : T + 1], valid[:, :T])
        loss = loss_v
        metrics = {"loss_visual": loss_v.detach()}
        if c.proprio_dim:
            loss_p = _masked_mse(pred["proprio"], target["proprio"][:, 1 : T + 1], valid[:, :T])
            loss = loss + c.proprio_loss_weight * loss_p
            metrics["loss_proprio"] = loss_p.detach()
        if c.rollout_loss_steps:
            z0 = {k: v[:, :T] for k, v in z.items()}
            if T > 1:
                z0["past_action"] = actions[:, : T - 1]
            steps = actions[:, T - 1 : T - 1 + 1 + c.rollout_loss_steps]  # (B, 1 + R, f*A)
            roll = self.rollout(z0, steps[:, None], check=False)  # leading (B, 1, 1 + R)
            ro = _masked_mse(roll["visual"][:, 0], target["visual"][:, T:], valid[:, T - 1 :])
            loss = loss + c.rollout_loss_weight * ro
            metrics["loss_rollout"] = ro.detach()
        images = batch[c.image_key]
        if images.ndim == 5 and self.recon_head is not None:  # through the trainable encoder
            recon = self.recon_head(z["visual"][:, 0], self.grid, c.image_size)
            recon = recon_loss(recon, images[:, 0], images[:, 1], c.recon_motion_weight)
            loss = loss + c.recon_loss_weight * recon
            metrics["loss_recon"] = recon.detach()
        pixels = images if images.ndim == 5 else batch.get(frames_key(c.image_key))  # cached: beside
        if pixels is not None:  # the video decoder, on detached latents: no gradient reaches the rest
            frame0 = {k: target[k][:, 0] for k in ("visual", "proprio") if k in target}
            video = (self.decode(frame0) - pixels[:, 0]).pow(2).mean()
            loss = loss + video
            metrics["loss_decoder"] = video.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics


MOTION_THRESHOLD = 0.1  # a pixel "moved" when a channel changes by more than this ([0, 1] units)


def recon_loss(
    pred: torch.Tensor, image: torch.Tensor, next_image: torch.Tensor, motion_weight: float
) -> torch.Tensor:
    """Weighted MSE of pred against image (B, C, H, W): pixels where `next_image` differs from `image`
    by more than 0.1 in any channel (what moved) weigh 1 + motion_weight; a weighted mean, so the
    loss stays on MSE's scale."""
    err = (pred - image).pow(2)
    if not motion_weight:
        return err.mean()
    moving = (next_image - image).abs().amax(1, keepdim=True) > MOTION_THRESHOLD  # (B, 1, H, W)
    w = 1.0 + motion_weight * moving.to(err.dtype)
    return (err * w).sum() / (w.sum() * err.shape[1])


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MSE over frames where `valid` (B, T) is True; pred/target (B, T, ...)."""
    err = (pred - target).pow(2).flatten(2).mean(-1)  # (B, T)
    w = valid.to(err.dtype)
    return (err * w).sum() / w.sum().clamp_min(1.0)
