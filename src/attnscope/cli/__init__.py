"""The ``attnscope`` command line, one module per command group; errors in the input print one line, exit code 2.

Each command declares its user errors, the exceptions it reports as that one line besides ``CLIError``
(``set_defaults(func=..., user_errors=...)``, from ``_common``); any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, interpret, profile, run, suite, verify, views
from ._common import CLIError, CommandParser, os_error

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="attnscope",
        description="Attention profiler for Hugging Face causal LMs: per-layer, per-head statistics "
        "without materialising attention matrices.",
    )
    sub = ap.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for group in (profile, views, run, verify, interpret, bench, suite):
        group.register(sub)
    undeclared = [name for name, p in sub.choices.items() if p.get_default("user_errors") is None]
    if undeclared:
        raise RuntimeError(f"commands that declare no user_errors: {', '.join(undeclared)}")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader of our output went away (``attnscope sql ... | head``): not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except (CLIError, *args.user_errors) as e:
        print(f"attnscope: error: {os_error(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnscope: interrupted; nothing was written", file=sys.stderr)
        return 130
