"""The views: ``render``, ``heatmap``, ``patterns``, ``grid``, ``downproj``, ``compare``, ``export``, ``report``.

Every view reads a saved profile alone (no model, no GPU).
"""

from __future__ import annotations

from pathlib import Path

from ._common import VIEW_ERRORS, CLIError, figdir, int_list, load_profile, parse_heads, slug, view_command, writable

__all__ = ["register"]


def _mark_top(args) -> int:
    if args.mark_top < 0:
        raise CLIError(f"--mark-top takes a number of tokens, 0 for none; got {args.mark_top}")
    return args.mark_top


@view_command
def cmd_render(args) -> int:
    from attnscope.render.laminar import LaminarRenderer

    prof = load_profile(args.profile)
    out = figdir(args)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    renderer = LaminarRenderer(
        kinds=kinds, points=args.points, per_head=args.per_head, fmt=args.format, scale=args.scale
    )
    for path in renderer.render(prof, out):
        print(path)
    if args.plotly:
        from attnscope.render.interactive import laminar_figure, write_standalone

        for kind in kinds:
            fig = laminar_figure(prof, kind, args.points, scale=args.scale)
            print(write_standalone(fig, out / f"laminar_{kind}.html"))
    return 0


@view_command
def cmd_heatmap(args) -> int:
    from attnscope.render.views import plot_heatmaps, save

    prof = load_profile(args.profile)
    out = figdir(args)
    pairs = list(parse_heads(args.heads.split(","), "--heads"))
    fig = plot_heatmaps(prof, pairs, prompt=args.prompt, mark_top=_mark_top(args), scale=args.scale)
    print(save(fig, out / f"heatmaps_p{args.prompt}.{args.format}"))
    return 0


@view_command
def cmd_patterns(args) -> int:
    from attnscope.render.views import plot_patterns, save

    prof = load_profile(args.profile)
    out = figdir(args)
    pairs = list(parse_heads(args.heads.split(","), "--heads"))
    fig = plot_patterns(prof, pairs, prompt=args.prompt, mode=args.mode, token=args.token, scale=args.scale)
    print(save(fig, out / f"patterns_{args.mode}_p{args.prompt}.{args.format}"))
    return 0


@view_command
def cmd_grid(args) -> int:
    from attnscope.render.views import plot_layer_grid, save

    prof = load_profile(args.profile)
    out = figdir(args)
    layers = list(range(prof.n_layers)) if args.layers is None else int_list(args.layers, "--layers", unique=True)
    head = None if args.head in (None, "mean") else int_list(args.head, "--head")
    if head is not None and len(head) > 1:
        raise CLIError(f"--head takes one head or 'mean', got {args.head!r}")
    head = None if head is None else head[0]
    fig = plot_layer_grid(prof, layers, head=head, prompt=args.prompt, mark_top=_mark_top(args), scale=args.scale)
    who = "mean" if head is None else f"h{head}"
    print(save(fig, out / f"layer_grid_{who}_p{args.prompt}.{args.format}"))
    return 0


@view_command
def cmd_downproj(args) -> int:
    from attnscope.render.views import plot_down_proj, save

    prof = load_profile(args.profile)
    out = figdir(args)
    print(
        save(
            plot_down_proj(prof, prompt=args.prompt, mark_top=_mark_top(args), scale=args.scale),
            out / f"down_proj_p{args.prompt}.{args.format}",
        )
    )
    from attnscope.render.interactive import down_proj_scatter, write_standalone

    print(write_standalone(down_proj_scatter(prof, prompt=args.prompt), out / f"down_proj_3d_p{args.prompt}.html"))
    return 0


@view_command
def cmd_compare(args) -> int:
    from attnscope.render.views import plot_compare, save

    a, b = load_profile(args.profile), load_profile(args.other)
    names = tuple(args.names.split(",", 1)) if args.names else (Path(args.profile).name, Path(args.other).name)
    if len(names) != 2:
        raise CLIError("--names takes two comma-separated names, e.g. critical,neutral")
    out = Path(args.out) if args.out else Path(args.profile) / "figures" / f"compare_{slug(names[1])}.{args.format}"
    writable(out, "the figure", bool(args.out), "--out FILE", file=True)
    print(save(plot_compare(a, b, names), out))
    return 0


@view_command
def cmd_export(args) -> int:
    from attnscope.render.export import export_tables

    prof = load_profile(args.profile)
    out = writable(Path(args.out) if args.out else Path(args.profile) / "tables", "the tables", bool(args.out))
    for path in export_tables(prof, out, "parquet" if args.parquet else "csv"):
        print(path)
    return 0


@view_command
def cmd_report(args) -> int:
    from attnscope.render.report import write_report

    prof = load_profile(args.profile)
    other = load_profile(args.compare) if args.compare else None
    names = (Path(args.profile).name, Path(args.compare).name) if args.compare else ("A", "B")
    if args.out:
        out = Path(args.out)
    elif args.compare:  # its own file: the plain report.html stays
        out = Path(args.profile) / f"report_vs_{slug(Path(args.compare).resolve().name)}.html"
    else:
        out = Path(args.profile) / "report.html"
    writable(out, "the report", bool(args.out), "--out FILE", file=True)
    print(write_report(prof, out, compare=other, names=names, prompt=args.prompt))
    return 0


def register(sub) -> None:
    r = sub.add_parser(
        "render",
        help="draw laminar heatmaps from a saved profile",
        description="Draw laminar profiles (X layer, Y weight, colour KDE density) from a saved profile alone.",
    )
    r.add_argument("profile", help="a profile directory written by `attnscope profile`")
    r.add_argument("--out", metavar="DIR", help="where to write the figures (default: PROFILE/figures)")
    r.add_argument(
        "--kinds",
        default="self,final,all,log",
        help="comma-separated: self (p(i,i)), final (last token's row), all (every causal pair), log (log10 p of "
        "every pair, from the log histogram) (default: all four)",
    )
    r.add_argument(
        "--scale",
        default="log",
        choices=["log", "layer", "linear"],
        help="colour: log (default), layer (each layer normalised to its maximum) or linear",
    )
    r.add_argument("--per-head", action="store_true", help="also one panel per head for each kind")
    r.add_argument("--points", type=int, default=300, help="KDE grid points on [0, 1] (default: 300)")
    r.add_argument("--format", default="png", choices=["png", "pdf"], help="image format (default: png)")
    r.add_argument("--plotly", action="store_true", help="also write interactive laminar_<kind>.html (needs plotly)")
    r.set_defaults(func=cmd_render, user_errors=VIEW_ERRORS)

    def view(name, help_, func, out_help="figure directory (default: PROFILE/figures)"):
        v = sub.add_parser(name, help=help_, description=help_ + ". Draws from a saved profile alone.")
        v.add_argument("profile", help="a profile directory written by `attnscope profile`")
        v.add_argument("--out", metavar="PATH", help=out_help)
        v.set_defaults(func=func, user_errors=VIEW_ERRORS)
        return v

    def per_prompt(v, fmt=True, marks=True, scale="colour"):
        v.add_argument("--prompt", type=int, default=0, help="which prompt of the profile (default: 0)")
        v.add_argument(
            "--scale", default="log", choices=["log", "linear"], help=f"{scale} scale: log (default) or linear"
        )
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
    per_prompt(v, marks=False, scale="y axis")
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
    v.set_defaults(func=cmd_compare, user_errors=VIEW_ERRORS)
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
        out_help="output file (default: PROFILE/report.html; with --compare, PROFILE/report_vs_OTHER.html)",
    )
    v.add_argument("--compare", metavar="OTHER", help="another profile of the same model to compare with")
    v.add_argument("--prompt", type=int, default=0, help="prompt for the per-prompt views (default: 0)")
