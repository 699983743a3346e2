"""Predictor (block-causal transformer with KV cache) and patch-feature decoder."""

from __future__ import annotations

import pytest
import torch

from wm.decoder import Decoder, DecoderConfig
from wm.positions import block_causal_mask, sincos_2d
from wm.predictor import KVCache, Predictor, PredictorConfig, num_params

IN_DIM, OUT_DIM = 12, 10


def make(window: int = 3, depth: int = 2, seed: int = 0, **kw) -> Predictor:
    torch.manual_seed(seed)
    cfg = PredictorConfig(
        in_dim=IN_DIM,
        out_dim=OUT_DIM,
        dim=32,
        depth=depth,
        heads=4,
        head_dim=8,
        mlp_dim=64,
        max_frames=window,
        **kw,
    )
    return Predictor(cfg).eval()


def tokens(b: int, t: int, grid: tuple[int, int], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, grid[0] * grid[1], IN_DIM, generator=g)


def rollout(model: Predictor, x: torch.Tensor, grid, cache: KVCache | None = None) -> torch.Tensor:
    cache = cache or model.init_cache(x.shape[0], grid)
    outs = []
    for t in range(x.shape[1]):
        out, cache = model.step(x[:, t], grid, cache)
        outs.append(out)
        assert cache.frames <= model.window - 1
        assert all(k.shape[2] == cache.frames * x.shape[2] for k in cache.keys)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (14, 14)])
def test_shapes_any_grid(grid):
    model = make()
    x = tokens(2, 3, grid)
    with torch.no_grad():
        y = model(x, grid)
    assert y.shape == (2, 3, grid[0] * grid[1], OUT_DIM)
    assert torch.isfinite(y).all()


def test_same_model_runs_on_two_grids():
    model = make()
    with torch.no_grad():
        a = model(tokens(1, 2, (4, 4)), (4, 4))
        b = model(tokens(1, 2, (6, 3)), (6, 3))
    assert a.shape[2] == 16 and b.shape[2] == 18


def test_grid_mismatch_rejected():
    model = make()
    with pytest.raises(ValueError):
        model(tokens(1, 2, (4, 4)), (3, 4))


def test_spatial_embedding_distinct_positions():
    pe = sincos_2d((5, 7), 32, torch.empty(0))
    assert pe.shape == (35, 32)
    assert torch.cdist(pe, pe).add(torch.eye(35)).min() > 1e-3  # every patch position is distinct


@pytest.mark.parametrize("t", [0, 1, 3])
def test_causality(t):
    model = make(window=5)
    x = tokens(2, 5, (3, 4))
    x2 = x.clone()
    x2[:, t] += torch.randn_like(x2[:, t])
    with torch.no_grad():
        y, y2 = model(x, (3, 4)), model(x2, (3, 4))
    assert torch.equal(y[:, :t], y2[:, :t])  # earlier frames untouched
    assert (y[:, t] - y2[:, t]).abs().max() > 1e-3  # frame t itself does change


def test_sliding_window_limits_context():
    model = make(window=2, depth=1)  # one layer: frame t sees only frames t-1, t
    x = tokens(1, 5, (2, 2))
    x2 = x.clone()
    x2[:, 1] += 1.0
    with torch.no_grad():
        y, y2 = model(x, (2, 2)), model(x2, (2, 2))
    assert (y[:, 2] - y2[:, 2]).abs().max() > 1e-4
    assert torch.allclose(y[:, 3:], y2[:, 3:], atol=1e-6)


def test_block_causal_mask():
    m = block_causal_mask(frames=4, patches=2, window=2)
    frame = torch.arange(4).repeat_interleave(2)
    want = (frame[:, None] >= frame[None, :]) & (frame[:, None] - frame[None, :] < 2)
    assert torch.equal(m, want)


def test_masked_attention_matches_frame_blocks():
    model = make(window=3)
    masked = make(window=3, attention="masked")
    masked.load_state_dict(model.state_dict())
    x = tokens(2, 5, (3, 3))
    with torch.no_grad():
        torch.testing.assert_close(masked(x, (3, 3)), model(x, (3, 3)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("frames", [1, 2, 4])
def test_step_matches_forward_within_window(frames):
    model = make(window=4)
    x = tokens(2, frames, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(rollout(model, x, (3, 5)), model(x, (3, 5)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [1, 3])
def test_step_after_slide_matches_windowed_forward(window):
    model = make(window=window, depth=2)
    x = tokens(2, 8, (2, 3))
    with torch.no_grad():
        # exact semantics: step t == forward over all frames 0..t with the same sliding window
        torch.testing.assert_close(rollout(model, x, (2, 3)), model(x, (2, 3)), atol=1e-5, rtol=0)


def test_step_after_slide_matches_forward_on_last_window_one_layer():
    # with one layer, "windowed forward over everything" and "forward on the last window frames" coincide;
    # this also checks that rotary temporal positions are relative (window positions restart at 0)
    model = make(window=3, depth=1)
    x = tokens(2, 7, (3, 3))
    with torch.no_grad():
        steps = rollout(model, x, (3, 3))
        for t in range(2, 7):
            last = model(x[:, t - 2 : t + 1], (3, 3))[:, -1]
            torch.testing.assert_close(steps[:, t], last, atol=1e-5, rtol=0)


def test_step_invariant_to_absolute_frame_index():
    model = make(window=3)
    x = tokens(1, 5, (2, 2))
    with torch.no_grad():
        a = rollout(model, x, (2, 2))
        b = rollout(model, x, (2, 2), KVCache(next_frame=10**6))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_rotary_positions_folded_into_the_projection_rows():
    """RoPE applied to a frame's query / key projection rows (`rope_weights`) equals RoPE applied to q
    and k. Which one the predictor uses is measured: tests/test_kernels.py."""
    from wm.positions import apply_rope, rope_tables, rope_weights

    torch.manual_seed(0)
    heads, hd, d, patches = 3, 4, 5, 2
    w, x = torch.randn(2 * heads * hd, d), torch.randn(6, 3 * patches, d)
    rot = rope_tables(7, 3, hd, 100.0, x)  # frames 7, 8, 9
    rows = rope_weights(w, rot, heads)  # (3, 2*H*hd, D)
    q, k = (x @ w.T).unflatten(-1, (2, heads, hd)).permute(2, 0, 3, 1, 4)  # (B, H, T*P, hd) each
    want = torch.stack([apply_rope(q, rot, patches), apply_rope(k, rot, patches)])  # (2, B, H, T*P, hd)
    got = torch.cat([x[:, t * patches : (t + 1) * patches] @ rows[t].T for t in range(3)], dim=1)
    got = got.unflatten(-1, (2, heads, hd)).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_step_does_not_modify_cache_and_checks_grid():
    model = make(window=3)
    x = tokens(1, 2, (2, 2))
    with torch.no_grad():
        _, c1 = model.step(x[:, 0], (2, 2), model.init_cache(1, (2, 2)))
        k_before = c1.keys[0].clone()
        _, c2 = model.step(x[:, 1], (2, 2), c1)
    assert torch.equal(c1.keys[0], k_before) and c1.next_frame == 1 and c2.next_frame == 2
    with pytest.raises(ValueError):
        model.step(tokens(1, 1, (1, 4))[:, 0], (1, 4), c2)


def test_batch_independence_and_chunked_inference():
    model = make(window=3)
    chunked = make(window=3, inference_chunk_tokens=20)  # 3 frames x 6 patches: one sample per chunk
    chunked.load_state_dict(model.state_dict())
    x = tokens(4, 3, (2, 3))
    with torch.no_grad():
        full = model(x, (2, 3))
        torch.testing.assert_close(model(x[2:3], (2, 3)), full[2:3], atol=1e-5, rtol=0)
        torch.testing.assert_close(chunked(x, (2, 3)), full, atol=1e-5, rtol=0)
    x2 = x.clone()
    x2[0] += 1.0
    with torch.no_grad():
        assert torch.equal(model(x2, (2, 3))[1:], full[1:])


def test_default_inference_chunks_bound_the_widest_activation(monkeypatch):
    """By default a chunk holds as many whole samples as keep the widest activation (here the qkv
    projection, 3 x 32 channels) within CHUNK_BYTES in the dtype inference runs in; the chunked
    results (forward, and KV-cached steps with their caches) equal the unchunked ones."""
    import wm.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "CHUNK_BYTES", 96 * 4 * 36)  # 36 fp32 tokens
    model, whole = make(window=3), make(window=3, inference_chunk_tokens=0)
    whole.load_state_dict(model.state_dict())
    x = tokens(5, 3, (2, 3))  # 18 tokens a sample
    with torch.no_grad():  # (chunks are for inference: bf16 runs only without autograd)
        assert model.chunk_samples(18, x) == 2 and whole.chunk_samples(18, x) == 0
        assert make(window=3, precision="bf16").chunk_samples(18, x) == 4  # bf16: half the bytes a token
        assert make(window=3, inference_chunk_tokens=20).chunk_samples(18, x) == 1
    runs, steps = [], []
    run, step_chunk = model._run, model._step_chunk
    monkeypatch.setattr(model, "_run", lambda t, g: runs.append(t.shape[0]) or run(t, g))
    monkeypatch.setattr(model, "_step_chunk", lambda t, *a: steps.append(t.shape[0]) or step_chunk(t, *a))
    with torch.no_grad():
        torch.testing.assert_close(model(x, (2, 3)), whole(x, (2, 3)), atol=1e-5, rtol=0)
        more = tokens(5, 5, (2, 3), seed=2)  # past the window: the cache drops frames
        torch.testing.assert_close(
            rollout(model, more, (2, 3)), rollout(whole, more, (2, 3)), atol=1e-5, rtol=0
        )
    assert runs == [2, 2, 1] and steps == [2, 2, 1] * 5  # a step's sample counts as a window of tokens


def test_inference_kernels_match_autograd_path():
    # without autograd, CPU fp32 linears run through the kernel measured fastest (oneDNN with GELU fused,
    # or F.linear); with autograd, through F.linear
    model, plain = make(window=3), make(window=3, onednn=False)
    x = tokens(2, 3, (3, 4))
    with torch.no_grad():
        fast, ref = model(x, (3, 4)), plain(x, (3, 4))
    torch.testing.assert_close(fast, model(x, (3, 4)).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_bf16_precision_runs_a_bf16_copy():
    """precision="bf16": inference (forward and the KV-cached step) on a cached bf16 copy within a few %
    of fp32, no new state-dict entries, autograd-on calls in fp32, the copy following weight changes;
    "auto" resolves by the hardware."""
    from wm.precision import resolve_precision

    model, low = make(window=3), make(window=3, precision="bf16")
    low.load_state_dict(model.state_dict())
    assert set(low.state_dict()) == set(model.state_dict()) and low.precision == "bf16"
    x, grid = tokens(2, 3, (3, 4)), (3, 4)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    with torch.no_grad():
        ref, y, steps = model(x, grid), low(x, grid), rollout(low, x, grid)
    assert y.dtype == steps.dtype == torch.float32 and not torch.equal(y, ref)
    assert rel(y, ref) < 0.03 and rel(steps, ref) < 0.03
    with torch.enable_grad():
        torch.testing.assert_close(low(x, grid).detach(), ref, atol=1e-5, rtol=0)  # autograd on: fp32
    with torch.no_grad():
        for p in low.parameters():  # as an optimizer step would
            p.mul_(0.5).add_(0.01)
        y2 = low(x, grid)
    with torch.enable_grad():
        ref2 = low(x, grid).detach()
    assert rel(y2, ref2) < 0.03 and rel(ref2, ref) > 0.1
    assert make(precision="auto").precision == resolve_precision("auto", "cpu")


def test_gradients_flow_to_every_parameter():
    model = make(window=3, dropout=0.1).train()
    x = tokens(2, 3, (3, 3)).requires_grad_()
    model(x, (3, 3)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dino_wm_size_parameter_count():
    cfg = PredictorConfig(in_dim=404, out_dim=404, dim=404, depth=6, heads=16, head_dim=64, mlp_dim=2048)
    with torch.device("meta"):
        n = num_params(Predictor(cfg))
    assert 19e6 < n < 21e6


@pytest.mark.parametrize(
    "bad",
    [
        {"heads": 0},
        {"head_dim": 7},
        {"dim": 30},
        {"dropout": -0.1},
        {"dropout": 1.0},
        {"max_frames": 0},
        {"depth": 0},
        {"attention": "flash"},
        {"inference_chunk_tokens": -1},
        {"inference_chunk_tokens": 1.5},
        {"rope_base": 1.0},
        {"precision": "fp16"},
    ],
)
def test_predictor_config_rejects(bad):
    kw = {"in_dim": 8, "out_dim": 8, "dim": 32, "heads": 4, "head_dim": 8} | bad
    with pytest.raises(ValueError):
        PredictorConfig(**kw)


@pytest.mark.parametrize(
    ("bad", "shown"),
    [
        ({"rope_base": float("nan")}, r"rope_base must be a finite number > 1, got nan"),  # NaN outputs
        ({"rope_base": float("inf")}, r"rope_base must be a finite number > 1, got inf"),
        ({"max_frames": True}, r"max_frames must be a positive int, got True"),  # was a window of 1
        ({"onednn": "false"}, r"onednn must be True or False, got 'false'"),  # was true
    ],
)
def test_predictor_config_rejects_values_it_accepted(bad, shown):
    kw = {"in_dim": 8, "out_dim": 8, "dim": 32, "heads": 4, "head_dim": 8} | bad
    with pytest.raises(ValueError, match=rf"^{shown}$"):
        PredictorConfig(**kw)


def test_forward_and_step_name_bad_inputs_in_one_line():
    model = make(window=3)
    x = tokens(2, 2, (2, 2))
    with torch.no_grad():
        _, cache = model.step(x[:, 0], (2, 2), model.init_cache(2, (2, 2)))
        # another batch on a cache: was a torch.cat size error
        with pytest.raises(ValueError, match=r"^tokens_t has batch 3 but the cache holds 2 samples: start"):
            model.step(tokens(3, 1, (2, 2))[:, 0], (2, 2), cache)
        with pytest.raises(
            ValueError, match=r"^tokens_t must be one frame \(B, P, in_dim\), got \(2, 1, 4, 12"
        ):
            model.step(x[:, :1], (2, 2), cache)  # was "too many values to unpack"
        with pytest.raises(ValueError, match=r"^tokens must be \(B, T >= 1, P, in_dim\), got \(2, 4, 12\)"):
            model(x[:, 0], (2, 2))  # was "not enough values to unpack"
        with pytest.raises(ValueError, match=r"^tokens must be \(B, T >= 1, P, in_dim\), got \(2, 0, 4"):
            model(x[:, :0], (2, 2))  # was a ZeroDivisionError
        with pytest.raises(
            ValueError, match=r"^tokens are torch.float64 but the predictor's weights are torch"
        ):
            model(x.double(), (2, 2))  # was "mat1 and mat2 must have the same dtype"
        with pytest.raises(ValueError, match=r"^tokens_t are torch.int64 but the predictor's weights are"):
            model.step(x[:, 0].long(), (2, 2), model.init_cache())
        # 2.5 x 1.6 = 4 patches passed the count check, then int() made it a 2 x 1 grid
        with pytest.raises(ValueError, match=r"^grid must be two whole numbers >= 1 .*got \(2.5, 1.6\)$"):
            model(x, (2.5, 1.6))
        assert model(x, (2.0, 2.0)).shape == (2, 2, 4, OUT_DIM)  # whole floats still work


# ----------------------------------------------------------------------------- decoder


@pytest.mark.parametrize(
    "grid, upsample, out_hw",
    [
        ((8, 8), 8, (64, 64)),  # exact
        ((4, 6), 16, (64, 96)),  # exact, more stages than channels
        ((5, 7), 14, (70, 98)),  # factor is not a power of two: resized at the end
        ((3, 3), 8, (30, 20)),  # arbitrary output size
        ((2, 2), 1, (2, 2)),  # no upsampling stage
    ],
)
def test_decoder_shape_and_range(grid, upsample, out_hw):
    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(in_dim=16, channels=(16, 8), upsample=upsample))
    feats = torch.randn(2, grid[0] * grid[1], 16) * 5
    img = dec(feats, grid, out_hw)
    assert img.shape == (2, 3, *out_hw)
    assert img.min() >= 0 and img.max() <= 1
    img.mean().backward()
    assert all(p.grad is not None for p in dec.parameters())


def test_decoder_stage_count():
    assert DecoderConfig(in_dim=4, upsample=8).stages == 3
    assert DecoderConfig(in_dim=4, upsample=14).stages == 4
    assert DecoderConfig(in_dim=4, upsample=1).stages == 0


@pytest.mark.parametrize("bad", [{"upsample": 0}, {"channels": ()}, {"channels": (8, 0)}, {"in_dim": 0}])
def test_decoder_config_rejects(bad):
    with pytest.raises(ValueError):
        DecoderConfig(**({"in_dim": 8} | bad))
