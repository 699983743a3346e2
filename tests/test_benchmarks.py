"""The benchmark scripts whose figures BENCHMARKS.md records still run, at their smallest sizes (their
timings mean nothing here: only that each mode runs to its end and prints its figures). `bench_runtime.py
ticks` had stopped running for a whole session: a later change refused an option it passed, and no
test ran it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from apps import cli, train_tiny_policy

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def bench(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    res = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def push_policy(tmp_path_factory) -> Path:
    """A diffusion policy for the arm-pushing task (bench_runtime's), trained for two steps."""
    folder = tmp_path_factory.mktemp("bench")
    store, run = folder / "push.zarr", folder / "dp"
    res = cli("wm-collect", "task=arm_push", "episodes=2", f"store={store}", "image_size=32", "max_steps=20")
    assert res.returncode == 0, res.stderr
    return train_tiny_policy("arm_push", store, run)


def test_runtime_ticks_and_latency(push_policy, tmp_path):
    res = bench(
        "bench_runtime.py", "--json", "ticks.json", "ticks", "--checkpoint", str(push_policy),
        "--seconds", "1", "--hz", "20", cwd=tmp_path,
    )  # fmt: skip
    figures = json.loads((tmp_path / "ticks.json").read_text())
    assert figures["async"]["ticks"] == figures["sync"]["ticks"] == 20, res.stdout
    bench(
        "bench_runtime.py", "--json", "latency.json", "latency", "--checkpoint", str(push_policy),
        "--episodes", "1", "--delays", "0", "--only", "sync/replace", "async/inpaint", cwd=tmp_path,
    )  # fmt: skip
    assert (tmp_path / "latency.json").is_file()


def test_runtime_pauses_store_commit_and_simulators(tmp_path):
    bench("bench_runtime.py", "pauses", "--minutes", "0.02", cwd=tmp_path)
    bench("bench_store_commit.py", "--episodes", "20", "--block", "10", "--steps", "3", cwd=tmp_path)
    bench(
        "bench_sim.py", "--tasks", "pointmaze", "arm_push", "--steps", "20", "--episodes", "1", cwd=tmp_path
    )
