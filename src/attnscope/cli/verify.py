"""``attnscope verify`` (check every file of a run against its checksums) and ``attnscope repair``."""

from __future__ import annotations

from ._common import VIEW_ERRORS, CLIError

__all__ = ["cmd_repair", "cmd_verify", "register"]


def cmd_verify(args) -> int:
    from attnscope.profiler.store import is_run, verify_run

    if not is_run(args.run):
        raise CLIError(f"{args.run} is not a run directory (no run.json of attnscope)")
    doc, bad, stray = verify_run(args.run)
    for d in bad:
        print(f"damaged: {d.rel} ({'accumulators' if d.shard is None else 'shard ' + d.shard}): {d.problem}")
    for rel in stray:
        print(f"leftover: {rel} (no committed shard names it; the next writer or `attnscope repair` deletes it)")
    n_files = sum(len(s["files"]) for s in doc["shards"]) + bool(doc.get("accum"))
    if bad:
        shards = sorted({d.shard for d in bad if d.shard is not None})
        vectors_only = all(d.rel.startswith("vectors/") for d in bad)
        hint = (
            f"`attnscope repair {args.run} --drop-bad-shards` drops the vectors tier and keeps the rest exact"
            if vectors_only
            else "a damaged table or accumulator file cannot be dropped consistently: profile the corpus again"
        )
        raise CLIError(
            f"{args.run}: {len(bad)} of {n_files} files damaged (shards: {', '.join(shards) or 'none'}"
            f"{', accumulators' if any(d.shard is None for d in bad) else ''}); {hint}"
        )
    print(
        f"attnscope: {args.run} is intact: {n_files} files, {len(doc['shards'])} shards, {doc['n_prompts']} prompts, "
        f"{doc['n_tokens']} tokens ({doc.get('status')}); "
        + (
            "every file matches its checksum"
            if doc["schema_version"] >= 2
            else "every file is readable, but this run of schema 1 records no checksums to compare them with "
            "(`attnscope repair` records the files' checksums as they are now)"
        )
    )
    return 0


def cmd_repair(args) -> int:
    from attnscope.profiler.store import is_run, repair_run

    if not is_run(args.run):
        raise CLIError(f"{args.run} is not a run directory (no run.json of attnscope)")
    for line in repair_run(args.run, drop_bad_shards=args.drop_bad_shards):
        print(f"attnscope: {line}")
    return cmd_verify(args)


def register(sub) -> None:
    v = sub.add_parser(
        "verify",
        help="check every file of a run against the sizes and checksums in its run.json",
        description="Hash every committed file of a run afresh and compare it with run.json (size, sha256), read "
        "each table's row count, and list the damaged files by shard and the leftovers of a killed writer. Exit "
        "code 0 when the run is intact, 2 when anything is damaged.",
    )
    v.add_argument("run", metavar="RUN", help="a run directory")
    v.set_defaults(func=cmd_verify, user_errors=VIEW_ERRORS)
    r = sub.add_parser(
        "repair",
        help="delete a killed writer's leftovers; with --drop-bad-shards, drop damaged vectors files",
        description="Delete what a killed writer left in a run (as the next writer would), then verify it. "
        "--drop-bad-shards drops damaged vectors files by dropping the run's vectors tier (per-token vectors, "
        "thumbnails, kept matrices), which leaves every table and accumulator exact. A damaged table or "
        "accumulator file cannot be dropped consistently (the accumulators are sums and maxima over every "
        "prompt and cannot be taken apart by shard): repair says so and changes nothing.",
    )
    r.add_argument("run", metavar="RUN", help="a run directory")
    r.add_argument("--drop-bad-shards", action="store_true", help="drop damaged vectors files (the vectors tier)")
    r.set_defaults(func=cmd_repair, user_errors=VIEW_ERRORS)
