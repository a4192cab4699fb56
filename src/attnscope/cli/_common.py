"""Helpers shared by the command modules: the one-line error type and small argument parsers."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["CLIError", "figdir", "int_list", "load_profile", "parse_heads", "slug"]


class CLIError(Exception):
    """An error in the user's input: printed as one line, exit code 2."""


def parse_heads(items: list[str] | None) -> tuple[tuple[int, int], ...]:
    out = []
    for item in items or []:
        m = re.fullmatch(r"\s*(\d+)\s*[:,]\s*(\d+)\s*", item)
        if not m:
            raise CLIError(f"--keep-head takes LAYER:HEAD (e.g. 0:3), got {item!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return tuple(out)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name if name.endswith(".gguf") else name).strip("_") or "model"


def load_profile(path: str):
    from attnscope.profiler.data import load

    return load(path)


def figdir(args) -> Path:
    return Path(args.out) if getattr(args, "out", None) else Path(args.profile) / "figures"


def int_list(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{what} takes comma-separated integers, got {text!r}") from None
    if not out:
        raise CLIError(f"{what} is empty")
    return out
