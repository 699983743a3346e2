"""`wm-serve checkpoint=DIR [controller=policy] [host=127.0.0.1] [port=5555] [token=...]`: serve a
controller to robots on other machines.

Loads any controller the model registry builds (a diffusion policy, MPC over a world model, random
actions: the same options as `wm-eval` and `wm-deploy`) on the best device, and answers chunk
requests from `wm-deploy robot=... server=HOST:PORT` (`robots.runtime.server`). Binds loopback by
default; any other address needs a shared secret (`token=`, or the WM_SERVE_TOKEN environment
variable, which keeps it out of the process list); the token is never printed. Runs until Ctrl-C.
"""

from __future__ import annotations

import functools
import signal
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig

from robots.runtime.server import ServerConfig, token_from_env
from tools._cli import UsageError, app, bind
from tools._controller import (
    TRAINED_ON,
    ControllerConfig,
    check_mpc,
    check_threads,
    refuse_temporal_ensemble,
    training_run,
    worker_controller,
)


@dataclass(frozen=True, kw_only=True)
class ServeConfig(ControllerConfig, ServerConfig):
    """`wm-serve`'s options: the controller (`ControllerConfig`), where and how to serve it
    (`ServerConfig`: host, port, token, sessions, limits), the inference threads and the seed."""

    inference_threads: int | None = None
    seed: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "token", token_from_env(self.token))  # before the bind check
        ControllerConfig.__post_init__(self)
        refuse_temporal_ensemble(self.policy, "in wm-serve")
        ServerConfig.__post_init__(self)
        check_threads(self.inference_threads)
        if self.seed < 0:  # as wm-eval and wm-deploy: a controller's generator refused it per session
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def server_config(self) -> ServerConfig:
        return ServerConfig(**{f.name: getattr(self, f.name) for f in fields(ServerConfig)})


def make_server(cfg: ServeConfig, log: Any = print) -> Any:
    """The server, listening (an address in use is one line before any model loads), its controllers
    built by `worker_controller` for each robot's bounds; a policy is built once now (its checkpoint
    checked before any robot is served) and fits every robot."""
    import torch

    from robots.runtime.realtime import usable_cores
    from robots.runtime.server import PolicyServer

    torch.set_num_threads(cfg.inference_threads or usable_cores())
    settings = cfg.settings()
    builder = functools.partial(_build, settings, cfg.seed)
    policy = cfg.controller == "policy"
    run = training_run(cfg.checkpoint) if cfg.checkpoint else {}  # a client compares its robot, rate
    trained_on = {k: run[k] for k in TRAINED_ON if k in run}
    meta = {"controller": cfg.controller, "checkpoint": cfg.checkpoint, "trained_on": trained_on}
    server = PolicyServer(
        builder, cfg.server_config(), key=(lambda low, high: None) if policy else None, meta=meta, log=log
    )
    try:
        server.bind()
    except OSError as e:  # the port is taken, the address is not this machine's: the user's to fix
        raise UsageError(str(e)) from None
    try:
        if policy:
            server.add_idle(builder([], []), [], [])
        elif cfg.controller == "mpc":
            check_mpc(settings)  # fails now, not at each robot's hello
    except BaseException:
        server.close()
        raise
    return server


def _build(settings: dict[str, Any], seed: int, low: list[float], high: list[float]) -> Any:
    return worker_controller(settings, low, high, seed)


def _main(cfg: DictConfig) -> int:
    conf = bind(ServeConfig, cfg, job_folder=None)
    server = make_server(conf, log=lambda line: print(line, flush=True))
    endpoint = server.endpoint
    auth = "token required" if server.cfg.token else "no token (loopback only)"
    print(
        f"serving controller={conf.controller} ({conf.checkpoint}) on {endpoint}; {auth}; "
        f"max_sessions={conf.max_sessions}",
        flush=True,
    )
    previous = signal.signal(signal.SIGINT, lambda *_: server.stop())
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.serve()
    finally:
        signal.signal(signal.SIGINT, previous)
        server.close()
    c = server.counts
    print(f"stopped: {c['chunks']} chunks, {c['errors']} errors, {c['refused']} refused", flush=True)
    return 0


main = app("serve", _main)

if __name__ == "__main__":
    main()
