"""`ChunkController.chunk_from` (real-time chunking): a chunk computed from given observations that
starts with the committed actions of the previous one, for the diffusion policy's controller (guided by
soft inpainting in every sampler), MPC (every planner through `FixedPrefix`) and the random baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import rearrange

from policies.base import ChunkController, Policy, expand_latent, shift_plan
from policies.chunking import ChunkPolicy
from policies.diffusion import (
    DiffusionPolicy,
    DiffusionPolicyConfig,
    NoiseConfig,
    ObsEncoderConfig,
    UNetConfig,
)
from policies.diffusion.noise import inpaint_weights
from policies.evaluate import RandomPolicy
from policies.inputs import ObsHistory, frames_to_tensor
from policies.mpc import MPC, MPCConfig
from policies.planners import CEMConfig, CEMThenGradConfig, GradConfig, MPPIConfig, build_planner
from wm.data.normalize import Normalizer, compute_stats
from wm.encoders import EncoderConfig
from wm.spec import IOSpec

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


# ---------------------------------------------------------------------- a tiny (untrained) diffusion policy
E, DA, IMG = 2, 2, 16
N_OBS, HORIZON, N_EXEC = 2, 8, 4
T = HORIZON - N_OBS + 1  # every action predicted from the current step on
LOW, HIGH = np.array([-0.5, -2.0]), np.array([1.5, 2.0])  # the action range the normalizer maps to [-1, 1]
SAMPLERS = {  # name: (sampler, steps, edm solver, consistency)
    "ddpm": ("ddpm", 1, "heun", False),
    "ddim": ("ddim", 4, "heun", False),
    "edm_heun": ("edm", 3, "heun", False),
    "dpmpp_2m": ("edm", 3, "dpmpp_2m", False),
    "consistency": ("consistency", 2, "heun", True),
}


def tiny_policy(name: str = "edm_heun") -> DiffusionPolicy:
    sampler, steps, solver, consistency = SAMPLERS[name]
    obs = ObsEncoderConfig(
        image_keys=("image",),
        image_size=(IMG, IMG),
        crop=(14, 14),
        proprio_dim=2,
        backbone="patch",
        feature_dim=16,
        patch_encoder=EncoderConfig(name="cnn", cnn_channels=(8,), cnn_dim=8, cnn_stride=2),
    )
    cfg = DiffusionPolicyConfig(
        obs=obs,
        action_dim=DA,
        n_obs=N_OBS,
        horizon=HORIZON,
        n_action_exec=N_EXEC,
        unet=UNetConfig(down_dims=(32, 64), step_embed_dim=32),
        noise=NoiseConfig(prediction_type="sample", num_train_steps=20, edm_solver=solver),
        sampler=sampler,
        sampler_steps=steps,
        consistency=consistency,
        precision="fp32",
    )
    stats = {
        "action": compute_stats(np.stack([LOW, HIGH])),
        "proprio": compute_stats(np.array([[-1.0], [1.0]])),
    }
    torch.manual_seed(0)
    return DiffusionPolicy(cfg, Normalizer({"action": "minmax", "proprio": "minmax"}, stats)).eval()


def raw_steps(n: int, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """n consecutive raw observations of E episodes and the n - 1 actions between them."""
    rng = np.random.default_rng(seed)
    steps = [
        {
            "image": rng.integers(0, 256, (E, IMG, IMG, 3), dtype=np.uint8),
            "proprio": rng.uniform(-1, 1, (E, 2)).astype(np.float32),
        }
        for _ in range(n)
    ]
    return steps, [rng.uniform(LOW, HIGH, (E, DA)).astype(np.float32) for _ in range(n - 1)]


def previous_chunk(n: int) -> np.ndarray:
    """(E, n, Da) raw actions far from what the untrained model samples (about the middle of the range)."""
    ramp = np.linspace(0.0, 1.0, n)[None, :, None]
    return (np.array([1.3, -1.7]) + 0.1 * ramp * np.array([-1.0, 1.0])).repeat(E, 0).astype(np.float32)


def test_chunk_from_without_previous_is_the_full_horizon_sample():
    model = tiny_policy()
    steps, actions = raw_steps(3)
    controller = ChunkPolicy(model, seed=3)
    assert isinstance(controller, ChunkController) and isinstance(controller, Policy)
    chunk = controller.chunk_from(steps, actions)
    assert chunk.shape == (E, T, DA) and len(controller.inference_seconds()) == 1
    # The full-horizon sample of the same history (the last 2 steps) and seed.
    history = ObsHistory(model.io_spec)
    history.push(steps[1])
    history.push(steps[2], actions[1])
    full = model.sample_actions(history.inputs(), torch.Generator().manual_seed(3), full=True)
    torch.testing.assert_close(chunk, full, rtol=0, atol=0)
    # Its first n_action_exec actions are what predict_action_chunk gives for that history and seed.
    other = ChunkPolicy(model, seed=3)
    other.history.push(steps[1])
    torch.testing.assert_close(chunk[:, :N_EXEC], other.predict_action_chunk(steps[2]), rtol=0, atol=0)
    # Earlier calls' observations do not matter: the history is replaced (same seed, same draws so far).
    one, two = ChunkPolicy(model, seed=5), ChunkPolicy(model, seed=5)
    one.chunk_from(*raw_steps(2, seed=8))
    two.chunk_from(*raw_steps(3, seed=9))
    torch.testing.assert_close(one.chunk_from(steps, actions), two.chunk_from(steps, actions), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_is_guided_onto_the_frozen_prefix(name):
    """Each sampler's guided sample lands on the frozen actions (float rounding aside) and the controller
    sets them exactly."""
    model = tiny_policy(name)
    steps, actions = raw_steps(2)
    prev, d = previous_chunk(5), 3
    chunk = ChunkPolicy(model, seed=1).chunk_from(steps, actions, prev, d)
    assert chunk.shape == (E, T, DA) and torch.isfinite(chunk).all()
    assert torch.equal(chunk[:, :d], torch.from_numpy(prev[:, :d]))
    history = ObsHistory(model.io_spec)
    history.refill(steps, actions)
    guided = model.sample_actions(
        history.inputs(), torch.Generator().manual_seed(1), torch.from_numpy(prev), d, full=True
    )
    torch.testing.assert_close(guided[:, :d], torch.from_numpy(prev[:, :d]), rtol=0, atol=1e-4)
    torch.testing.assert_close(chunk[:, d:], guided[:, d:], rtol=0, atol=0)  # the rest is the model's


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_guidance_pulls_the_rest_of_the_overlap_towards_previous(name):
    model = tiny_policy(name)
    steps, actions = raw_steps(2)
    prev, d, n = previous_chunk(6), 2, 6
    guided = ChunkPolicy(model, seed=4).chunk_from(steps, actions, prev, d)
    free = ChunkPolicy(model, seed=4).chunk_from(steps, actions)
    target = torch.from_numpy(prev[:, d:n])
    # The soft weights fall from about 0.57 to 0.03 over these 4 steps: about 25 % closer on average.
    assert (guided[:, d:n] - target).abs().mean() < 0.9 * (free[:, d:n] - target).abs().mean()


def test_inpaint_weights_follow_rtc_schedule():
    w = inpaint_weights(length=10, start=1, frozen=2, overlap=6)
    assert w[:1].tolist() == [0.0] and w[1:3].tolist() == [1.0, 1.0] and w[7:].tolist() == [0.0] * 3
    decay = w[3:7]
    assert bool((decay > 0).all() and (decay < 1).all() and (decay[1:] < decay[:-1]).all())
    c = (6 - 2) / (6 - 2 + 1)  # c_i = (n - i) / (n - d + 1) at i = d
    assert decay[0].item() == pytest.approx(c * np.expm1(c) / np.expm1(1.0))
    with pytest.raises(ValueError, match="leave none to sample"):
        inpaint_weights(length=8, start=1, frozen=7, overlap=9)


def test_refill_gives_the_inputs_of_pushing_step_by_step():
    io = IOSpec(image_keys=(), image_size=(1, 1), proprio_key="state", proprio_dim=2, action_dim=2,
                history=3, frameskip=2, past_actions=True)  # fmt: skip
    rng = np.random.default_rng(0)
    steps = [{"state": rng.normal(size=(E, 2)).astype(np.float32)} for _ in range(7)]
    actions = [rng.normal(size=(E, 2)).astype(np.float32) for _ in range(6)]
    for n in (1, 3, 7):  # fewer steps than the window (5), and more
        pushed, refilled = ObsHistory(io), ObsHistory(io)
        pushed.push(steps[0])
        for obs, a in zip(steps[1:n], actions[: n - 1], strict=True):
            pushed.push(obs, a)
        refilled.push(steps[6])  # replaced by the refill
        refilled.refill(steps[:n], actions[: n - 1])
        want, got = pushed.inputs(), refilled.inputs()
        assert want.keys() == got.keys() == {"state", "past_action"}
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 actions for 2 steps"):
        ObsHistory(io).refill(steps[:2], actions[:2])
    # a NaN executed action (a faulty log) never reaches a model that reads the past actions
    with pytest.raises(ValueError, match="prev_action holds non-finite values"):
        ObsHistory(io).refill(steps[:3], [actions[0], np.where(np.eye(E, 2) > 0, np.inf, actions[1])])
    # finite in float64 but not in float32: it passed, and became inf in past_action
    with pytest.raises(ValueError, match="prev_action holds non-finite values .*beyond float32's range"):
        ObsHistory(io).refill(steps[:3], [actions[0], np.full((E, 2), 1e39)])


def test_a_camera_whose_resolution_changes_within_the_history_is_resized_step_by_step():
    """Frames of any size are resized to the model's; two sizes in one window were a bare numpy error
    ("all input arrays must have the same shape") until the old frames left the history."""
    io = IOSpec(image_keys=("cam",), image_size=(8, 8), proprio_key=None, proprio_dim=0, action_dim=2,
                history=2)  # fmt: skip
    rng = np.random.default_rng(0)
    small, large = (rng.integers(0, 256, (E, s, s, 3), dtype=np.uint8) for s in (16, 32))
    history = ObsHistory(io)
    history.push({"cam": small})
    history.push({"cam": large}, np.zeros((E, 2), np.float32))
    got = history.inputs()["cam"]
    assert got.shape == (E, 2, 3, 8, 8)
    for t, frames in enumerate((small, large)):
        torch.testing.assert_close(got[:, t], frames_to_tensor(frames, (8, 8), "cpu"), rtol=0, atol=0)


# ---------------------------------------------------------------------- MPC over a toy world model
class SumModel:
    """A point that moves by the sum of the raw actions; the cost is the squared distance of the final
    state to the goal, so it depends on every action, the committed first ones included.
    obs {"state": (E, To, 2)}; latent {"state": (E, 2)}."""

    def __init__(self, frameskip: int) -> None:
        self.frameskip, self.action_dim = frameskip, frameskip * DA
        self.io_spec = IOSpec(image_keys=(), image_size=(1, 1), proprio_key="state", proprio_dim=DA,
                              action_dim=DA, frameskip=frameskip)  # fmt: skip
        self.encoded: list[torch.Tensor] = []

    def encode(self, obs):
        self.encoded.append(obs["state"][:, -1])
        return {"state": obs["state"][:, -1]}

    def rollout(self, z0, actions):
        raw = rearrange(actions, "e n h (f d) -> e n h f d", f=self.frameskip).sum(3)  # (E, N, H, Da)
        return {"state": expand_latent(z0, actions.shape[1])["state"].unsqueeze(2) + raw.cumsum(2)}

    def cost(self, pred, goal):
        return ((pred["state"][:, :, -1] - goal["state"][:, None]) ** 2).sum(-1)  # (E, N)


class WarmRecorder:
    """A planner that keeps the warm starts it was given."""

    def __init__(self, planner):
        self.planner, self.horizon, self.warm = planner, planner.horizon, []

    def plan(self, z0, goal, warm_start=None, budget=None, model=None):
        self.warm.append(None if warm_start is None else warm_start.clone())
        return self.planner.plan(z0, goal, warm_start, budget, model)


PLANNERS = {
    "cem": CEMConfig(horizon=3, samples=200, elites=20, iterations=20, low=-1.0, high=1.0),
    "mppi": MPPIConfig(horizon=3, samples=200, elites=20, iterations=20, low=-1.0, high=1.0),
    "gd": GradConfig(horizon=3, steps=150, lr=0.1, low=-1.0, high=1.0),
    "cem_gd": CEMThenGradConfig(
        cem=CEMConfig(horizon=3, samples=100, elites=10, iterations=5, low=-1.0, high=1.0),
        grad=GradConfig(horizon=3, steps=100, lr=0.1, low=-1.0, high=1.0),
    ),
}
FRAMESKIP, GOAL = 2, np.array([[1.5, 2.0], [2.5, 1.0]], np.float32)  # reachable after the prefix below


def make_mpc(name: str) -> tuple[MPC, SumModel, WarmRecorder]:
    model = SumModel(FRAMESKIP)
    planner = WarmRecorder(build_planner(PLANNERS[name], model))
    mpc = MPC(model, planner, MPCConfig(execute=1))
    mpc.set_goal({"state": GOAL})
    return mpc, model, planner


def state_steps(n: int) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    steps = [{"state": np.full((E, DA), 0.1 * t, np.float32)} for t in range(n)]
    return steps, [np.zeros((E, DA), np.float32) for _ in range(n - 1)]


@pytest.mark.parametrize("name", sorted(PLANNERS))
def test_mpc_plans_around_the_frozen_prefix(name):
    """The committed actions (0.8, 0.8) overshoot the goal; the planner saw them when the final state of
    the whole chunk, committed actions included, reaches the goal."""
    mpc, model, planner = make_mpc(name)
    assert isinstance(mpc, ChunkController)
    steps, actions = state_steps(3)
    prev, d = np.full((E, 4, DA), 0.8, np.float32), 3
    chunk = mpc.chunk_from(steps, actions, prev, d)
    assert chunk.shape == (E, 3 * FRAMESKIP, DA) and len(mpc.inference_seconds()) == 1
    assert torch.equal(chunk[:, :d], torch.from_numpy(prev[:, :d]))
    assert bool((chunk[:, d:].abs() <= 1.0).all())
    torch.testing.assert_close(model.encoded[-1], torch.from_numpy(steps[-1]["state"]))  # the newest step
    final = torch.from_numpy(steps[-1]["state"]) + chunk.sum(1)  # (E, Da)
    assert (final - torch.from_numpy(GOAL)).abs().max() < 0.1
    # The plan MPC keeps is the chunk, packed into planning steps.
    torch.testing.assert_close(
        mpc.last_result.actions, rearrange(chunk, "e (h f) d -> e h (f d)", f=FRAMESKIP)
    )


def test_mpc_warm_starts_from_previous_else_from_its_own_plan():
    mpc, model, planner = make_mpc("cem")
    steps, actions = state_steps(2)
    first = mpc.chunk_from(steps, actions)
    assert planner.warm == [None]
    mpc.chunk_from(steps, actions)  # no previous: the last plan shifted by the executed step
    packed = rearrange(first, "e (h f) d -> e h (f d)", f=FRAMESKIP)
    torch.testing.assert_close(planner.warm[1], shift_plan(packed, 1))
    prev = np.arange(E * 3 * DA, dtype=np.float32).reshape(E, 3, DA) / 10
    mpc.chunk_from(steps, actions, prev, 1)  # 3 raw actions: the last repeated into 2 steps, then 3
    a, b, c = (torch.from_numpy(prev[:, i]) for i in range(3))
    expect = torch.stack([torch.cat([a, b], -1), torch.cat([c, c], -1), torch.cat([c, c], -1)], dim=1)
    torch.testing.assert_close(planner.warm[2], expect)


def test_an_unguided_previous_warm_starts_a_planner_and_leaves_a_policy_alone():
    """With replace (or average, ensemble) stitching the runtime hands on the schedule unguided: MPC
    warm-started from its own last plan shifted by `execute` steps, however many had run; now from the
    schedule, which is the last plan shifted by the steps actually run. A policy samples as without it."""
    mpc, _, planner = make_mpc("cem")
    steps, actions = state_steps(2)
    prev = np.arange(E * 4 * DA, dtype=np.float32).reshape(E, 4, DA) / 10
    chunk = mpc.chunk_from(steps, actions, prev, 0, guide=False)
    torch.testing.assert_close(
        planner.warm[-1], rearrange(torch.from_numpy(prev), "e (h f) d -> e h (f d)", f=2)[:, [0, 1, 1]]
    )
    assert not torch.equal(chunk[:, :4], torch.from_numpy(prev))  # nothing frozen: planned afresh
    model = tiny_policy()
    steps, actions = raw_steps(3)
    guided = ChunkPolicy(model, seed=3).chunk_from(steps, actions, previous_chunk(6), 2, guide=True)
    alone = ChunkPolicy(model, seed=3).chunk_from(steps, actions, previous_chunk(6), 0, guide=False)
    plain = ChunkPolicy(model, seed=3).chunk_from(steps, actions)
    torch.testing.assert_close(alone, plain, rtol=0, atol=0)
    assert not torch.equal(guided, plain)


# ---------------------------------------------------------------------- the random baseline and bad input
def test_random_policy_chunk_keeps_the_prefix_within_bounds():
    policy = RandomPolicy(LOW, HIGH, seed=0, chunk=4)
    assert isinstance(policy, ChunkController)
    steps, actions = raw_steps(2)
    prev = previous_chunk(6)
    assert policy.chunk_from(steps, actions).shape == (E, 4, DA)
    chunk = policy.chunk_from(steps, actions, prev, 5)
    assert chunk.shape == (E, 6, DA) and torch.equal(chunk[:, :5], torch.from_numpy(prev[:, :5]))
    assert bool((chunk[:, 5:] >= torch.from_numpy(LOW).float()).all())
    assert bool((chunk[:, 5:] <= torch.from_numpy(HIGH).float()).all())


def controllers() -> dict[str, tuple[object, list, list]]:
    """Each controller with a valid request's steps and actions."""
    return {
        "chunk_policy": (ChunkPolicy(tiny_policy()), *raw_steps(2)),
        "mpc": (make_mpc("cem")[0], *state_steps(2)),
        "random": (RandomPolicy(LOW, HIGH), *raw_steps(2)),
    }


@pytest.mark.parametrize("kind", ["chunk_policy", "mpc", "random"])
def test_bad_requests_raise_one_clear_value_error(kind):
    controller, steps, actions = controllers()[kind]
    prev = previous_chunk(4)
    bad = {
        r"frozen must be in \[0, n = 4\].*got 5": (steps, actions, prev, 5),
        r"frozen must be in \[0, n = 4\].*got -1": (steps, actions, prev, -1),
        r"previous must be \(E, n, Da\) = \(2, n, 2\), got \(2, 4, 3\)": (
            steps, actions, np.zeros((E, 4, 3), np.float32), 1),
        r"previous must be \(E, n, Da\) = \(2, n, 2\), got \(1, 4, 2\)": (steps, actions, prev[:1], 1),
        "2 actions for 2 steps": (steps, actions * 2, prev, 1),
        "^NaN or inf values in previous:": (
            steps, actions, np.where(np.arange(4)[None, :, None] == 2, np.nan, prev), 1),
        "frozen = 1 without a previous chunk": (steps, actions, None, 1),
        "frozen must be a whole number of actions, got 1.5": (steps, actions, prev, 1.5),  # a TypeError
    }  # fmt: skip
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            controller.chunk_from(*args)
    if kind == "chunk_policy":  # its history holds the executed actions (MPC's here: one step, none)
        nan_action = [np.full((E, DA), np.nan, np.float32)] * len(actions)  # a faulty action log
        with pytest.raises(ValueError, match="prev_action holds non-finite values"):
            controller.chunk_from(steps, nan_action, prev, 1)
    if kind != "random":  # a chunk of fixed length: freezing all of it leaves nothing to compute
        long = np.zeros((E, 20, DA), np.float32)
        with pytest.raises(ValueError, match="leave none"):
            controller.chunk_from(steps, actions, long, 3 * FRAMESKIP if kind == "mpc" else T)


@pytest.mark.parametrize("kind", ["chunk_policy", "mpc", "random"])
def test_keys_the_controller_does_not_read_do_not_set_the_batch_size(kind):
    """The batch size came from the newest observation's first key: a scalar timestamp there was a
    TypeError, a task string's length the batch ("previous must be (13, n, 2)"), although the
    controllers ignore both."""
    controller, steps, actions = controllers()[kind]
    extra = [{"timestamp": np.float64(12.5), "task": "pick the cube", **s} for s in steps]
    chunk = controller.chunk_from(extra, actions, previous_chunk(4), 1)
    assert chunk.shape[0] == E and torch.equal(chunk[:, :1], torch.from_numpy(previous_chunk(4)[:, :1]))
