"""The console scripts' entry points. Each imports its app's module and runs its `main`: Ctrl-C while
the app's modules load (torch, mujoco, Hydra: the first second or two of every command) ends it as one
during its work does, "interrupted" and exit status 130, not a traceback of whichever import it landed
in. This module imports nothing of the stack itself, so the window left before it is the interpreter's
own start."""

from __future__ import annotations

import functools
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


# each console script's entry point (pyproject.toml's [project.scripts])
info = functools.partial(_launch, "info")
convert = functools.partial(_launch, "convert")
collect = functools.partial(_launch, "collect")
train = functools.partial(_launch, "train")
eval = functools.partial(_launch, "eval")  # noqa: A001 - the app's name (wm-eval)
demo = functools.partial(_launch, "demo")
deploy = functools.partial(_launch, "deploy")
serve = functools.partial(_launch, "serve")
