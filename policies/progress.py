"""Evaluation progress on stderr: episodes done, running success rate, planning time per step.

    with EvalProgress(total=len(seeds)) as bar:
        for result in results_as_they_finish:
            bar.update(result)
        bar.finish(out_dir, report=out_dir / "report.html")

`disable=True` makes it silent (tests, library use). Results are read through the small `Finished`
protocol, which `policies.evaluate.EpisodeResult` satisfies.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TextIO

from tqdm import tqdm


class Finished(Protocol):
    success: bool
    steps: int
    plan_seconds: Sequence[float]  # seconds of each replan attributed to this episode


class EvalProgress:
    """A tqdm bar over `total` episodes; `update(result)` once per finished episode."""

    def __init__(
        self, total: int, *, disable: bool = False, desc: str = "eval", file: TextIO | None = None
    ) -> None:
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total}")
        self.done = self.successes = self.steps = 0
        self.plan_seconds = 0.0
        self.disable = disable
        self.file = file if file is not None else sys.stderr
        self.bar = tqdm(
            total=total, desc=desc, unit="ep", disable=disable, file=self.file, dynamic_ncols=True
        )

    def update(self, result: Finished) -> None:
        self.done += 1
        self.successes += bool(result.success)
        self.steps += int(result.steps)
        self.plan_seconds += float(sum(result.plan_seconds))
        self.bar.update(1)
        self.bar.set_postfix_str(self.postfix(), refresh=True)  # refresh: show the new count now

    def postfix(self) -> str:
        """ "success 2/3 (67%), plan 12.5 ms/step" over the episodes finished so far."""
        rate = self.successes / self.done if self.done else 0.0
        ms = 1000 * self.plan_seconds / self.steps if self.steps else 0.0
        return f"success {self.successes}/{self.done} ({rate:.0%}), plan {ms:.1f} ms/step"

    def finish(self, out_dir: Path, report: Path | None = None) -> str:
        """Close the bar and print one line naming where the outputs went; returns that line."""
        self.close()
        line = f"{self.done} episodes, {self.postfix()} -> {out_dir}"
        if report is not None:
            line += f" (report: {report})"
        if not self.disable:
            print(line, file=self.file, flush=True)
        return line

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> EvalProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
