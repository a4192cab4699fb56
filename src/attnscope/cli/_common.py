"""Helpers shared by the command modules: the one-line error type and small argument parsers."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["CLIError", "MissingArray", "figdir", "int_list", "load_profile", "parse_heads", "slug"]


class CLIError(Exception):
    """An error in the user's input: printed as one line, exit code 2."""


def parse_heads(items: list[str] | None, what: str = "--keep-head") -> tuple[tuple[int, int], ...]:
    """``["0:3", "14:0"]`` -> ``((0, 3), (14, 0))``; ``what`` names the option in the error message."""
    out = []
    for item in items or []:
        m = re.fullmatch(r"\s*(\d+)\s*[:,]\s*(\d+)\s*", item)
        if not m:
            raise CLIError(f"{what} takes LAYER:HEAD pairs of non-negative integers (e.g. 0:3), got {item!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return tuple(out)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name if name.endswith(".gguf") else name).strip("_") or "model"


class MissingArray(KeyError):
    """A profile lacks an array a view needs (written by another version, or damaged)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Arrays(dict):
    """The arrays of a loaded profile; a missing one raises ``MissingArray`` naming the profile directory."""

    source = ""

    def __missing__(self, name):
        raise MissingArray(
            f"{self.source} has no array {name!r}: the profile is incomplete or was written by another version of "
            "attnscope; profile again"
        )


def load_profile(path: str):
    """Load a profile for a view: a missing array later gives a one-line error that names the directory."""
    from attnscope.profiler.data import load

    prof = load(path)
    if type(prof.arrays) is dict:
        arrays = _Arrays(prof.arrays)
        arrays.source = str(path)
        prof.arrays = arrays
    return prof


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
