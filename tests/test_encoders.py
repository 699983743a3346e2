"""Patch encoders (shapes, freezing, weight loading from files the tests write) and the feature cache."""

from __future__ import annotations

import shutil
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torchvision
import zarr
from conftest import as_format_1, flip_bit_in_zip_entry
from einops import rearrange
from safetensors.torch import save_file

from wm.data import DemoStore, KeySpec, Schema, SchemaError, StoreError, delete_episodes
from wm.data.dataset import WindowDataset
from wm.data.windows import WindowSpec
from wm.encoders import ENCODER_NAMES, EncoderConfig, EncoderWeightsError, build_encoder, read_weights_file
from wm.feature_cache import FeatureCacheError, build_feature_cache, cache_info, feature_cache_path

FROZEN = ("dinov2_vits14", "dinov2_vitb14", "resnet18")


def random_encoder(name: str, **kw):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return build_encoder(EncoderConfig(name=name, allow_random=True, **kw))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


@pytest.fixture(scope="module")
def vits():
    """A random DINOv2 ViT-S/14 (built once: it is the slowest thing here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_encoder(EncoderConfig(name="dinov2_vits14", allow_random=True))


# ---------------------------------------------------------------------- building, shapes, freezing
@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_encoder_builds_with_shapes_and_freezing(name):
    enc = build_encoder(EncoderConfig(name=name)) if name == "cnn" else random_encoder(name)
    for hw in [(64, 64), (70, 98)]:
        x = torch.rand(2, 3, *hw)
        y = enc(x)
        h, w = enc.patch_grid(*hw)
        assert y.shape == (2, h * w, enc.dim)
        assert torch.isfinite(y).all()
    expected = {"cnn": (8, 8), "resnet18": (4, 4), "dinov2_vits14": (5, 5), "dinov2_vitb14": (5, 5)}
    assert enc.patch_grid(64, 64) == expected[name]
    enc.train()
    if name == "cnn":
        assert enc.trainable and enc.training
        assert all(p.requires_grad for p in enc.parameters())
        enc(torch.rand(2, 3, 64, 64)).square().mean().backward()
        assert enc.net[0].weight.grad is not None
    else:
        assert not enc.trainable and not enc.training  # eval mode even after train()
        assert not any(p.requires_grad for p in enc.parameters())
        x = torch.rand(2, 3, 42, 42)
        y1, y2 = enc(x), enc(x)
        assert not y1.requires_grad
        assert torch.equal(y1, y2)
    assert len(enc.weights_hash()) == 16


def test_cnn_stride_and_image_size():
    enc = build_encoder(EncoderConfig(cnn_channels=[16, 16, 16, 16], cnn_stride=4, cnn_dim=8, image_size=32))
    assert enc.patch_grid(100, 60) == (8, 8)  # resized to 32x32, stride 4
    assert enc(torch.rand(1, 3, 100, 60)).shape == (1, 64, 8)
    with pytest.raises(ValueError, match="power of 2"):
        EncoderConfig(cnn_channels=(8, 8), cnn_stride=8)
    with pytest.raises(ValueError, match="not one of"):
        EncoderConfig(name="vit_huge")
    with pytest.raises(ValueError, match="float images"):
        enc(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("name", FROZEN)
def test_pretrained_backbones_refuse_random_weights(name):
    with pytest.raises(EncoderWeightsError, match="needs pretrained weights") as e:
        build_encoder(EncoderConfig(name=name))
    assert "https://" in str(e.value)  # and the options as the command line takes them (it named others)
    said = str(e.value)
    assert "model.encoder.weights=/path/" in said and "model.encoder.allow_random=true" in said
    with pytest.raises(EncoderWeightsError, match="does not exist"):
        build_encoder(EncoderConfig(name=name, weights="/nonexistent/file.pth"))


def test_weights_timm_offline_gives_clear_error(monkeypatch, tmp_path):
    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported: the hub refuses at once.
    with pytest.raises(EncoderWeightsError, match="internet") as e:
        build_encoder(EncoderConfig(name="dinov2_vits14", weights="timm"))
    assert "dinov2_vits14_pretrain.pth" in str(e.value) and "encoder.weights=" in str(e.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(EncoderWeightsError, match="internet") as e:
        build_encoder(EncoderConfig(name="resnet18", weights="timm"))
    assert "resnet18-f37072fd.pth" in str(e.value)


# ---------------------------------------------------------------------- DINOv2 checkpoints
def timm_to_official(sd: dict[str, torch.Tensor], block_chunks: int = 0) -> dict[str, torch.Tensor]:
    """The inverse of the loader's conversion: timm's ViT-S/14 state dict in facebookresearch/dinov2's
    layout (hub `dinov2_vits14`: same names plus the iBOT `mask_token`; with `block_chunks` > 0 the
    blocks sit in BlockChunks, `blocks.<chunk>.<i>.`, i counting over all blocks)."""
    out = {}
    for k, v in sd.items():
        if block_chunks and k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // (12 // block_chunks)}.{i}." + k.split(".", 2)[2]
        out[k] = v.clone()
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


def test_dinov2_official_and_timm_layout_files_load_exactly(vits, tmp_path):
    src = vits.vit  # a random timm ViT-S/14
    sd = src.state_dict()
    x = torch.rand(2, 3, 42, 56)
    with torch.no_grad():
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        ref = src.forward_features((x - mean[:, None, None]) / std[:, None, None])[:, 1:]  # (B, P, D)

    files = {
        "official.pth": timm_to_official(sd),
        "official_chunked.pth": timm_to_official(sd, block_chunks=4),
        "wrapped.pth": {"teacher": {"backbone." + k: v for k, v in timm_to_official(sd).items()}},
    }
    for fname, obj in files.items():
        torch.save(obj, tmp_path / fname)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "timm.safetensors")
    for fname in [*files, "timm.safetensors"]:
        enc = build_encoder(EncoderConfig(name="dinov2_vits14", weights=str(tmp_path / fname)))
        assert torch.equal(enc(x), ref), fname
        assert enc.weights_hash() == vits.weights_hash()
    # Positional embedding for another grid (e.g. a 224 px checkpoint: 16x16 + cls) is resampled.
    small = timm_to_official(sd)
    small["pos_embed"] = small["pos_embed"][:, : 1 + 16 * 16]
    torch.save(small, tmp_path / "pos224.pth")
    enc = build_encoder(EncoderConfig(name="dinov2_vits14", weights=str(tmp_path / "pos224.pth")))
    assert enc(x).shape == ref.shape


def test_dinov2_bad_checkpoints_name_the_problem(vits, tmp_path):
    sd = timm_to_official(vits.vit.state_dict())
    broken = {k: v for k, v in sd.items() if not k.startswith("blocks.3.")}
    broken["head.weight"] = torch.zeros(10, 384)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(EncoderWeightsError, match=r"missing keys: blocks\.3\.") as e:
        build_encoder(EncoderConfig(name="dinov2_vits14", weights=str(tmp_path / "broken.pth")))
    assert "unexpected keys: head.weight" in str(e.value) and "broken.pth" in str(e.value)
    with pytest.raises(EncoderWeightsError, match=r"shape mismatches: blocks\.0\.attn"):
        build_encoder(EncoderConfig(name="dinov2_vitb14", weights=str(tmp_path / "broken.pth")))
    torch.save({**sd, "register_tokens": torch.zeros(1, 4, 384)}, tmp_path / "reg.pth")
    with pytest.raises(EncoderWeightsError, match="with registers"):
        build_encoder(EncoderConfig(name="dinov2_vits14", weights=str(tmp_path / "reg.pth")))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError, match="cannot read"):
        build_encoder(EncoderConfig(name="dinov2_vits14", weights=str(tmp_path / "garbage.pth")))


def test_read_weights_file_unwraps_and_strips_a_shared_prefix(tmp_path):
    w = torch.arange(6.0).view(2, 3)
    torch.save({"model": {"module.a.weight": w, "module.b": w[0]}}, tmp_path / "wrapped.pt")
    sd = read_weights_file(tmp_path / "wrapped.pt")
    assert sorted(sd) == ["a.weight", "b"] and torch.equal(sd["a.weight"], w)
    torch.save({"module.a": w, "b": w}, tmp_path / "mixed.pt")  # prefix not on every key: kept
    assert sorted(read_weights_file(tmp_path / "mixed.pt")) == ["b", "module.a"]
    torch.save({"step": 3}, tmp_path / "not_weights.pt")
    with pytest.raises(EncoderWeightsError, match="not a state dict of tensors"):
        read_weights_file(tmp_path / "not_weights.pt")
    # DINOv2's training output: the teacher's backbone beside its heads (it was refused, naming
    # backbone.* keys as unexpected); torch.compile of a DDP model: _orig_mod.module. (refused too)
    torch.save({"teacher": {"backbone.a": w, "dino_head.mlp": w, "ibot_head.x": w}}, tmp_path / "teacher.pth")
    assert list(read_weights_file(tmp_path / "teacher.pth")) == ["a"]
    torch.save({"_orig_mod.module.a": w, "_orig_mod.module.b": w}, tmp_path / "compiled.pt")
    assert sorted(read_weights_file(tmp_path / "compiled.pt")) == ["a", "b"]


# ---------------------------------------------------------------------- ResNet-18 checkpoints
def test_resnet18_torchvision_file_loads_exactly(tmp_path):
    torch.manual_seed(0)
    full = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a loader that skipped buffers would show
        for m in full.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(full.state_dict(), tmp_path / "resnet18.pth")
    enc = build_encoder(EncoderConfig(name="resnet18", weights=str(tmp_path / "resnet18.pth")))
    x = torch.rand(2, 3, 70, 98)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        h = (x - mean[:, None, None]) / std[:, None, None]
        h = full.maxpool(full.relu(full.bn1(full.conv1(h))))
        ref = rearrange(full.layer3(full.layer2(full.layer1(h))), "b d h w -> b (h w) d")
    assert torch.equal(enc(x), ref)

    # a fine-tuned network's classifier, or none: fc is never used (both were refused)
    for fc in ({}, {"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}):
        sd = {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")} | fc
        torch.save(sd, tmp_path / "other_fc.pth")
        other = build_encoder(EncoderConfig(name="resnet18", weights=str(tmp_path / "other_fc.pth")))
        assert torch.equal(other(x), ref)

    # torchvision's ImageNet files predate BatchNorm's num_batches_tracked (torch fills it in): refused
    old = {k: v for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(full.state_dict())
    torch.save(old, tmp_path / "no_counters.pth")
    assert torch.equal(
        build_encoder(EncoderConfig(name="resnet18", weights=str(tmp_path / "no_counters.pth")))(x), ref
    )

    sd = full.state_dict()
    del sd["layer2.0.conv1.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(EncoderWeightsError, match=r"missing keys: layer2\.0\.conv1\.weight"):
        build_encoder(EncoderConfig(name="resnet18", weights=str(tmp_path / "broken.pth")))


def test_cnn_state_dict_round_trip(tmp_path):
    a = build_encoder(EncoderConfig())
    torch.save(a.state_dict(), tmp_path / "cnn.pt")
    b = build_encoder(EncoderConfig(weights=str(tmp_path / "cnn.pt")))
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(a(x), b(x)) and a.weights_hash() == b.weights_hash()
    with pytest.raises(EncoderWeightsError, match="missing keys"):
        build_encoder(EncoderConfig(cnn_channels=(32, 64, 64, 64), weights=str(tmp_path / "cnn.pt")))


def test_weights_files_that_load_wrongly_name_the_file_and_the_problem(tmp_path):
    sd = build_encoder(EncoderConfig()).state_dict()
    torch.save({**sd, "net.0.weight": torch.full_like(sd["net.0.weight"], float("nan"))}, tmp_path / "nan.pt")
    nan = r"nan.pt: non-finite weights \(NaN or inf\) in net.0.weight"
    with pytest.raises(EncoderWeightsError, match=nan):
        build_encoder(EncoderConfig(weights=str(tmp_path / "nan.pt")))  # was loaded: NaN features
    full = torchvision.models.resnet18(weights=None).state_dict()
    full["layer1.0.bn1.bias"] = torch.full_like(full["layer1.0.bn1.bias"], float("inf"))
    torch.save(full, tmp_path / "inf.pth")
    with pytest.raises(EncoderWeightsError, match=r"inf.pth: non-finite weights \(NaN or inf\) in layer1"):
        build_encoder(EncoderConfig(name="resnet18", weights=str(tmp_path / "inf.pth")))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole model: torch's 6-line advice
    pickled = r"^\S*module.pt: holds pickled Python objects.*state_dict\(\)"
    with pytest.raises(EncoderWeightsError, match=pickled):
        build_encoder(EncoderConfig(weights=str(tmp_path / "module.pt")))
    torch.save(sd, tmp_path / "flipped.pt")  # one bit changed in a copy: loaded as other weights before
    flip_bit_in_zip_entry(tmp_path / "flipped.pt", "data/0", at=3)
    with pytest.raises(EncoderWeightsError, match=r"flipped.pt is damaged: the bytes of its entry 'data/0'"):
        build_encoder(EncoderConfig(weights=str(tmp_path / "flipped.pt")))
    (tmp_path / "notes.pt").write_text("hello")  # was "cannot read the checkpoint (KeyError: 101)"
    with pytest.raises(EncoderWeightsError, match=r"notes.pt: cannot read the checkpoint; not a torch"):
        build_encoder(EncoderConfig(weights=str(tmp_path / "notes.pt")))


def test_weights_path_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    # "~" reaches the config unexpanded (encoder.weights=~/w.pt on a command line): it read as missing
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    assert build_encoder(EncoderConfig(name="resnet18", weights="~/resnet18.pth")).dim == 256
    a = build_encoder(EncoderConfig())
    torch.save(a.state_dict(), tmp_path / "cnn.pt")
    assert build_encoder(EncoderConfig(weights="~/cnn.pt")).weights_hash() == a.weights_hash()


@pytest.mark.parametrize(
    ("option", "value"),
    [("image_size", 2.5), ("image_size", float("nan")), ("cnn_dim", 16.5), ("allow_random", "false")],
)
def test_encoder_options_of_the_wrong_kind_are_refused(option, value):
    # were a TypeError from F.interpolate (image_size 2.5, nan), a torch error on channels (cnn_dim 16.5),
    # or taken as true (allow_random "false")
    with pytest.raises(ValueError, match=rf"^encoder.{option}={value!r} is not "):
        EncoderConfig(**{option: value})
    with pytest.raises(ValueError, match=r"^encoder.cnn_channels\[0\]=8.7 is not a whole number$"):
        EncoderConfig(cnn_channels=(8.7, 8))  # was cut to 8


# ---------------------------------------------------------------------- feature cache
IMG = (28, 42, 3)  # DINOv2: 2x3 = 6 patches


def episode(seed: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "img": rng.integers(0, 256, (length, *IMG), dtype=np.uint8),
        "wrist": rng.integers(0, 256, (length, 8, 8, 3), dtype=np.uint8),
        "state": rng.normal(size=(length, 3)).astype(np.float32),
        "action": rng.normal(size=(length, 2)).astype(np.float32),
    }


@pytest.fixture
def source(tmp_path):
    schema = Schema(
        keys={
            "img": KeySpec(IMG, "uint8", "image"),
            "wrist": KeySpec((8, 8, 3), "uint8", "image"),
            "state": KeySpec((3,), "float32", "proprio"),
            "action": KeySpec((2,), "float32", "action"),
        },
        fps=15,
        task="cache_test",
    )
    path = tmp_path / "demo.zarr"
    with DemoStore.create(path, schema) as store:
        for i in range(3):
            store.append_episode(episode(i, 5 + i), {"success": bool(i % 2)})
    return path


class CallCounter:
    """Counts the frames an encoder is asked to encode (a forward hook)."""

    def __init__(self, enc: torch.nn.Module) -> None:
        self.frames = 0
        self.fail_after: int | None = None
        enc.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.frames += args[0].shape[0]
        if self.fail_after is not None and self.frames > self.fail_after:
            raise RuntimeError("simulated crash")


def check_cache_matches(cache_path, source_path, enc) -> float:
    """Assert the cache holds the on-the-fly features and the source's other data; return the max error."""
    worst = 0.0
    with DemoStore.open(cache_path) as cache, DemoStore.open(source_path) as src:
        assert np.array_equal(cache.episode_ends, src.episode_ends)
        assert set(cache.keys) == {"img", "state", "action"}  # other image keys are not copied
        assert cache.schema.keys["img"] == KeySpec((6, 384), "float16", "lowdim")
        assert cache.schema.fps == 15 and cache.schema.task == "cache_test"
        for i in range(src.n_episodes):
            got, want = cache.get_episode(i), src.get_episode(i)
            x = torch.from_numpy(want["img"]).permute(0, 3, 1, 2).float() / 255
            ref = enc(x).numpy()  # (T, P, D) float32
            err = np.abs(got["img"].astype(np.float32) - ref)
            assert np.all(err <= np.abs(ref) * 2.0**-11 + 1e-7)  # float16 rounding, nothing more
            worst = max(worst, float(err.max()))
            for k in ("state", "action"):
                assert np.array_equal(got[k], want[k])
            info = cache.episode_info(i)
            assert info["success"] == src.episode_info(i)["success"]
            assert info["feature_cache"]["f16_max_abs_error"] == pytest.approx(err.max(), rel=1e-6)
    return worst


def test_feature_cache_matches_encoder_and_is_reused(vits, source, tmp_path):
    counter = CallCounter(vits)
    path = build_feature_cache(source, vits, "img", tmp_path / "cache", batch_size=4)
    assert path == feature_cache_path(source, vits, "img", tmp_path / "cache")
    assert path.name == f"demo__img__dinov2_vits14__{vits.weights_hash()}__28x42.zarr"
    assert counter.frames == 5 + 6 + 7
    info = cache_info(path)
    assert info["grid"] == [2, 3] and info["dim"] == 384 and info["weights_hash"] == vits.weights_hash()
    worst = check_cache_matches(path, source, vits)
    assert 0 < worst < 5e-3

    # Complete: reused, nothing encoded, nothing rewritten.
    counter.frames = 0
    stamp = (path / "zarr.json").stat().st_mtime_ns
    assert build_feature_cache(source, vits, "img", tmp_path / "cache") == path
    assert counter.frames == 0 and (path / "zarr.json").stat().st_mtime_ns == stamp

    # Something unreadable at the cache's path is rebuilt.
    shutil.rmtree(path)
    path.mkdir()
    with pytest.warns(UserWarning, match="rebuilding"):
        build_feature_cache(source, vits, "img", tmp_path / "cache")
    check_cache_matches(path, source, vits)

    # The window dataset reads it like any store.
    ds = WindowDataset(path, WindowSpec({"img": (-1, 0), "action": (0, 1)}))
    item = ds[0]
    assert item["img"].shape == (2, 6, 384) and item["img"].dtype == torch.float32


def test_the_cache_of_a_store_of_an_older_format_is_reused(vits, source, tmp_path):
    """A format 1 source (read, never moved to format 2: the cache only reads it) gave its cache schema
    format version 1 against the cache's 2: every build rebuilt the whole cache."""
    as_format_1(source)
    counter = CallCounter(vits)
    path = build_feature_cache(source, vits, "img", tmp_path / "cache", batch_size=4)
    assert counter.frames == 5 + 6 + 7
    counter.frames = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "rebuilding it"
        assert build_feature_cache(source, vits, "img", tmp_path / "cache") == path
    assert counter.frames == 0
    assert "wm_episodes" in zarr.open_group(str(source), mode="r").attrs  # the source is left as it was


def test_feature_cache_appends_new_episodes_and_resumes(vits, source, tmp_path):
    counter = CallCounter(vits)
    counter.fail_after = 5 + 6  # crash inside episode 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_feature_cache(source, vits, "img", tmp_path, batch_size=4)
    counter.fail_after, counter.frames = None, 0
    path = build_feature_cache(source, vits, "img", tmp_path, batch_size=4)
    assert counter.frames == 7  # only the episode that was interrupted
    with DemoStore.open(source, mode="a") as store:
        store.append_episode(episode(10, 9), {"success": True})
    counter.frames = 0
    assert build_feature_cache(source, vits, "img", tmp_path, batch_size=4) == path
    assert counter.frames == 9  # only the new episode
    check_cache_matches(path, source, vits)

    # A rewritten source (an episode deleted) is detected and the cache rebuilt.
    delete_episodes(source, [0])
    counter.frames = 0
    with pytest.warns(UserWarning, match="rebuilding"):
        build_feature_cache(source, vits, "img", tmp_path, batch_size=4)
    assert counter.frames == 6 + 7 + 9
    check_cache_matches(path, source, vits)


def test_feature_cache_is_rebuilt_when_the_data_it_copies_changed(vits, source, tmp_path):
    """The same frames with other actions (a re-conversion) or other episode info (an episode flagged
    action-free): the cache's copies would be stale, so it is rebuilt."""
    path = build_feature_cache(source, vits, "img", tmp_path, batch_size=4)
    with DemoStore.open(source) as src:
        schema, episodes = src.schema, [src.get_episode(i) for i in range(src.n_episodes)]
        infos = [src.episode_info(i) for i in range(src.n_episodes)]

    def rewrite(change) -> None:
        with DemoStore.create(source, schema, overwrite=True) as store:
            for i, (ep, info) in enumerate(zip(episodes, infos, strict=True)):
                ep, info = change(i, dict(ep), {k: v for k, v in info.items() if k != "length"})
                store.append_episode(ep, info)

    rewrite(lambda i, ep, info: (ep | {"action": ep["action"] * 100}, info))
    with pytest.warns(UserWarning, match="rebuilding"):
        assert build_feature_cache(source, vits, "img", tmp_path, batch_size=4) == path
    check_cache_matches(path, source, vits)
    rewrite(lambda i, ep, info: (ep, info | ({"action_free": True} if i == 1 else {})))
    with pytest.warns(UserWarning, match="rebuilding"):
        build_feature_cache(source, vits, "img", tmp_path, batch_size=4)
    with DemoStore.open(path) as cache:
        assert cache.episode_info(1)["action_free"] and "action_free" not in cache.episode_info(0)


@pytest.mark.parametrize("change", ["rewritten", "deleted"])
def test_a_store_rewritten_while_its_cache_is_built_is_said_and_nothing_of_it_kept(
    vits, source, tmp_path, change
):
    """A store converted again onto its path (or an episode deleted) during the build: the cache held the
    old store's first frames and the new one's last, without a word; a deletion read as a corrupt store
    (a missing chunk file)."""
    with DemoStore.open(source) as src:
        schema, episodes = src.schema, [src.get_episode(i) for i in range(src.n_episodes)]
        infos = [
            {k: v for k, v in src.episode_info(i).items() if k != "length"} for i in range(src.n_episodes)
        ]
    calls = []

    def rewrite_once(module, inputs, output) -> None:
        calls.append(1)
        if len(calls) == 2:  # an episode's first batch encoded
            if change == "deleted":
                delete_episodes(source, [0])
                return
            with DemoStore.create(source, schema, overwrite=True) as store:
                for ep, info in zip(episodes, infos, strict=True):
                    store.append_episode(ep | {"img": 255 - ep["img"]}, info)

    hook = vits.register_forward_hook(rewrite_once)
    try:
        with pytest.raises(
            StoreError, match=r"the store changed while its feature cache was built .*run again$"
        ):
            build_feature_cache(source, vits, "img", tmp_path, batch_size=4)
    finally:
        hook.remove()
    path = build_feature_cache(source, vits, "img", tmp_path, batch_size=4)  # the next build: the new store
    check_cache_matches(path, source, vits)


def _build_in_a_process(source, root, barrier, out) -> None:
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(name="cnn", cnn_channels=(4,), cnn_dim=4, cnn_stride=2))
    enc.trainable = False
    enc.requires_grad_(False).eval()
    barrier.wait()
    try:
        out.put(("ok", str(build_feature_cache(source, enc, "img", root, batch_size=4))))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put(("error", f"{type(e).__name__}: {e}"))


def test_processes_building_one_feature_cache_take_turns(source, tmp_path):
    """Every DDP rank builds the cache at start: they take turns, and the later ones reuse it (they
    crashed on each other's half-made store before)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in_a_process, args=(source, tmp_path, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert [r[0] for r in results] == ["ok", "ok"], results
    assert results[0][1] == results[1][1]
    with DemoStore.open(results[0][1]) as cache, DemoStore.open(source) as src:
        assert np.array_equal(cache.episode_ends, src.episode_ends)
        assert np.array_equal(cache.load_all(["action"])["action"], src.load_all(["action"])["action"])


def test_feature_cache_refuses_trainable_encoder_and_non_image_key(vits, source, tmp_path):
    with pytest.raises(FeatureCacheError, match="trainable"):
        build_feature_cache(source, build_encoder(EncoderConfig()), "img", tmp_path)
    with pytest.raises(SchemaError, match="not an image key"):
        build_feature_cache(source, vits, "state", tmp_path)


def test_a_non_finite_frame_met_by_the_feature_cache_is_named_by_episode_and_step(vits, tmp_path):
    """The refusal named the store and the key, not where the frame was (UWM's default cache meets a NaN
    frame the up-front sample of 8 missed)."""
    schema = Schema(
        keys={"img": KeySpec(IMG, "float32", "image"), "action": KeySpec((2,), "float32", "action")}
    )
    path = tmp_path / "float.zarr"
    rng = np.random.default_rng(0)
    with DemoStore.create(path, schema) as store:
        for e in range(2):
            img = rng.integers(0, 256, (6, *IMG)).astype(np.float32)
            if e == 1:
                img[3, 0, 0, 0] = np.nan
            store.append_episode({"img": img, "action": np.zeros((6, 2), np.float32)})
    with pytest.raises(
        SchemaError, match=r"'img' \(float32\) holds non-finite values \(NaN or inf\) in episode 1, step 3;"
    ):
        build_feature_cache(path, vits, "img", tmp_path / "cache", batch_size=4)


def test_the_world_models_config_lists_every_encoder_option():
    """configs/model/dino_wm.yaml left out image_size and resnet_layer: `model.encoder.image_size=224`,
    DINO-WM's setting, was refused as an unknown option (Hydra takes only the keys a config lists)."""
    import dataclasses
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "model" / "dino_wm.yaml").read_text())
    assert set(config["encoder"]) == {f.name for f in dataclasses.fields(EncoderConfig)}
