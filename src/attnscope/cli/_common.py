"""Helpers shared by the command modules: the one-line error type and the user errors of each kind of command,
the parser that builds options from a dataclass's fields, the view runner, and small argument parsers."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
import types
import typing
import warnings
from pathlib import Path

__all__ = [
    "DTYPES",
    "USER_ERRORS",
    "VIEW_ERRORS",
    "CLIError",
    "CommandParser",
    "MissingArray",
    "config_option",
    "figdir",
    "int_list",
    "load_profile",
    "model_command",
    "os_error",
    "parse_heads",
    "slug",
    "view_command",
    "writable",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype of the commands that load a model


class CLIError(Exception):
    """An error in the user's input: printed as one line, exit code 2."""


# The user errors a command declares (``set_defaults(func=..., user_errors=...)``) besides CLIError: printed as one
# line, exit code 2; any other exception is a bug and shows its traceback. ValueError covers the library's own
# errors (ProfileError, RunError, CorpusError, PromptError, UnsupportedModelError), OSError the filesystem's.
USER_ERRORS = (ValueError, OSError)
VIEW_ERRORS = (*USER_ERRORS, IndexError, ImportError)  # a view's: also a prompt or head out of range, a missing extra


def model_command(func):
    """Run a command that loads a model: a model that cannot be loaded (``ModelLoadError``) is the user's error."""

    @functools.wraps(func)
    def run(args) -> int:
        from attnscope.profiler.models import ModelLoadError

        try:
            return func(args)
        except ModelLoadError as e:
            raise CLIError(str(e)) from None

    return run


class CommandParser(argparse.ArgumentParser):
    """A command's parser. ``options``: a function that adds the arguments on first use (a parse, a usage or a
    help), for a command whose options are read from a dataclass in a module that imports torch, so that the
    commands that never load torch (the views, sql) do not pay for it."""

    def __init__(self, *args, options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._options = options

    def _add_options(self) -> None:
        if self._options is not None:
            add, self._options = self._options, None
            add(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_options()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._add_options()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_options()
        return super().format_help()


def config_option(p: argparse.ArgumentParser, cls, name: str, **kw) -> argparse.Action:
    """Add ``--<name>`` (underscores as dashes) for field ``name`` of dataclass ``cls``: the default, the type (a
    bool of default False is a flag) and the help (``metadata["help"]``) come from the field, and the help gets
    "(default: X)" unless the field's default is None (its help says what None means) or it is a flag.

    ``kw``: what the option's form adds (``metavar``, ``choices``) or changes from the field's: ``help`` for a
    field that has none, ``type`` with ``default`` for a value given in another form (``--lengths 2048,8192``).
    """
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = kw.pop("default", f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
    kind = typing.get_type_hints(cls)[name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:  # X | None
        (kind,) = (a for a in typing.get_args(kind) if a is not type(None))
    text = kw.pop("help", None) or f.metadata["help"]
    text = text.replace("%", "%%")  # argparse formats the help with %
    if kind is bool and "type" not in kw:
        if default is not False:
            raise ValueError(f"{cls.__name__}.{name} defaults to {default!r}: give its option its own form")
        kw["action"] = "store_true"
    else:
        kw.setdefault("type", kind)
        if default is not None:
            text += " (default: %(default)s)"
    return p.add_argument("--" + name.replace("_", "-"), dest=name, default=default, help=text, **kw)


def ray_option(p: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``: profile on a Ray cluster (``profiler.distributed``)."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="profile on a Ray cluster (pip install 'attnscope[distributed]'): one actor per GPU (CPU actors "
        "without GPUs); no ADDRESS starts a local cluster",
    )


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


def view_command(func):
    """Run a command that loads a profile and renders a view: each distinct warning printed once as one line (no
    source line); a missing array, or a file that cannot be written past the checks up front, one error."""

    @functools.wraps(func)
    def run(args) -> int:
        seen: set[str] = set()

        def show(message, category, filename, lineno, file=None, line=None):
            text = " ".join(str(message).split())
            if text not in seen:
                seen.add(text)
                print(f"attnscope: warning: {text}", file=sys.stderr)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            try:
                return func(args)
            except MissingArray as e:
                raise CLIError(str(e)) from None
            except KeyError as e:  # a profile object whose arrays are not the plain mapping load_profile wraps
                raise CLIError(
                    f"the profile has no array {e.args[0]!r}: it is incomplete or was written by another version "
                    "of attnscope; profile again"
                ) from None
            except OSError as e:  # past the checks up front (e.g. the disk filled while writing): name the file
                raise CLIError(os_error(e)) from None

    return run


def _neither(path: Path) -> str | None:
    """What is wrong with a directory that holds neither a run (``run.json``) nor a whole profile, else None."""
    from attnscope.profiler.data import ARRAYS_FILE, META_FILE
    from attnscope.profiler.store import PARTS, RUN_FILE

    if not path.is_dir() or (path / RUN_FILE).is_file():
        return None
    has_meta, has_arrays = (path / META_FILE).is_file(), (path / ARRAYS_FILE).is_file()
    if has_meta and has_arrays:
        return None
    if has_meta or has_arrays:
        there, gone = (META_FILE, ARRAYS_FILE) if has_meta else (ARRAYS_FILE, META_FILE)
        return f"{path} is an incomplete profile: it has {there} but no {gone}; profile again"
    inside = sorted(f for f in path.iterdir() if not f.name.startswith("."))
    held = [f.name for f in inside if f.is_dir() and ((f / RUN_FILE).is_file() or (f / META_FILE).is_file())]
    if held:
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        return f"{path} is not a profile directory but holds runs ({', '.join(held[:3])}{more}): give one of them"
    parts = [f"{f.name}/" for f in inside if f.is_dir() and f.name in PARTS]
    if parts:
        return (
            f"{path} is not a profile directory: it has a run's folders ({', '.join(parts)}) but no {RUN_FILE} (the "
            f"run never committed a shard, or its {RUN_FILE} was removed), so none of it can be read; profile again "
            "into a new --out"
        )
    if not inside:
        return f"{path} is not a profile directory: it is empty"
    return (
        f"{path} is not a profile directory: it holds no {RUN_FILE} (a run) and no {META_FILE} with {ARRAYS_FILE} "
        "(a profile)"
    )


def load_profile(path: str):
    """Load a profile for a view: a missing array later gives a one-line error that names the directory."""
    from attnscope.profiler.data import ProfileError
    from attnscope.profiler.store import load

    problem = _neither(Path(path))
    if problem:
        raise ProfileError(problem)
    prof = load(path)
    if type(prof.arrays) is dict:
        arrays = _Arrays(prof.arrays)
        arrays.source = str(path)
        prof.arrays = arrays
    return prof


def figdir(args, what: str = "the figures") -> Path:
    """``--out`` or ``PROFILE/figures``, checked writable (a read-only run: one line that says ``--out DIR``)."""
    chosen = bool(getattr(args, "out", None))
    return writable(Path(args.out) if chosen else Path(args.profile) / "figures", what, chosen)


def int_list(text: str, what: str, unique: bool = False, kind: type = int) -> list:
    """``"0,1,9"`` -> ``[0, 1, 9]`` (``kind=float``: numbers); empty is an error, and with ``unique`` so is a number
    given twice."""
    name = "integers" if kind is int else "numbers"
    try:
        out = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{what} takes comma-separated {name}, got {text!r}") from None
    if not out:
        raise CLIError(f"{what} is empty: give comma-separated {name}")
    if unique:
        twice = sorted({x for x in out if out.count(x) > 1})
        if twice:
            raise CLIError(f"{what} names {', '.join(map(str, twice))} more than once: give each once")
    return out


def writable(path: str | Path, what: str, chosen: bool = False, option: str = "--out DIR", file: bool = False) -> Path:
    """``path`` (a directory, made later if missing, or with ``file`` a file) can be written; else ``CLIError``
    naming it and what to do (``option`` to write elsewhere, or another one when the path was ``chosen`` with it).

    Creates nothing: the nearest existing folder on the way must be a writable directory (``os.access``, which
    also says no on a read-only filesystem).
    """
    path = Path(path)
    if not chosen and path.is_symlink():  # a default place inside a run: never written through a link
        raise CLIError(
            f"cannot write {what} to {path}: it is a symbolic link inside the run; {option} writes elsewhere"
        )
    probe = path.parent if file else path  # a file is written into its folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        reason = f"{probe} is a file, not a directory"
    elif not os.access(probe, os.W_OK | os.X_OK):
        reason = f"{probe} is read-only"
    else:
        return path
    hint = f"choose another {option.split()[0]}" if chosen else f"{option} writes {what} elsewhere"
    raise CLIError(f"cannot write {what} to {path}: {reason}; {hint}")


def os_error(e: OSError) -> str:
    """An ``OSError`` as one line that names its file: ``runs/x/figures/a.png: No space left on device``."""
    reason = e.strerror or str(e) or type(e).__name__
    return f"{e.filename}: {reason}" if e.filename else reason
