"""A run directory: the statistics of a corpus, written shard by shard, resumable, readable while it grows.

numpy, pyarrow and safetensors only (no torch). Layout (Ly layers, H heads, V attention vectors, k top neurons)::

    run.json              identity (model, digests, tokenizer, settings), the committed shards, the current accumulators
    accum/a<gen>.safetensors  additive accumulators (``data.ACCUM_NAMES``): O(Ly x H x bins + Ly x d_ff), any corpus
    index/<shard>.parquet     one row per prompt: prompt, prompt_id, sha256, n_tokens, preview
    prompts/<shard>.parquet   one row per (prompt, layer, head): the mean of every vector over the prompt's tokens,
                              and the mean attention distance
    tokens/<shard>.parquet    one row per token: prompt, position, token_id, token, logit_entropy, in_norm[Ly],
                              out_norm[Ly], topk_idx[Ly * k], topk_val[Ly * k]
    vectors/<shard>.safetensors  the vectors tier (opt-in for corpora): attn.<vector> [Ly, H, T], per-prompt
                              thumbnails, and the full matrices of the heads the user kept

A shard is committed by writing its files, then the accumulators (a new generation), then ``run.json`` by atomic
rename, then deleting the previous accumulators. Anything ``run.json`` does not name is left over from a killed
writer: the next writer deletes it. One writer at a time holds ``.lock`` (``flock``: released by the kernel when
the process dies, even by ``kill -9``). Its helpers (Ray actors) may write a shard's files ahead of its commit,
under ``.staging/`` with the same layout; the commit renames them into place, and the next writer deletes any
``.staging/`` a killed run left.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data import Profile, ProfileError, load_profile_dir
from .layout import (
    IDENTITY,
    PARTS,
    RUN_FILE,
    STAGING,
    TABLES,
    RunError,
    Shard,
    checked_file,
    checked_files,
    committed_ids,
    doc_digest,
    is_run,
    read_committed_ids,
    read_manifest,
    shard_files,
)
from .maintenance import Damage, merge_runs, repair_run, verify_run
from .reader import LazyTokenArray, TokenMeansOnly, load_run, run_tables
from .writer import RunWriter, next_seq, shard_name, write_shard_files

__all__ = [
    "IDENTITY",
    "PARTS",
    "RUN_FILE",
    "STAGING",
    "TABLES",
    "Damage",
    "LazyTokenArray",
    "RunError",
    "RunWriter",
    "Shard",
    "TokenMeansOnly",
    "checked_file",
    "checked_files",
    "committed_ids",
    "doc_digest",
    "is_run",
    "load",
    "load_run",
    "merge_runs",
    "next_seq",
    "read_committed_ids",
    "read_manifest",
    "repair_run",
    "run_tables",
    "shard_files",
    "shard_name",
    "verify_run",
    "write_shard_files",
]


def load(path: str | os.PathLike) -> Profile:
    """A run directory (``run.json``: lazy, per-token data read on first use) or a profile directory written by
    ``Profile.save``, as a ``Profile``; ``ProfileError`` if it is neither."""
    path = Path(path)
    if not path.is_dir():
        raise ProfileError(f"{path} is not a profile directory (it does not exist or is not a directory)")
    if (path / RUN_FILE).is_file():
        return load_run(path)
    return load_profile_dir(path)
