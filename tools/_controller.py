"""The controller options `wm-eval` and `wm-deploy` share, and building a controller from them.

`ControllerConfig` is the flat block of options (`controller`, `checkpoint`, `planner`, `policy.*`,
subgoals, precision, device) both apps read; `load_controller` turns it into a `Policy` for a robot
whose actions are bounded by `low` / `high`: MPC over a world model (with latent-graph subgoals
from its training store), a diffusion policy, or random actions. `worker_controller` is the same,
called by name inside `wm-deploy`'s inference worker process.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from policies.base import check_budget
from policies.planners import DEFAULT_PLANNER
from policies.subgoal import GraphConfig
from tools._cli import UsageError, build, changed, one_of
from wm.seeding import derived_torch_seed

CONTROLLERS = ("mpc", "policy", "random")


@functools.cache
def default_planner() -> dict[str, Any]:
    """The planner options Hydra composes when none is chosen (`configs/planner/cem.yaml`)."""
    from omegaconf import OmegaConf

    import configs

    return OmegaConf.to_container(OmegaConf.load(Path(configs.__file__).parent / "planner" / "cem.yaml"))


POLICY_OPTIONS = {  # wm-eval policy.<name> -> the model config field it overrides at load time
    "sampler": "sampler",
    "sampler_steps": "sampler_steps",
    "edm_solver": "noise.edm_solver",
    "precision": "precision",
    "temporal_ensemble": "temporal_ensemble",
    "inpaint_guidance": "inpaint_guidance",
}


@dataclass(frozen=True)
class PolicyOptions:
    """`policy.*`: overrides of a policy checkpoint's inference settings (None: the checkpoint's own)."""

    sampler: str | None = None
    sampler_steps: int | None = None
    edm_solver: str | None = None
    precision: str | None = None
    temporal_ensemble: float | None = None
    inpaint_guidance: str | None = None

    def __post_init__(self) -> None:
        m = self.temporal_ensemble  # the checkpoint's check named model.temporal_ensemble
        if m is not None and not math.isfinite(m):
            raise UsageError(f"policy.temporal_ensemble must be a finite number or null, got {m}")
        if self.sampler is not None:
            self.check_sampler(self.sampler, f"policy.sampler={self.sampler}")

    def check_sampler(self, sampler: str, named: str) -> None:
        """Options the `sampler` in use (`named` so) never reads were recorded as used: refused."""
        if self.edm_solver is not None and sampler != "edm":
            raise UsageError(
                f"policy.edm_solver={self.edm_solver} solves the edm sampler's steps; {named} has none: "
                "leave it out"
            )
        if self.sampler_steps is not None and sampler == "ddpm":  # it runs every training step
            raise UsageError(
                f"policy.sampler_steps={self.sampler_steps} has no effect: {named} runs every training "
                "step; leave it out, or give policy.sampler=ddim or edm"
            )


def refuse_temporal_ensemble(policy: PolicyOptions, where: str) -> None:
    """`policy.temporal_ensemble` combines a policy's own chunks step by step (wm-eval); where a robot's
    runtime asks for the chunks (wm-deploy, wm-serve) it combines them itself, and the option was ignored."""
    if policy.temporal_ensemble is not None:
        raise UsageError(
            f"policy.temporal_ensemble has no effect {where}: the runtime combines the chunks; give "
            "wm-deploy runtime.stitching=ensemble (runtime.ensemble_m for its weights)"
        )


def refuse_unguided_inpaint(policy: PolicyOptions, where: str) -> None:
    """`policy.inpaint_guidance` where no chunk is guided (wm-eval; wm-deploy but for async inpainting)
    was accepted, recorded as used, and changed nothing."""
    if policy.inpaint_guidance is not None:
        raise UsageError(
            f"policy.inpaint_guidance has no effect {where}: it guides a chunk towards the one it replaces, "
            "which only wm-deploy's runtime.mode=async with runtime.stitching=inpaint asks for; leave it out"
        )


MAX_THREADS = 4096


def check_threads(threads: int | None) -> None:
    """`inference_threads` (wm-deploy's, wm-serve's): None (the machine's) or 1..MAX_THREADS (a huge
    count was torch's "Overflow when unpacking long long")."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"inference_threads must be in 1..{MAX_THREADS}, got {threads}")


@dataclass(frozen=True)
class PlannerBudget:
    """`planner_budget.*`: a cap on every replan (None: none)."""

    iterations: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        check_budget(self.iterations, self.seconds, "iterations")


@dataclass(frozen=True, kw_only=True)
class ControllerConfig:
    """What controls the robot: see `configs/eval.yaml` for every option's meaning."""

    controller: str = "mpc"
    checkpoint: str | None = None
    planner: dict[str, Any] = field(default_factory=lambda: {"name": DEFAULT_PLANNER})
    planner_budget: PlannerBudget = field(default_factory=PlannerBudget)
    execute: int = 1
    subgoals: str = "auto"
    store: str | None = None
    graph: GraphConfig = field(default_factory=GraphConfig)
    objective: str = "checkpoint"
    precision: str | None = None
    policy: PolicyOptions = field(default_factory=PolicyOptions)
    device: str = "auto"

    def __post_init__(self) -> None:
        from policies.planners import PLANNERS

        one_of("controller", self.controller, CONTROLLERS)
        if self.controller != "random" and not self.checkpoint:
            raise UsageError(
                f"controller={self.controller} needs checkpoint=DIR (a wm-train output directory)"
            )
        one_of("objective", self.objective, ("checkpoint", "last_frame", "all_frames"))
        one_of("subgoals", self.subgoals, ("auto", "on", "off"))
        if self.precision is not None:
            one_of("precision", self.precision, ("fp32", "bf16", "auto"))
            if self.controller != "mpc":
                raise UsageError(
                    "precision= sets the world model's planning precision; for a policy use policy.precision="
                )
        one_of("planner.name", self.planner.get("name"), list(PLANNERS))
        self._check_options_apply()
        if self.controller == "mpc":  # typed now: `planner.lr=abc` failed as a bug's traceback after the
            most = self.planner_iterations()  # model loaded, and `planner.return_best=no` read as true
            cap = self.planner_budget.iterations
            if cap is not None and cap > most:  # (it ran the planner's own and results.json recorded it)
                raise UsageError(
                    f"planner_budget.iterations={cap} caps nothing: the {self.planner.get('name')} planner "
                    f"runs {most} iterations; raise them (e.g. planner.iterations) or lower the cap"
                )

    def mpc_options_given(self) -> list[str]:
        """MPC's options set to other than their defaults (the planner group aside: Hydra always
        composes one)."""
        names = ("planner_budget", "execute", "subgoals", "store", "graph", "objective", "precision")
        # subgoals=off asks for nothing a controller that does not plan would miss
        return [n for n in changed(self, names) if n != "subgoals" or self.subgoals == "on"]

    def policy_options_given(self) -> list[str]:
        return ["policy." + k for k, v in vars(self.policy).items() if v is not None]

    def planner_options_given(self) -> list[str]:
        """`planner=NAME` or the `planner.*` options set to other than those of the group composed by
        default (`configs/planner/cem.yaml`)."""
        default = default_planner()
        if self.planner.get("name") != default["name"]:
            return [f"planner={self.planner.get('name')}"]
        return [f"planner.{k}" for k, v in self.planner.items() if k not in default or v != default[k]]

    def _check_options_apply(self) -> None:
        """An option of another controller is refused, not ignored (a user who sets
        `policy.sampler_steps` with controller=mpc believes they measured it)."""
        if self.controller == "random" and self.checkpoint:
            raise UsageError(
                "checkpoint=: controller=random acts at random and reads no checkpoint; leave it out"
            )
        given = [o for o in self.mpc_options_given() if o != "precision"]  # refused above, in its words
        given += self.planner_options_given()
        if self.controller != "mpc" and given:
            raise UsageError(
                f"{', '.join(given)}: MPC options, and controller={self.controller} does not plan; "
                "leave them out"
            )
        graph = [n for n in changed(self, ("store", "graph")) if self.subgoals == "off"]
        if self.controller == "mpc" and graph:  # they were ignored, and results.json recorded them
            raise UsageError(
                f"{', '.join(graph)}: options of the subgoal graph, and subgoals=off; leave them out"
            )
        given = self.policy_options_given()
        if self.controller != "policy" and given:
            raise UsageError(
                f"{', '.join(given)}: options of controller=policy, "
                f"not of controller={self.controller}; leave them out"
            )

    def typed_planner(self) -> Any:
        """The planner options as its typed config (one line naming an option of the wrong type)."""
        from policies.planners import PLANNERS

        name = self.planner.get("name")
        rest = {k: v for k, v in self.planner.items() if k != "name"}
        return build(PLANNERS[name][0], rest, "planner")

    def planner_iterations(self) -> int:
        """The configured planner's own iteration count."""
        return self.typed_planner().max_iterations

    def settings(self) -> dict[str, Any]:
        """The controller options alone, as plain values (to rebuild them in another process)."""
        from dataclasses import asdict, fields

        return {f.name: v for f in fields(ControllerConfig) for v in [asdict(self)[f.name]]}


def load_checkpoint_model(cfg: ControllerConfig) -> Any:
    """The registry's `LoadedModel` of `cfg.checkpoint` with `cfg`'s inference settings, on its device;
    `policy.*` options the checkpoint's own sampler never reads are refused (they were recorded as used)."""
    from wm.registry import load_model

    loaded = load_model(cfg.checkpoint, _device(cfg.device), _overrides(cfg), controller=cfg.controller)
    sampler = loaded.config.get("sampler")
    if cfg.controller == "policy" and cfg.policy.sampler is None and isinstance(sampler, str):
        cfg.policy.check_sampler(sampler, f"the checkpoint's sampler ({sampler})")
    return loaded


def load_controller(
    cfg: ControllerConfig, low: np.ndarray, high: np.ndarray, seed: int = 0
) -> tuple[Any, Any]:
    """(controller, loaded model or None) for a robot with actions in [low, high]; MPC and policies come
    from `cfg.checkpoint` through the model registry. `seed`: random actions' seed, and with the planner's
    own seed the seed of MPC's sampling noise."""
    from policies.evaluate import RandomPolicy

    if cfg.controller == "random":
        return RandomPolicy(low, high, seed), None
    loaded = load_checkpoint_model(cfg)
    if cfg.controller == "policy":
        return loaded.policy(), loaded
    feat = SimpleNamespace(low=np.asarray(low), high=np.asarray(high))
    make = _mpc_builder(replace(cfg, planner=_seeded(cfg.planner, seed)), loaded, feat)
    return make(cfg.planner_budget.iterations), loaded


TRAINED_ON = ("store", "store_robot", "store_fps")  # what `trained_elsewhere` reads of a run config


def training_run(checkpoint: str) -> dict[str, Any]:
    """The run config a checkpoint was trained with (`wm-train`'s, {} for none), its weights left on disk."""
    import torch

    from wm.checkpoint import latest_checkpoint

    path = Path(checkpoint)
    path = (latest_checkpoint(path) or path) if path.is_dir() else path
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - loading the model says what is wrong with the file
        return {}
    run = (ckpt.get("extra") or {}).get("run_config") if isinstance(ckpt, dict) else None
    return run if isinstance(run, dict) else {}


def trained_elsewhere(run: dict[str, Any], robot: str, hz: float, rate_fix: str = "") -> list[str]:
    """Notes when the checkpoint's training data (`run`, its run config) came from another robot or task
    than `robot`, or at another rate than `hz`, the rate its actions run at here (a 10 Hz policy run at
    20 Hz plays each action for half the time it was shown for); `rate_fix` ends the rate's note, its
    `{fps}` the training rate. Checkpoints that recorded neither: none."""
    notes = []
    trained, fps = run.get("store_robot"), run.get("store_fps")  # (a server's, for a remote model)
    if isinstance(trained, str) and trained and trained != robot:
        notes.append(f"the checkpoint was trained on {trained} data ({run.get('store')}); this runs {robot}")
    if (
        isinstance(fps, (int, float))
        and math.isfinite(fps)
        and fps > 0
        and not math.isclose(fps, hz, rel_tol=1e-3)
    ):
        notes.append(
            f"the checkpoint was trained on data at {fps:g} Hz, and its actions run at {hz:g} Hz here: each "
            f"was meant for {1 / fps:.3g} s" + (f"; {rate_fix.format(fps=f'{fps:g}')}" if rate_fix else "")
        )
    return notes


def check_mpc(settings: dict[str, Any]) -> None:
    """Refuse now what building an MPC for each robot would refuse (a server, before any robot connects):
    the checkpoint, the subgoal store, and the planner and MPC options, checked on an MPC over the model's
    action dimensions with a unit box standing in for the robot's bounds (the graph is not built)."""
    from policies.build import build_mpc, graph_nodes
    from policies.mpc import MPCConfig
    from wm.data import DemoStore
    from wm.registry import load_model

    cfg = build(ControllerConfig, settings)
    loaded = load_model(cfg.checkpoint, _device(cfg.device), _overrides(cfg), controller="mpc")
    store = _graph_store(cfg, loaded.checkpoint)
    if store is not None:  # the graph's nodes (keys, episodes): a server started, and every robot failed
        with DemoStore.open(store) as s:
            graph_nodes(s, loaded.model.io_spec, cfg.graph)
    ones = np.ones(loaded.model.io_spec.action_dim)
    mpc_cfg = MPCConfig(execute=cfg.execute, max_iterations=cfg.planner_budget.iterations)
    build_mpc(loaded.model, -ones, ones, cfg.planner, mpc_cfg, None)


def _seeded(planner: dict[str, Any], seed: int) -> dict[str, Any]:
    """The planner's options with its sampling seed (each stage's, for cem_gd) derived from `seed` and
    itself; a seed of None (fresh per planner) stays None."""

    def stage(options: dict[str, Any]) -> dict[str, Any]:
        own = options.get("seed", 0)
        return options if own is None else {**options, "seed": derived_torch_seed(int(own), seed)}

    if planner.get("name", DEFAULT_PLANNER) == "cem_gd":
        return {**planner, **{k: stage(dict(planner.get(k, {}))) for k in ("cem", "grad")}}
    return stage(dict(planner))


def worker_controller(settings: dict[str, Any], low: list[float], high: list[float], seed: int = 0) -> Any:
    """`load_controller` from plain settings: the `ControllerSpec` builder of `wm-deploy`'s worker."""
    cfg = build(ControllerConfig, settings)
    return load_controller(cfg, np.asarray(low), np.asarray(high), seed)[0]


def _device(name: str) -> Any:
    from wm.trainer import pick_device

    try:
        return pick_device(name)
    except RuntimeError as e:  # torch's words for a device name it does not know or does not have
        raise UsageError(f"device={name}: {str(e).splitlines()[0]}") from e


def _overrides(cfg: ControllerConfig) -> dict[str, Any]:
    """Inference settings for the registry to build the model with (not patched on afterwards)."""
    if cfg.controller == "policy":
        return {POLICY_OPTIONS[k]: v for k, v in cfg.policy.__dict__.items() if v is not None}
    over: dict[str, Any] = {"predictor_precision": cfg.precision} if cfg.precision else {}
    if cfg.objective != "checkpoint":
        over["cost_all_frames"] = cfg.objective == "all_frames"
    return over


def _mpc_builder(cfg: ControllerConfig, loaded: Any, feat: Any) -> Any:
    """A function of an iteration cap -> a fresh MPC over the loaded world model (the subgoal graph is
    built once and shared)."""
    from policies.build import build_graph, build_mpc
    from policies.mpc import MPCConfig

    store = _graph_store(cfg, loaded.checkpoint)
    graph = build_graph(loaded.model, store, cfg.graph) if store else None
    if graph is not None and graph.step_length == 0:  # it would never give a subgoal, and nothing said so
        why = (
            f"the subgoal graph from {store} measures no motion (no two nodes of one episode differ: "
            f"graph.stride={cfg.graph.stride} is longer than its episodes, or they do not move)"
        )
        if cfg.subgoals == "on":
            raise ValueError(f"subgoals=on: {why}; lower graph.stride or give subgoals=off")
        print(f"note: subgoals off: {why}", flush=True)
        graph = None
    seconds = cfg.planner_budget.seconds

    def make(iterations: int | None) -> Any:
        mpc_cfg = MPCConfig(execute=cfg.execute, max_iterations=iterations, seconds=seconds)
        return build_mpc(loaded.model, feat.low, feat.high, cfg.planner, mpc_cfg, graph)

    return make


def _graph_store(cfg: ControllerConfig, ckpt: dict[str, Any]) -> str | None:
    """The store the subgoal graph is built from: `store=` (which must exist), else the one the checkpoint
    was trained on. With subgoals=auto and no store found, subgoals are off, and the evaluation says so."""
    if cfg.subgoals == "off":
        return None
    run = (ckpt.get("extra") or {}).get("run_config") or {}
    if cfg.store and not Path(cfg.store).exists():  # given: not the training store, and not to be dropped
        raise ValueError(f"store={cfg.store} does not exist (the store subgoals are built from)")
    from wm.data.errors import StoreError

    store = cfg.store or run.get("store")
    why = (
        f"the training store {store!r} does not exist" if store else "the checkpoint names no training store"
    )
    if store and Path(store).exists():
        try:
            _say_if_changed(str(store), run)
            return str(store)
        except StoreError as e:  # (an empty folder where the store was: auto turns subgoals off)
            if cfg.subgoals == "on" or cfg.store:
                raise
            why = f"the training store cannot be read ({e})"
    if cfg.subgoals == "on":
        raise ValueError(f"subgoals=on needs the training store: {why}; pass store=PATH")
    print(f"note: subgoals off: {why} (pass store=PATH to use them)", flush=True)
    return None


def _say_if_changed(store: str, run: dict[str, Any]) -> None:
    """One line when the store differs from the one the world model was trained on (its fingerprint);
    a StoreError when it cannot be opened."""
    from wm.data import DemoStore

    with DemoStore.open(store) as s:
        if "store_fingerprint" not in run or s.fingerprint == run["store_fingerprint"]:
            return
        now = s.n_episodes
    print(
        f"note: subgoals from {store}, which is not the store the world model was trained on "
        f"({run.get('store_episodes')} episodes then, {now} now; content differs)",
        flush=True,
    )
