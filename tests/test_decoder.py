"""The world model's video decoder: it decodes whole latents (patch features and proprio), trains on
detached latents, and cannot change what the encoder and predictor (the planner's latents) learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wm.data.normalize import Normalizer, compute_stats
from wm.decoder import Decoder, DecoderConfig
from wm.dino_wm import DinoWorldModel, WorldModelConfig
from wm.registry import load_model
from wm.trainer import Trainer, TrainerConfig, default_param_groups
from wm.training import setup_training

SMALL = {
    "image_key": "img",
    "proprio_key": "state",
    "image_size": (16, 16),
    "frameskip": 1,
    "encoder": {"name": "cnn", "cnn_channels": [8, 8], "cnn_dim": 8, "cnn_stride": 4},
    "predictor_dim": 16,
    "predictor_depth": 1,
    "predictor_heads": 2,
    "predictor_head_dim": 8,
    "predictor_mlp_dim": 16,
    "decoder_channels": (8, 8),
    "decoder_keypoints": 4,
    "recon_channels": (8, 8),
    "rollout_loss_steps": 1,
}


def _model(seed: int = 0, **kw) -> DinoWorldModel:
    rng = np.random.default_rng(0)
    normalizer = Normalizer(
        {"action": "minmax", "state": "meanstd"},
        {
            "action": compute_stats(rng.uniform(-1, 1, (50, 2))),
            "state": compute_stats(rng.normal(size=(50, 4))),
        },
    )
    torch.manual_seed(seed)
    return DinoWorldModel(WorldModelConfig.from_dict(SMALL | kw), normalizer)


def _batch(B: int = 3, F: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "img": torch.rand(B, F, 3, 16, 16, generator=g),
        "img_is_pad": torch.zeros(B, F, dtype=torch.bool),
        "state": torch.randn(B, F, 4, generator=g),
        "action": torch.rand(B, F - 1, 2, generator=g) * 2 - 1,
    }


def _planner_grads(model: DinoWorldModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.compute_loss(batch)[0].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("decoder.")}


def test_video_decoder_loss_sends_no_gradient_to_the_planners_latents():
    """Two models that differ only in their video decoder's weights get bitwise the same gradients
    on every other parameter (encoder, predictor, embeddings, reconstruction head): no gradient of
    the video decoder's loss reaches them. The decoder itself does learn."""
    a, b = _model(), _model()
    with torch.no_grad():
        for p in b.decoder.parameters():
            p.add_(torch.randn_like(p))
    batch = _batch()
    ga, gb = _planner_grads(a, batch), _planner_grads(b, batch)
    assert ga.keys() and ga.keys() == gb.keys()
    assert any(n.startswith("encoder.") for n in ga) and any(n.startswith("recon_head.") for n in ga)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=0, msg=name)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.decoder.parameters())


def test_detached_heads_are_clipped_apart():
    model = _model()
    groups = default_param_groups(model, 0.01)
    head = {id(p) for g in groups if g.get("clip_group") == "decoder" for p in g["params"]}
    assert head == {id(p) for p in model.decoder.parameters()}
    rest = {id(p) for g in groups if "clip_group" not in g for p in g["params"]}
    assert rest == {id(p) for p in model.parameters()} - head


def test_decode_takes_latents_with_leading_dims():
    model = _model().eval()
    z = {"visual": torch.randn(2, 3, *model.grid, 8).flatten(2, 3), "proprio": torch.randn(2, 3, 4)}
    with torch.no_grad():
        imgs = model.decode(z | {"past_action": torch.zeros(2, 2, 2)})  # extra keys are ignored
        flat = model.decode({k: v.flatten(0, 1) for k, v in z.items()})
        moved = model.decode({"visual": z["visual"], "proprio": z["proprio"] + 1})
    assert imgs.shape == (2, 3, 3, 16, 16)
    torch.testing.assert_close(imgs.flatten(0, 1), flat)
    assert (moved - imgs).abs().max() > 1e-4  # proprio is decoded, not ignored
    with pytest.raises(ValueError, match="proprio"):
        model.decode({"visual": z["visual"]})
    with pytest.raises(ValueError, match="proprio"):
        model.decode({"visual": z["visual"], "proprio": z["proprio"][:, :2]})


@pytest.mark.parametrize("proprio_dim", [0, 4])
def test_decoder_with_and_without_proprio(proprio_dim):
    dec = Decoder(DecoderConfig(in_dim=8, channels=(8, 4), upsample=4, proprio_dim=proprio_dim, keypoints=2))
    feats = torch.randn(2, 4, 8)
    proprio = torch.randn(2, proprio_dim) if proprio_dim else None
    img = dec(feats, (2, 2), (8, 8), proprio)
    assert img.shape == (2, 3, 8, 8) and 0 <= img.min() and img.max() <= 1
    img.mean().backward()
    assert all(p.grad is not None for p in dec.parameters())
    with pytest.raises(ValueError, match="proprio"):
        dec(feats, (2, 2), (8, 8), None if proprio_dim else torch.randn(2, 4))


@pytest.mark.parametrize(
    "bad", [{"proprio_dim": -1}, {"keypoints": 0}, {"keypoint_sigmas": ()}, {"keypoint_sigmas": (1.0, 0.0)}]
)
def test_decoder_config_rejects_bad_keypoints(bad):
    DecoderConfig(in_dim=8, proprio_dim=2)  # fine
    with pytest.raises(ValueError):
        DecoderConfig(**({"in_dim": 8, "proprio_dim": 2} | bad))


@pytest.mark.parametrize(
    ("bad", "shown"),
    [
        (
            {"keypoint_sigmas": (2.0, float("nan"))},
            r"keypoint_sigmas must be positive pixel widths, got \(2.0, nan\)",
        ),
        (
            {"keypoint_sigmas": (float("inf"),)},
            r"keypoint_sigmas must be positive pixel widths, got \(inf,\)",
        ),
        ({"channels": (8.5, 4)}, r"decoder.channels\[0\]=8.5 is not a whole number"),  # was cut to 8
        ({"keypoints": 2.5}, r"decoder.keypoints=2.5 is not a whole number"),  # was a TypeError from torch
        ({"upsample": True}, r"decoder.upsample=True is not a whole number"),  # was taken as 1
    ],
    ids=["nan_sigma", "inf_sigma", "float_channels", "float_keypoints", "bool_upsample"],
)
def test_decoder_config_rejects_values_it_accepted(bad, shown):
    with pytest.raises(ValueError, match=rf"^{shown}$"):
        DecoderConfig(**({"in_dim": 8, "proprio_dim": 2} | bad))


def _train(store: str, out, decoder_channels: list[int]) -> Trainer:
    model_cfg = {k: v for k, v in SMALL.items() if k not in ("image_key", "proprio_key", "image_size")}
    torch.manual_seed(0)
    setup = setup_training(
        "dino_wm", store, model_cfg | {"decoder_channels": decoder_channels}, val_ratio=0.0
    )
    cfg = TrainerConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, grad_clip=0.01, ema_decay=0.5)
    trainer = Trainer(
        setup.model,
        setup.train_set,
        cfg,
        out,
        model_type="dino_wm",
        model_config=setup.model_config,
        normalizer=setup.normalizer,
    )
    trainer.fit()
    return trainer


def test_another_video_decoder_trains_the_same_world_model(small_store, tmp_path):
    """With clipping active (grad_clip 0.01), a differently sized video decoder leaves the trained
    encoder, predictor and reconstruction head bitwise the same (one joint clip norm would not);
    the checkpoint reloads strictly and decodes as the trained model does."""
    store = str(small_store[0])
    a = _train(store, tmp_path / "a", [8, 8])
    b = _train(store, tmp_path / "b", [16, 4])
    for which in ("model", "ema_model"):
        sa, sb = getattr(a, which).state_dict(), getattr(b, which).state_dict()
        planner = [k for k in sa if not k.startswith("decoder.")]
        assert any(k.startswith("predictor.") for k in planner)
        for k in planner:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)

    loaded = load_model(str(tmp_path / "a"), controller="mpc").model
    ema = a.ema_model.eval()
    z = {"visual": torch.randn(2, 5, *loaded.grid, 8).flatten(2, 3), "proprio": torch.randn(2, 5, 4)}
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), ema.decode(z), rtol=0, atol=0)
