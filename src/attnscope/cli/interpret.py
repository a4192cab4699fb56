"""The interpretation commands: ``heads`` (head roles), ``lens`` (the logit-lens figure), ``rules`` (FFN memories)."""

from __future__ import annotations

from pathlib import Path

from ._common import USER_ERRORS, VIEW_ERRORS, CLIError, figdir, load_profile, model_command, view_command, writable

__all__ = ["register"]


@view_command
def cmd_heads(args) -> int:
    import numpy as np

    from attnscope.render.export import write_table
    from attnscope.render.roles import head_roles, plot_head_roles, role_summary
    from attnscope.render.views import save

    if args.top < 1:
        raise CLIError(f"--top must be >= 1, got {args.top}")
    prof = load_profile(args.profile)
    out = figdir(args, "the head-role table and figure")
    r = head_roles(prof)
    Ly, H = prof.n_layers, prof.n_heads
    table = {"layer": np.repeat(np.arange(Ly), H), "head": np.tile(np.arange(H), Ly)}
    table.update({name: np.asarray(v).reshape(-1) for name, v in r.items()})
    out.mkdir(parents=True, exist_ok=True)
    print(write_table(table, out / "head_roles", "parquet" if args.parquet else "csv"))
    print(save(plot_head_roles(prof), out / f"head_roles.{args.format}"))
    for line in role_summary(r, args.top):
        print(line)
    return 0


@view_command
def cmd_lens(args) -> int:
    from attnscope.render.lens import has_lens, plot_logit_lens_of
    from attnscope.render.views import save

    prof = load_profile(args.profile)
    if not has_lens(prof):
        raise CLIError(f"{args.profile} has no logit lens: profile again with --logit-lens")
    lo = hi = None
    if args.tokens:
        a, _, b = args.tokens.partition(":")
        try:
            lo, hi = int(a) if a else 0, int(b) if b else None
        except ValueError:
            raise CLIError(f"--tokens takes START:END positions, got {args.tokens!r}") from None
    out = figdir(args)
    fig = plot_logit_lens_of(prof, args.prompt, lo, hi)
    print(save(fig, out / f"logit_lens_p{args.prompt}.{args.format}"))
    return 0


@model_command
def cmd_rules(args) -> int:
    import json

    import numpy as np

    from attnscope.kernels.stats import CTX_VALUE, EXPERT_CTX_VALUE
    from attnscope.profiler.engine import config_digest, weights_digest
    from attnscope.profiler.memories import promoted_tokens
    from attnscope.profiler.models import DEFAULT_MODEL, cache_dir, load_model
    from attnscope.render.export import write_table
    from attnscope.render.memories import neuron_rules, rules_table

    for name, v in (("--top-neurons", args.top_neurons), ("--promoted", args.promoted), ("--window", args.window)):
        if v < 1:
            raise CLIError(f"{name} must be >= 1, got {v}")
    prof = load_profile(args.profile)
    if CTX_VALUE.key not in prof.arrays and EXPERT_CTX_VALUE.key not in prof.arrays:
        raise CLIError(f"{args.profile} kept no neuron contexts: profile again with --neuron-contexts K (K > 0)")
    out = writable(Path(args.out) if args.out else Path(args.profile), "rules.json and rules.parquet", bool(args.out))
    model_id = args.model or prof.meta.get("model_id")
    model, tok, _ = load_model(
        None if model_id == DEFAULT_MODEL else model_id, device=args.device, dtype=prof.meta.get("model_dtype", "auto")
    )
    if (config_digest(model), weights_digest(model)) != (
        prof.meta.get("config_digest"),
        prof.meta.get("weights_digest"),
    ):
        raise CLIError(f"{model_id} is not the model of {args.profile} (its config or weights differ); pass --model")
    cache = cache_dir() / "promoted" / f"{prof.meta['weights_digest']}-k{args.promoted}-v2.safetensors"
    promoted = promoted_tokens(model, k=args.promoted, cache=cache)
    ids = np.unique(np.concatenate([v[v >= 0] for f, v in promoted.items() if f.endswith("token")]))  # -1: none
    vocab = dict(zip(ids.tolist(), tok.batch_decode([[int(i)] for i in ids])))
    rules = neuron_rules(prof, promoted, vocab, top_neurons=args.top_neurons, window=args.window)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rules.json", "w", encoding="utf-8") as f:
        json.dump(rules, f, ensure_ascii=False, indent=1)
    print(out / "rules.json")
    table = {c: np.array(v, dtype=object) for c, v in rules_table(rules).items()}
    try:
        print(write_table(table, out / "rules", "parquet"))
    except ImportError:
        print(write_table(table, out / "rules", "csv"))
    print(f"attnscope: {len(rules)} rules ({args.top_neurons} neurons a layer) from {len(prof.prompts)} prompts")
    return 0


def register(sub) -> None:
    v = sub.add_parser(
        "heads",
        help="the head-role table (sink, previous-token, induction, duplicate, self, local, broad) and its map",
        description="Score every head by role from a saved profile alone, write the table (CSV or Parquet) and a "
        "layers x heads figure, and print the highest-scoring heads of each role. Scores are means over all "
        "query tokens; the thresholds are in attnscope.render.roles.",
    )
    v.add_argument("profile", help="a profile directory written by `attnscope profile`")
    v.add_argument(
        "--out", metavar="DIR", help="where to write head_roles.csv and head_roles.png (default: PROFILE/figures)"
    )
    v.add_argument("--top", type=int, default=3, help="heads listed per role (default: 3)")
    v.add_argument("--parquet", action="store_true", help="write the table as Parquet (needs pyarrow) instead of CSV")
    v.add_argument("--format", default="png", choices=["png", "pdf"], help="image format (default: png)")
    v.set_defaults(func=cmd_heads, user_errors=VIEW_ERRORS)
    v = sub.add_parser(
        "lens",
        help="the logit-lens figure of one prompt (needs a profile made with --logit-lens)",
        description="Layers x tokens, each cell coloured by the probability that layer gives to the model's final "
        "prediction, with the layer's own top-1 next token written in it. Draws from a saved profile alone.",
    )
    v.add_argument("profile", help="a profile directory written by `attnscope profile --logit-lens`")
    v.add_argument("--prompt", type=int, default=0, help="which prompt (default: 0)")
    v.add_argument("--tokens", metavar="START:END", help="token positions to show (default: the last 48)")
    v.add_argument("--out", metavar="DIR", help="figure directory (default: PROFILE/figures)")
    v.add_argument("--format", default="png", choices=["png", "pdf"], help="image format (default: png)")
    v.set_defaults(func=cmd_lens, user_errors=VIEW_ERRORS)
    v = sub.add_parser(
        "rules",
        help="FFN key-value memories: each neuron's trigger contexts and the tokens it promotes, as rules.json",
        description="For the most strongly firing MLP neurons of each layer (a dense layer's, or on a "
        "mixture-of-experts layer every routed expert's, with their contexts among the tokens routed to it), write "
        "rules.json (trigger context, neuron, expert, promoted tokens with the logit they gain) and rules.parquet "
        "(the `rules` SQL view). Loads the "
        "run's model once to project each neuron's output vector through the unembedding (cached).",
    )
    v.add_argument("profile", help="a profile or run directory (with neuron contexts, the default)")
    v.add_argument("--model", help="the model, when the run's model id does not load it (same weights)")
    v.add_argument(
        "--top-neurons",
        type=int,
        default=20,
        help="neurons per layer (and per MoE layer over all its experts), by largest activation (default: 20)",
    )
    v.add_argument("--promoted", type=int, default=10, help="promoted tokens per neuron (default: 10)")
    v.add_argument("--window", type=int, default=8, help="tokens of context shown up to the trigger (default: 8)")
    v.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    v.add_argument("--out", metavar="DIR", help="where to write rules.json and rules.parquet (default: PROFILE)")
    v.set_defaults(func=cmd_rules, user_errors=USER_ERRORS)  # and a model that cannot be loaded
