"""Runs as wholes: ``merge_runs`` (join runs made separately), ``verify_run`` and ``repair_run``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data import ProfileError
from .layout import (
    LOCK_FILE,
    OPTIONAL_TABLES,
    PARTS,
    RUN_FILE,
    STAGING,
    TABLES,
    RunError,
    checked_file,
    damaged,
    forget_verified,
    open_arrays,
    pyarrow_modules,
    read_accum,
    read_committed_ids,
    read_manifest,
    read_table,
    table_rows,
    write_parquet,
)
from .writer import RunWriter, check_identity


def merge_runs(
    sources: Sequence[str | os.PathLike], out: str | os.PathLike, force: bool = False
) -> tuple[Path, list[str]]:
    """Join runs of the same model and settings into a new run at ``out``: the shards of each, in order, with
    prompts and tokens renumbered, and the accumulators combined. Equal to one run of all their prompts.

    The merged run keeps the vectors tier only if every source has it (``--keep auto`` keeps it for small runs
    only, so two default runs may differ); returns ``(out, the sources whose vectors were left out)``."""
    pa, _ = pyarrow_modules()
    docs = [read_manifest(Path(s)) for s in sources]
    if not docs:
        raise RunError("merge needs at least one run")
    target = Path(out).resolve()
    for s in sources:
        src = Path(s).resolve()
        if src == target or target.is_relative_to(src) or src.is_relative_to(target):
            raise RunError(f"merge --out {out} is (or lies in, or holds) the input run {s}: choose a new --out")
    first = docs[0]
    for s, d in zip(sources[1:], docs[1:]):
        check_identity(first, d["meta"], Path(s), "merge")
    for s, d in zip(sources, docs):
        if d.get("status") != "complete":
            raise RunError(f"{s} is an unfinished run: finish it with --resume before merging")
    owner: dict[str, str] = {}  # a prompt is in a run once: the inputs must not share one
    for s, d in zip(sources, docs):
        for pid in sorted(read_committed_ids(Path(s), d)):
            if pid in owner:
                raise RunError(
                    f"prompt {pid!r} is in both {owner[pid]} and {s}: a merged run holds each prompt once "
                    "(merging a run with itself, or runs of overlapping corpora, would double it)"
                )
            owner[pid] = str(s)
    meta = dict(first["meta"])
    meta["keep_vectors"] = keep = all(d.get("keep_vectors") for d in docs)
    dropped = [str(s) for s, d in zip(sources, docs) if d.get("keep_vectors") and not keep]
    with RunWriter(out, meta, mode="force" if force else "new") as w:
        staging = w.path / STAGING
        for src, d in zip(sources, docs):
            src = Path(src)
            accum = read_accum(src, d)  # the source's whole accumulators, committed with its first shard
            for n, sh in enumerate(d["shards"]):
                name, p0 = w.next_shard
                files = []
                for rel in sh["files"]:
                    part = rel.split("/")[0]
                    if part == "vectors" and not keep:
                        continue
                    dst = staging / part / (name + rel[len(part) + 1 + len(sh["name"]) :])
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if part in TABLES + OPTIONAL_TABLES:
                        t = read_table(src, d, rel)
                        t = t.set_column(
                            t.schema.get_field_index("prompt"),
                            "prompt",
                            pa.compute.add(t.column("prompt"), pa.scalar(p0 - sh["prompt0"], pa.int64())),
                        )
                        if "token_offset" in t.column_names:  # older runs stored it; the SQL view computes it
                            t = t.drop_columns(["token_offset"])
                        write_parquet(t, dst)
                    else:
                        shutil.copyfile(checked_file(src, d, rel), dst)
                    files.append(f"{part}/{dst.name}")
                w.commit_staged(name, p0, sh["n_prompts"], sh["n_tokens"], files, accum if n == 0 else None)
    return Path(out), dropped


# -- verify and repair --
@dataclass
class Damage:
    """One damaged file of a run: its shard (None for the accumulators), its path in the run, what is wrong."""

    shard: str | None
    rel: str
    problem: str


def verify_run(path: str | os.PathLike) -> tuple[dict, list[Damage], list[str]]:
    """Check a whole run: ``run.json`` (``ProfileError`` when it cannot be trusted), then every committed file
    (no symbolic link, size and sha256 as committed, the tables readable and as long as ``run.json`` says).

    Returns ``(run.json, the damaged files, the files and folders no committed shard names)``; hashes every file
    afresh (nothing is taken from an earlier check)."""
    path = Path(path)
    doc = read_manifest(path)
    bad: list[Damage] = []
    pa, pq = pyarrow_modules()
    jobs = [(None, doc["accum"])] if doc.get("accum") else []
    jobs += [(s["name"], rel) for s in doc["shards"] for rel in s["files"]]
    for name, rel in jobs:
        try:
            forget_verified(path / rel)
            f = checked_file(path, doc, rel)
            if rel.endswith(".parquet"):
                rows, want = pq.ParquetFile(f).metadata.num_rows, table_rows(doc, rel)
                if want is not None and rows != want:
                    raise damaged(path, rel, f"has {rows} rows, {want} were committed")
            elif rel.startswith("vectors/"):
                with open_arrays(path, doc, rel) as st:
                    st.keys()
            else:
                read_accum(path, doc)
        except ProfileError as e:
            bad.append(Damage(name, rel, str(e).split(": the run's committed files")[0].removeprefix(f"{path / rel} ")))
        except (pa.ArrowException, OSError, ValueError) as e:
            bad.append(Damage(name, rel, f"cannot be read ({e})"))
    named = {rel for _, rel in jobs} | {RUN_FILE, LOCK_FILE}
    stray = []
    for f in sorted(path.iterdir()):
        if f.name in PARTS and f.is_dir() and not f.is_symlink():
            stray += [f"{f.name}/{g.name}" for g in sorted(f.iterdir()) if f"{f.name}/{g.name}" not in named]
        elif f.name not in named and f.name not in PARTS and f.name.startswith((".staging", RUN_FILE)):
            stray.append(f.name)
    return doc, bad, stray


def repair_run(path: str | os.PathLike, drop_bad_shards: bool = False) -> list[str]:
    """Make a run whole again where that keeps it consistent; returns what was done, one line each.

    Always: deletes what a killed writer left (files no committed shard names, temporary files, ``.staging/``),
    as the next writer would. With ``drop_bad_shards``: a damaged vectors file costs the run its vectors tier (the
    per-token vectors are read across every shard; the accumulators do not depend on them), and the run stays
    exact. A damaged table (index, prompts, tokens) or accumulator file cannot be dropped consistently: the
    accumulators (histograms, moments, maxima, top-k contexts) are sums and maxima over every committed prompt and
    cannot be taken apart by shard, so ``RunError`` says so and what to do instead.
    """
    path = Path(path)
    doc, bad, _ = verify_run(path)
    hard = [d for d in bad if not d.rel.startswith("vectors/")]
    if drop_bad_shards and hard:
        names = ", ".join(sorted({d.rel for d in hard}))
        raise RunError(
            f"cannot drop {names} and keep {path} consistent: the run's accumulators (histograms, moments, maxima, "
            "top-k contexts) are sums and maxima over every committed prompt and cannot be taken apart by shard; "
            "profile the corpus again into a new --out"
        )
    w = RunWriter(path, doc["meta"], mode="resume")
    w.open()  # the lock; what a killed writer left is deleted
    try:
        done = ["deleted what a killed writer left (files no committed shard names, temporary files)"]
        if drop_bad_shards and bad:
            for s in w.doc["shards"]:
                rel = f"vectors/{s['name']}.safetensors"
                if rel in s["files"]:
                    s["files"].remove(rel)
                    s["checksums"].pop(rel, None)
            w.doc["keep_vectors"] = w.meta["keep_vectors"] = False
            w.doc["status"] = doc.get("status")
            w._write_manifest()
            for f in (path / "vectors").glob("*.safetensors"):
                f.unlink()
            done.append(
                f"dropped the vectors tier ({len(bad)} damaged vectors file(s)): the per-token vectors, per-prompt "
                "thumbnails and kept matrices are gone; every table and the accumulators are intact"
            )
        else:
            w.doc["status"] = doc.get("status")
            w._write_manifest()  # a run of schema 1 now records its files' checksums
    finally:
        w.close(complete=False)  # the run keeps its status
    return done
