"""`wm-<app> --help`: each top-level option with its value and the one-line comment beside it in the
app's YAML file (configs/<app>.yaml), which stays the one place where options are explained.

Every app's YAML sets `hydra.help.template: ${wm_help:}`, a resolver registered here that renders the
composed config (so `--help` shows the values after the other overrides on the command line).
"""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

WIDTH = 30  # column of the explanations
_KEY = re.compile(r"^( *)([A-Za-z_][\w-]*):(.*)$")  # a key, its indentation and the rest of the line
_GROUP = re.compile(r"^\s+-\s+([\w-]+):\s*[^#\s]+\s*#\s?(.*)$")  # `  - planner: cem   # comment` in defaults
_COMMENT = re.compile(r"(?:^|\s)#\s?(.*)$")


def config_file(config_name: str) -> Path:
    return Path(importlib.import_module("configs").__file__).parent / f"{config_name}.yaml"  # type: ignore[arg-type]


@functools.cache
def _parse(config_name: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """(the file's leading comment lines, option -> the comment on its line): top-level options by name,
    nested ones by their dotted path (`trainer.steps`), config groups of the defaults list by name."""
    try:
        lines = config_file(config_name).read_text().splitlines()
    except OSError:
        return (), {}
    header: list[str] = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line[1:].removeprefix(" "))
    comments: dict[str, str] = {}
    parents: list[tuple[int, str]] = []  # (indentation, key) of the keys the current line is inside
    last: tuple[str, int] | None = None  # the option whose comment a comment-only line below continues
    for line in lines:
        key, group = _KEY.match(line), _GROUP.match(line)
        more = re.match(r"^( +)#\s?(.*)$", line)
        if key:
            indent = len(key.group(1))
            parents = [(i, k) for i, k in parents if i < indent]
            path = ".".join([*(k for _, k in parents), key.group(2)])
            parents.append((indent, key.group(2)))
            comment = _COMMENT.search(key.group(3))
            last = None
            if comment and parents[0][1] not in ("defaults", "hydra"):
                comments[path] = comment.group(1).strip()
                last = (path, len(line) - len(comment.group(0).lstrip()))  # (its `#` column)
        elif group:
            comments[group.group(1)] = group.group(2).strip()
            last = None
        elif more and last is not None and len(more.group(1)) == last[1]:  # under it, at its `#`: the
            comments[last[0]] += " " + more.group(2).strip()  # same comment, continued (the other values)
        else:
            last = None
    return tuple(header), comments


def _sweep_example(values: dict) -> str:
    """A sweep the app takes (`-m seed=0,1` was refused by the apps without a seed)."""
    return "-m seed=0,1" if "seed" in values else "-m OPTION=A,B"


def option_comments(config_name: str) -> dict[str, str]:
    """Option -> its one-line explanation in configs/<config_name>.yaml (nested options by dotted path)."""
    return dict(_parse(config_name)[1])


def render(root: DictConfig) -> str:
    """The help text of the app whose composed config (with its `hydra` node) is `root`: every option
    with its value, the options of a nested block or a chosen config group one per line below it."""
    name = str(root.hydra.job.config_name)
    header, comments = _parse(name)
    choices = OmegaConf.to_container(root.hydra.runtime.choices)
    values = OmegaConf.to_container(root, resolve=False)
    assert isinstance(values, dict) and isinstance(choices, dict)
    lines = [*header, "", "Options (option=value  what it does; ??? marks a required value):"]
    for key, value in values.items():
        if key == "hydra":
            continue
        if key in choices:  # a config group: its choice, then the options of the chosen file
            lines.append(_row(f"{key}={choices[key]}", comments.get(key, "")))
            own = _parse(f"{key}/{choices[key]}")[1]
            leaves = _leaves(value) if isinstance(value, dict) else []
            lines += [
                _row(f"{key}.{k}={_show(v)}", own.get(k, ""), 4)
                for k, v in leaves
                if k not in ("name", "type")
            ]
        elif isinstance(value, dict) and value:  # a block of options
            lines.append(_row(f"{key}:", comments.get(key, "")))
            lines += [
                _row(f"{key}.{k}={_show(v)}", comments.get(f"{key}.{k}", ""), 4) for k, v in _leaves(value)
            ]
        else:
            lines.append(_row(f"{key}={_show(value)}", comments.get(key, "")))
    lines += [
        "",
        "Sweeps: -m (--multirun) runs one job per combination of comma-separated values, e.g. "
        f"{_sweep_example(values)};",
        "  each job writes in its own folder, and the exit status is nonzero when any job failed.",
        "--cfg job prints the composed config; --hydra-help shows Hydra's own flags and options.",
        "A mistake is one line `error: ...` with exit status 2; WM_TRACEBACK=1 also prints its traceback.",
    ]
    return "\n".join(lines).replace("$", "$$") + "\n"  # Hydra passes the text through string.Template


def _row(shown: str, why: str, indent: int = 2) -> str:
    pad = " " * indent
    if len(shown) + indent <= WIDTH:
        return f"{pad}{shown:<{WIDTH - indent}}  {why}".rstrip()
    return f"{pad}{shown}  {why}".rstrip()


def _leaves(block: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every option in a nested block; an empty mapping is one option."""
    out: list[tuple[str, Any]] = []
    for k, v in block.items():
        if isinstance(v, dict) and v:
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _show(value: Any, limit: int = 70) -> str:
    text = _flow(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _flow(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return str(value)


OmegaConf.register_new_resolver("wm_help", lambda _root_: render(_root_), replace=True)
