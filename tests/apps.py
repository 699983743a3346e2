"""The console scripts as the end-to-end tests run them, and the smallest models worth training
through them (`wm-train` options)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

BIN = Path(sys.executable).parent

TINY_WM = [  # a DINO-WM world model on a small CNN encoder
    "model.encoder.cnn_channels=[8,16]",
    "model.encoder.cnn_stride=4",
    "model.encoder.cnn_dim=16",
    "model.predictor_dim=32",
    "model.predictor_depth=1",
    "model.predictor_heads=2",
    "model.predictor_head_dim=16",
    "model.predictor_mlp_dim=32",
    "model.decoder_channels=[16,8]",
]

TINY_POLICY = [  # a diffusion policy on a small CNN patch encoder, trained for two steps
    "trainer.steps=2",
    "trainer.batch_size=4",
    "trainer.val_every=2",
    "model.obs.crop=null",
    "model.obs.backbone=patch",
    "+model.obs.patch_encoder={name: cnn, cnn_channels: [8, 16], cnn_stride: 4, cnn_dim: 16}",
]


def train_tiny_policy(task: str, store: Path, run: Path) -> Path:
    """A `TINY_POLICY` diffusion policy with a small UNet, trained on `store` into `run` (returned)."""
    res = cli(
        "wm-train", "model=diffusion_unet", f"task={task}", f"store={store}", f"out={run}", *TINY_POLICY,
        "model.unet.down_dims=[16,32]", "model.unet.n_groups=8", "model.sampler_steps=2",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return run


def cli(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run the console script `name` with `args`; its output captured."""
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=600)


def run_app(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The console script `name` run in this process: the `main()` its script calls, with `args` as its
    command line, stdout and stderr captured, the exit status from its `SystemExit`. For commands that
    must be refused before any work (the interpreter's start and torch's import cost ~2 s a process);
    commands that run, and what only a process shows (signals, its environment), go through `cli`."""
    (script,) = entry_points(group="console_scripts", name=name)
    main = script.load()
    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = [str(BIN / name), *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
                main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())
