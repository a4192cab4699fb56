"""``attnscope bench``: plain forward vs profile (and eager output_attentions), time and peak memory per length."""

from __future__ import annotations

from pathlib import Path

from ._common import DTYPES, VIEW_ERRORS, CLIError, config_option, int_list, slug


def cmd_bench(args) -> int:
    from attnscope.profiler.bench import BenchConfig, run_bench, write_bench
    from attnscope.profiler.models import DEFAULT_MODEL

    lengths = int_list(args.lengths, "--lengths")
    if min(lengths) < 2:
        raise CLIError(f"--lengths must be >= 2 tokens, got {args.lengths}")
    cfg = BenchConfig(
        model=args.model,
        lengths=lengths,
        device=args.device,
        dtype=args.dtype,
        repeats=args.repeats,
        eager=not args.no_eager,
        threads=args.threads,
    )
    out = Path(args.out or Path("bench") / slug(args.model or DEFAULT_MODEL))
    try:
        result = run_bench(cfg)
    except RuntimeError as e:
        raise CLIError(str(e)) from None
    js, png = write_bench(result, out)
    for row in result["runs"]:
        if "time_ratio_profile_over_forward" in row:
            print(
                f"{row['tokens']} tokens: profile / forward = {row['time_ratio_profile_over_forward']:.2f}x time, "
                f"{row['memory_ratio_profile_over_forward']:.2f}x peak memory"
            )
    print(f"attnscope: wrote {js} and {png}")
    return 0


def register(sub) -> None:
    from attnscope.profiler.bench import BenchConfig  # imports no torch

    p = sub.add_parser(
        "bench",
        help="time and peak memory of a plain forward, a profile and eager output_attentions",
        description="Benchmark MODEL on this machine: a plain SDPA forward against attnscope.profile (and eager "
        "output_attentions where it is predicted to fit) at each length; one burn-in, then the median of "
        "--repeats runs; peak memory is the peak RSS of a fresh process per measurement (CPU) or "
        "torch.cuda.max_memory_allocated (CUDA). Writes bench.json (with the machine) and bench.png.",
    )
    p.add_argument("model", nargs="?", default=None, help="as for 'attnscope profile' (default: SmolLM2-135M-Instruct)")
    lengths = ",".join(map(str, BenchConfig().lengths))  # given as one string, parsed by int_list
    config_option(p, BenchConfig, "lengths", type=str, default=lengths)
    config_option(p, BenchConfig, "device")
    config_option(p, BenchConfig, "dtype", choices=DTYPES)
    config_option(p, BenchConfig, "repeats")
    config_option(p, BenchConfig, "threads", metavar="N")
    p.add_argument("--no-eager", action="store_true", help="skip eager output_attentions")  # BenchConfig.eager
    p.add_argument("--out", metavar="DIR", help="output directory (default: bench/<model>)")
    p.set_defaults(func=cmd_bench, user_errors=VIEW_ERRORS)
