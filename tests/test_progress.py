"""The evaluation progress bar: counts, running success rate, planning time, silence when disabled."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from policies.progress import EvalProgress


@dataclass
class _Result:  # the fields of policies.evaluate.EpisodeResult that the bar reads
    success: bool
    steps: int
    plan_seconds: list[float] = field(default_factory=list)


def test_progress_shows_done_success_and_planning_time(tmp_path: Path) -> None:
    out = io.StringIO()
    bar = EvalProgress(total=3, file=out)
    bar.update(_Result(True, 10, [0.05, 0.05]))  # 100 ms of planning over 10 steps
    assert bar.postfix() == "success 1/1 (100%), plan 10.0 ms/step"
    bar.update(_Result(False, 30, [0.3]))
    text = out.getvalue()
    assert "2/3" in text and "success 1/2 (50%), plan 10.0 ms/step" in text
    line = bar.finish(tmp_path, report=tmp_path / "report.html")
    assert (
        line
        == f"2 episodes, success 1/2 (50%), plan 10.0 ms/step -> {tmp_path} (report: {tmp_path}/report.html)"
    )
    assert out.getvalue().rstrip().endswith(line)


def test_progress_disabled_is_silent(tmp_path: Path) -> None:
    out = io.StringIO()
    with EvalProgress(total=2, disable=True, file=out) as bar:
        bar.update(_Result(True, 5))
        assert bar.postfix() == "success 1/1 (100%), plan 0.0 ms/step"
        bar.finish(tmp_path)
    assert out.getvalue() == ""


def test_progress_refuses_empty_total() -> None:
    with pytest.raises(ValueError, match="total"):
        EvalProgress(total=0, disable=True)
