"""The ``attnscope`` command line, one module per command group; errors in the input print one line, exit code 2."""

from __future__ import annotations

import argparse
import sys

from . import bench, interpret, profile, run, verify, views
from ._common import CLIError, os_error

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="attnscope",
        description="Attention profiler for Hugging Face causal LMs: per-layer, per-head statistics "
        "without materialising attention matrices.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    profile.register(sub)
    views.register(sub)
    run.register(sub)
    verify.register(sub)
    interpret.register(sub)
    bench.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from attnscope.profiler.data import ProfileError

    expected: tuple[type[BaseException], ...] = (CLIError, ProfileError)
    if args.command in ("profile", "rules"):
        from attnscope.profiler.corpus import CorpusError
        from attnscope.profiler.hooks import UnsupportedModelError
        from attnscope.profiler.models import ModelLoadError
        from attnscope.profiler.run import PromptError

        expected += (UnsupportedModelError, ModelLoadError, PromptError, CorpusError, ValueError, OSError)
    elif args.command in ("merge", "sql"):
        expected += (ValueError, OSError)
    else:
        expected += (ValueError, IndexError, ImportError, OSError)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader of our output went away (``attnscope sql ... | head``): not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except expected as e:
        print(f"attnscope: error: {os_error(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnscope: interrupted; nothing was written", file=sys.stderr)
        return 130
