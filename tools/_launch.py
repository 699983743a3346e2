"""The console scripts' entry points. Each imports its app's module and runs its `main`: Ctrl-C while
the app's modules load (torch, mujoco, Hydra: the first second or two of every command) ends it as one
during its work does, "interrupted" and exit status 130, not a traceback of whichever import it landed
in. This module imports nothing of the stack itself, so the window left before it is the interpreter's
own start."""

from __future__ import annotations

import importlib
import signal
import sys


def _launch(app: str) -> None:
    try:
        main = importlib.import_module(f"tools.{app}").main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    main()


def info() -> None:
    _launch("info")


def convert() -> None:
    _launch("convert")


def collect() -> None:
    _launch("collect")


def train() -> None:
    _launch("train")


def eval() -> None:  # noqa: A001 - the app's name (wm-eval)
    _launch("eval")


def demo() -> None:
    _launch("demo")


def deploy() -> None:
    _launch("deploy")


def serve() -> None:
    _launch("serve")
