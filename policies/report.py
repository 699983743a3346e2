"""One self-contained `report.html` per evaluation, written beside results.json.

It holds the summary (success rate, distances, scores, timing, what was evaluated), the per-episode
table, the success-against-budget plot and the episode videos, the last two inlined as base64 data
URIs. A Content-Security-Policy admits data URIs and inline style only, so the page loads nothing
from disk or the network: it can be mailed or archived as one file. All text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policies.video import MIME

_CSP = "default-src 'none'; img-src data:; media-src data:; style-src 'unsafe-inline'"
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
.success { color: #148c3c; font-weight: bold; } .failure { color: #be1e1e; font-weight: bold; }
.videos { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } video, img { max-width: 100%; }
"""


def write_report(
    out_dir: Path, results: dict[str, Any], videos: Sequence[Path] = (), plot: Path | None = None
) -> Path:
    """Write `out_dir/report.html` from `summarize`-style results (plus task, controller, checkpoint,
    inference, budgets when present), episode videos (mp4 or webm) and an optional PNG plot."""
    title = f"{results.get('task', 'evaluation')}: {results.get('controller', '')}".rstrip(": ")
    parts = [
        f"<h1>{_esc(title)}</h1>",
        _table(("", "value"), _summary_rows(results), header_column=True),
    ]
    if results.get("budgets"):
        parts += ["<h2>Success against planner budget</h2>", _budget_table(results["budgets"])]
    if plot is not None:
        alt = "success rate against planner iterations"
        parts.append(f'<img id="plot" alt="{_esc(alt)}" src="{_data_uri(plot, "image/png")}">')
    if videos:
        parts += ["<h2>Episodes</h2>", '<div class="videos">', *map(_video, videos), "</div>"]
    if results.get("per_episode"):
        parts += ["<h2>Per episode</h2>", _episode_table(results["per_episode"])]
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        f"<title>{_esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )
    path = Path(out_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def success_text(results: dict[str, Any]) -> str:
    """ "50.0 % (1 / 2)": the success rate, with counts when the per-episode results are there."""
    text = _percent(results.get("success_rate", 0.0))
    episodes = results.get("per_episode") or []
    if episodes:
        text += f" ({sum(bool(e.get('success')) for e in episodes)} / {len(episodes)})"
    return text


def _summary_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("task", _fmt(results.get("task"))),
        ("controller", _fmt(results.get("controller"))),
        ("checkpoint", _fmt(results.get("checkpoint"))),
        ("episodes", _fmt(results.get("episodes"))),
        ("success rate", success_text(results)),
        ("mean final distance", _fmt(results.get("mean_final_distance"))),
    ]
    if results.get("mean_max_score") is not None:
        rows.append(("mean max score", _fmt(results["mean_max_score"])))
    if results.get("errors"):
        rows.append(("episodes stopped (non-finite action, a failure)", _fmt(results["errors"])))
    if results.get("clipped_steps"):
        rows.append(
            ("steps cut short by the task (action limits, workspace)", _fmt(results["clipped_steps"]))
        )
    for key, label in (
        ("planning_seconds_per_step", "planning time per step"),
        ("planning_seconds_per_replan_per_episode", "planning time per replan (per episode)"),
        ("action_seconds_per_step", "action time per step"),
    ):
        if results.get(key) is not None:
            rows.append((label, _ms(results[key])))
    if results.get("wall_seconds") is not None:
        rows.append(("wall time", _number(results["wall_seconds"], 1, 1, " s")))
    if results.get("subgoal_replans") is not None:
        rows.append(("subgoal replans", _fmt(results["subgoal_replans"])))
    if results.get("seeds"):
        rows.append(("seeds", " to ".join(str(s) for s in results["seeds"])))
    rows += [(f"inference: {k}", _fmt(v)) for k, v in (results.get("inference") or {}).items()]
    return rows


def _episode_table(episodes: Sequence[dict[str, Any]]) -> str:
    errors = any(e.get("error") for e in episodes)  # why an episode was stopped, when one was
    rows = []
    for e in episodes:
        ok = bool(e.get("success"))
        rows.append(
            (
                _fmt(e.get("seed")),
                ("success" if ok else "failure", "success" if ok else "failure"),
                _fmt(e.get("steps")),
                _fmt(e.get("final_distance")),
                _fmt(e.get("max_score")),
            )
            + ((_fmt(e.get("error")),) if errors else ())
        )
    headers = ("seed", "success", "steps", "final distance", "score") + (("error",) if errors else ())
    return _table(headers, rows, ident="episodes")


def _budget_table(points: Sequence[dict[str, Any]]) -> str:
    rows = [
        (
            _fmt(p.get("iterations")),
            _percent(p.get("success_rate", 0.0)),
            _ms(p["planning_seconds_per_step"]) if p.get("planning_seconds_per_step") is not None else "-",
        )
        for p in points
    ]
    return _table(("planner iterations", "success rate", "planning time per step"), rows, ident="budgets")


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str | tuple[str, str]]],
    *,
    header_column: bool = False,
    ident: str | None = None,
) -> str:
    """An HTML table of escaped text; a cell given as (text, css_class) gets that class."""
    out = [f'<table id="{_esc(ident)}">' if ident else "<table>"]
    out.append("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in headers) + "</tr>")
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text, cls = cell if isinstance(cell, tuple) else (cell, "")
            tag = "th" if header_column and i == 0 else "td"
            cells.append(
                f'<{tag} class="{_esc(cls)}">{_esc(text)}</{tag}>' if cls else f"<{tag}>{_esc(text)}</{tag}>"
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _video(path: Path) -> str:
    path = Path(path)
    mime = MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"{path}: videos must be one of {sorted(MIME)}")
    caption = path.stem.replace("_", " ")  # "episode 0003 success"
    return (
        f'<figure><video controls muted loop preload="auto" src="{_data_uri(path, mime)}"></video>'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode('ascii')}"


def _ms(seconds: float) -> str:
    return _number(seconds, 1000, 1, " ms")


def _percent(rate: float | None) -> str:
    return _number(rate, 100, 1, " %")


def _number(value: float | None, scale: float, digits: int, unit: str) -> str:
    """value * scale with `digits` decimals and its unit; "-" for a figure that is missing (None, e.g. a
    NaN that results.json stored as null) or not finite (a null success rate raised a TypeError)."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{scale * value:.{digits}f}{unit}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)
