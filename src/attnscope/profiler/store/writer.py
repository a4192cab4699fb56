"""Writing a run: a shard's files, the lock, and ``RunWriter`` (open, commit, close)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from attnscope.kernels.stats import DIST, HEAD_SCORES, NEURON_MAX, SPAN_FIELDS, full_key, thumb_key

from ..accum import combine_accum
from ..columns import LENS_TOP_ID, token_columns
from ..data import span_rows
from .layout import (
    IDENTITY,
    LOCK_FILE,
    PARTS,
    RUN_FILE,
    RUN_FORMAT,
    RUN_SCHEMA,
    STAGING,
    RunError,
    Shard,
    checked_files,
    doc_digest,
    file_checksum,
    fsync_dir,
    is_run,
    pyarrow_modules,
    read_accum,
    read_committed_ids,
    read_manifest,
    read_table,
    save_arrays,
    shard_files,
    write_bytes,
    write_parquet,
)


def _shard_tables(shard: Shard, prompt0: int, Ly: int, H: int, vectors: Sequence[str], logit_lens: bool, moe: bool):
    """The three Parquet tables of a shard whose first prompt is number ``prompt0`` in the run: index, prompts,
    tokens. Nothing in them depends on the tokens before the shard, so a shard can be written before the shards
    ahead of it are done (a Ray actor writes its own)."""
    pa, _ = pyarrow_modules()
    P, T = shard.n_prompts, shard.n_tokens
    prompt = np.arange(prompt0, prompt0 + P, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(shard.lengths)]).astype(np.int64)
    spans = shard.spans or [None] * P
    index = pa.table(
        {
            "prompt": prompt,
            "prompt_id": pa.array(shard.prompt_ids, pa.string()),
            "sha256": pa.array(shard.sha256, pa.string()),
            "n_tokens": shard.lengths.astype(np.int64),
            "preview": pa.array(shard.previews, pa.string()),
            # name -> token pieces [[start, end], ...] as JSON, or null: the query and key spans of its span table
            "spans": pa.array(
                [None if s is None else json.dumps({k: [list(p) for p in v] for k, v in s.items()}) for s in spans],
                pa.string(),
            ),  # fmt: skip
        }
    )
    n = P * Ly * H
    cols = {
        "prompt": np.repeat(prompt, Ly * H),
        "prompt_id": pa.array(np.repeat(np.array(shard.prompt_ids, dtype=object), Ly * H).tolist(), pa.string()),
        "layer": np.tile(np.repeat(np.arange(Ly, dtype=np.int32), H), P),
        "head": np.tile(np.arange(H, dtype=np.int32), P * Ly),
        "n_tokens": np.repeat(shard.lengths.astype(np.int64), Ly * H),
    }
    means = shard.row_means.reshape(n, len(vectors))
    for i, v in enumerate(vectors):
        cols[v] = np.ascontiguousarray(means[:, i])
    cols[DIST.summary] = shard.distance.reshape(n)
    for k, sc in enumerate(HEAD_SCORES):
        cols[sc.name] = shard.head_scores[..., k].reshape(n) if shard.head_scores is not None else np.full(n, np.nan)
    prompts = pa.table(cols)
    tokens = {"prompt": np.repeat(prompt, shard.lengths)}
    tokens["position"] = (np.arange(T) - np.repeat(offsets[:-1], shard.lengths)).astype(np.int32)
    for c in token_columns(logit_lens, moe):
        if c.key is None:  # the token text
            tokens[c.column] = pa.array(shard.token_text, pa.string())
            continue
        a = _lens_top_token(shard) if c.derived else shard.per_token[c.key]  # [T] or [Ly, T(, k)]
        if not c.per_layer:
            tokens[c.column] = a.astype(c.dtype)
            continue
        # [Ly, T, ...] -> a fixed-size list column of Ly * ... values per token
        width = Ly * (a.shape[2] if a.ndim == 3 else 1)
        flat = np.ascontiguousarray(np.moveaxis(a.astype(c.dtype), 1, 0).reshape(T, width))
        tokens[c.column] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)
    return index, prompts, pa.table(tokens)


def _lens_top_token(shard: Shard) -> np.ndarray:
    """[Ly, T] the text of each layer's top-1 lens token."""
    top = shard.per_token[LENS_TOP_ID]
    u = np.unique(top)
    return np.array([shard.lens_vocab[int(t)] for t in u], dtype=object)[np.searchsorted(u, top)]


def shard_name(seq: int) -> str:
    return f"s{seq:06d}"


def next_seq(doc: dict | None) -> int:
    return max([int(s["name"][1:]) for s in (doc or {}).get("shards", [])], default=-1) + 1


def write_shard_files(root: str | os.PathLike, name: str, shard: Shard, prompt0: int, meta: dict) -> list[str]:
    """Write a shard's files (Parquet tables, and its vectors when it has any) under ``root`` in the run layout;
    returns their paths relative to ``root``. Committing them is the writer's job (``RunWriter.commit``, or
    ``commit_staged`` for files written under ``.staging/`` by a helper)."""
    root = Path(root)
    Ly, H = int(meta["n_layers"]), int(meta["n_heads"])
    index, prompts, tokens = _shard_tables(
        shard, prompt0, Ly, H, meta["vectors"], bool(meta.get("logit_lens")), bool(meta.get("experts_per_token"))
    )
    files = []
    parts = [("index", index), ("prompts", prompts), ("tokens", tokens)]
    if shard.spans is not None:
        pa, _ = pyarrow_modules()
        cols = span_rows(prompt0, shard.prompt_ids, shard.spans, shard.span_attn)
        types = {"prompt": pa.int64(), "layer": pa.int32(), "head": pa.int32()}
        types.update({f: pa.float32() for f in SPAN_FIELDS})
        parts.append(("spans", pa.table({c: pa.array(v, types.get(c, pa.string())) for c, v in cols.items()})))
    for part, table in parts:
        (root / part).mkdir(parents=True, exist_ok=True)
        write_parquet(table, root / part / f"{name}.parquet")
        files.append(f"{part}/{name}.parquet")
    vec: dict[str, np.ndarray] = {}
    if shard.vectors is not None:
        vec.update(shard.vectors)
    for i, t in enumerate(shard.thumbs or []):
        vec[thumb_key(i)] = t
    for (i, layer, head), m in shard.full.items():
        vec[full_key(i, layer, head)] = m
    if vec:
        (root / "vectors").mkdir(exist_ok=True)
        save_arrays(vec, root / "vectors" / f"{name}.safetensors")
        files.append(f"vectors/{name}.safetensors")
    for part in {f.split("/")[0] for f in files}:
        fsync_dir(root / part)
    return files


class _Lock:
    """An exclusive ``flock`` on ``dir/.lock``; the kernel releases it when the holder dies."""

    def __init__(self, path: Path):
        self.path = path / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunError(f"{self.path} is a symbolic link: a run's files must be its own") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"{self.path.parent} is busy: another attnscope process is writing it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _refuse_links(path: Path) -> None:
    """A run's folders and files are its own: a symbolic link among them (``index -> /elsewhere``) could make a
    writer delete or write files outside the run, so it is refused before anything is touched."""
    for name in (*PARTS, STAGING, LOCK_FILE, RUN_FILE):
        if (path / name).is_symlink():
            raise RunError(
                f"{path / name} is a symbolic link: attnscope writes only inside the run's own folders "
                "(replace the link by the folder or file it points to)"
            )
    for part in PARTS:
        d = path / part
        if d.is_dir():
            for f in d.iterdir():
                if f.is_symlink():
                    raise RunError(f"{f} is a symbolic link: attnscope never follows links inside a run")


def _clean_uncommitted(path: Path, doc: dict | None) -> None:
    """Delete what a killed writer left: files no committed shard names, temp files, stale accumulators."""
    keep: set[str] = set()
    if doc is not None:
        for s in doc.get("shards", []):
            keep.update(s["files"])
        if doc.get("accum"):
            keep.add(doc["accum"])
    for part in PARTS:
        d = path / part
        if not d.is_dir():
            continue
        for f in d.iterdir():
            if f"{part}/{f.name}" not in keep:
                shutil.rmtree(f) if f.is_dir() else f.unlink()
    for f in path.glob(RUN_FILE + ".tmp"):
        f.unlink()


def check_identity(doc: dict, meta: dict, path: Path, what: str) -> None:
    old = doc["meta"]
    for key, why in IDENTITY.items():
        if old.get(key) != meta.get(key):
            raise RunError(
                f"cannot {what} the run in {path}: {why} ({key}: run has {old.get(key)!r}, this one {meta.get(key)!r})"
            )


class RunWriter:
    """Writes one run directory shard by shard. Use as a context manager (it holds the directory's lock).

    Args:
        path: the run directory.
        meta: identity and settings (``profiler.run`` builds it); ``meta["keep_vectors"]`` chooses the vectors tier.
        mode: ``"new"`` (refuse a non-empty directory), ``"resume"`` (continue a run: ``committed_ids`` says
            what to skip), ``"append"`` (add prompts to a finished run of the same model and settings), or
            ``"force"`` (replace a run or profile of any model; never a directory that is neither).
    """

    def __init__(self, path: str | os.PathLike, meta: dict | None = None, mode: str = "new"):
        if mode not in ("new", "resume", "append", "force"):
            raise ValueError(f"mode must be new, resume, append or force, got {mode!r}")
        self.path, self.meta, self.mode = Path(path), dict(meta or {}), mode
        self.lock = _Lock(self.path)
        self.doc: dict | None = None
        self.accum: dict[str, np.ndarray] | None = None
        self._ids: set[str] | None = None  # committed prompt ids, read on first need
        self._created = self._checked = self._existing = False

    # -- open / close --
    def __enter__(self) -> RunWriter:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)

    def precheck(self) -> None:
        """The checks of ``open`` that need no lock and no model, so a command fails before loading one; creates
        the directory (``discard`` removes it again if nothing is written)."""
        p = self.path
        if self._checked:
            return
        if p.exists() and not p.is_dir():
            raise RunError(f"--out {p} exists and is not a directory")
        self._existing = p.is_dir() and any(f.name not in (LOCK_FILE, STAGING) for f in p.iterdir())
        if p.is_dir():
            _refuse_links(p)
        if self._existing and not is_run(p):
            if not (p / "profile.json").is_file():
                raise RunError(
                    f"--out {p} is not empty and not an attnscope run; choose another --out "
                    "(--force never deletes a directory that is not a run)"
                )
            if self.mode != "force":
                raise RunError(f"--out {p} holds a profile of the single-file format; --force replaces it")
        if self._existing and is_run(p) and self.mode == "new":
            doc = read_manifest(p)
            if doc.get("status") != "complete":
                self._probe_lock()
                raise RunError(
                    f"--out {p} holds an unfinished run ({doc['n_prompts']} prompts committed): "
                    "--resume continues it, --force starts over"
                )
            raise RunError(f"--out {p} already holds a run: --append adds to it, --force replaces it")
        if not p.exists():
            try:
                p.mkdir(parents=True)
            except OSError as e:
                raise RunError(f"cannot create --out {p}: {e.strerror}") from None
            self._created = True
        if self._existing:
            self._probe_lock()
        self._checked = True

    def _probe_lock(self) -> None:
        try:
            self.lock.acquire()
        except OSError as e:
            raise RunError(f"cannot write --out {self.path}: {e.strerror}") from None
        self.lock.release()

    def discard(self) -> None:
        """Remove the directory ``precheck`` created, if nothing was committed to it."""
        if self._created and (self.doc is None or not self.doc["shards"]):
            shutil.rmtree(self.path, ignore_errors=True)

    def acquire(self) -> None:
        """Take the directory's lock (after ``precheck``) and delete a ``.staging/`` a killed run left; ``open``
        does this itself. A writer whose helpers write files before the run's identity is known (Ray) takes the
        lock first, so no other writer can start meanwhile."""
        if self.lock.fd is not None:
            return
        self.precheck()
        try:
            self.lock.acquire()
        except OSError as e:
            raise RunError(f"cannot write --out {self.path}: {e.strerror}") from None
        try:
            _refuse_links(self.path)
        except BaseException:
            self.lock.release()
            raise
        shutil.rmtree(self.path / STAGING, ignore_errors=True)

    def open(self) -> None:
        self.acquire()
        try:
            self._open_locked(self._existing)
        except BaseException:
            self.lock.release()
            raise

    def _open_locked(self, existing: bool) -> None:
        p = self.path
        if existing and is_run(p):
            doc = read_manifest(p)
            if self.mode == "new":
                raise RunError(f"--out {p} already holds a run: --append adds to it, --force replaces it")
            if self.mode == "force":
                self._wipe()
                doc = None
            else:
                check_identity(doc, self.meta, p, self.mode)
                if self.mode == "append" and doc.get("keep_vectors") != self.meta.get("keep_vectors"):
                    raise RunError(
                        f"cannot append to the run in {p}: it was written with keep vectors "
                        f"{doc.get('keep_vectors')}, this run with {self.meta.get('keep_vectors')} (--keep)"
                    )
                _clean_uncommitted(p, doc)
                doc["status"] = "running"  # until this writer closes: a failed --append is continued by --resume
                if doc["schema_version"] < 2:  # record the checksums of the files already there, then go on
                    for s in doc["shards"]:
                        s["checksums"] = {rel: file_checksum(p / rel) for rel in s["files"]}
                    doc["schema_version"] = RUN_SCHEMA
                self.doc = doc
                self._ids = None
                self.meta["keep_vectors"] = doc.get("keep_vectors", False)
                if doc.get("accum"):
                    self.accum = read_accum(p, doc)
                return
        elif existing and self.mode == "force":  # an older single-file profile
            self._wipe()
        if self.mode in ("resume", "append") and not existing:
            pass  # nothing to continue: start a new run
        for part in PARTS:
            (p / part).mkdir(exist_ok=True)
        self.doc = {
            "format": RUN_FORMAT,
            "schema_version": RUN_SCHEMA,
            "status": "running",
            "keep_vectors": bool(self.meta.get("keep_vectors")),
            "meta": self.meta,
            "n_prompts": 0,
            "n_tokens": 0,
            "accum": None,
            "accum_sha256": None,
            "shards": [],
        }
        self._write_manifest()

    def _wipe(self) -> None:
        """Delete an old run's (or profile's) own files, nothing else."""
        for part in PARTS:
            shutil.rmtree(self.path / part, ignore_errors=True)
        for name in (RUN_FILE, RUN_FILE + ".tmp", "profile.json", "profile.safetensors"):
            (self.path / name).unlink(missing_ok=True)  # anything else (e.g. figures/) stays

    def close(self, complete: bool = True) -> None:
        try:
            if self.doc is not None and complete and self.lock.fd is not None:
                self.doc["status"] = "complete"
                self._write_manifest()
        finally:
            if self.lock.fd is not None:
                shutil.rmtree(self.path / STAGING, ignore_errors=True)
            self.lock.release()
            if not complete:
                self.discard()  # nothing committed to a directory this writer made: leave none behind

    # -- state --
    @property
    def n_prompts(self) -> int:
        return int(self.doc["n_prompts"]) if self.doc else 0

    def committed_ids(self) -> set[str]:
        """The ``prompt_id`` of every committed prompt (what ``--resume`` skips)."""
        if self._ids is None:
            self._ids = read_committed_ids(self.path, self.doc) if self.doc else set()
        return set(self._ids)

    def prompts_to_skip(self, items, skip_existing: bool = False) -> set[str]:
        """The ids of the corpus ``items`` (``PromptItem``s) not to profile again, checked before any model loads.

        A prompt is in a run once. ``resume`` skips the committed prompts; of a run that is complete it refuses
        new prompts (that is ``append``). ``append`` refuses prompts already in the run (by id, or, for ids made
        from the index and text, by the text's sha256, since a text appended again gets a new index), or skips
        them with ``skip_existing``."""
        if self.mode not in ("resume", "append") or not is_run(self.path):
            return set()
        doc = read_manifest(self.path)
        # every committed file first: work added to a damaged run could not be kept (verified once, then cached)
        checked_files(self.path, doc, [rel for s in doc["shards"] for rel in s["files"]], persist=True)
        read_accum(self.path, doc)
        have, shas = set(), set()
        for s in doc["shards"]:
            t = read_table(self.path, doc, f"index/{s['name']}.parquet", ["prompt_id", "sha256"])
            have.update(t["prompt_id"].to_pylist())
            shas.update(t["sha256"].to_pylist())
        again, new = [], 0
        for it in items:
            sha = hashlib.sha256(it.text.encode()).hexdigest()
            auto = re.fullmatch(r"[0-9]+:" + sha[:16], it.id) is not None
            if it.id in have or (auto and sha in shas):
                again.append(it.id)
            else:
                new += 1
        if self.mode == "resume":
            if new and doc.get("status") == "complete":
                raise RunError(
                    f"the run in {self.path} is complete and {new} prompt(s) of this corpus are not in it: --resume "
                    "only continues an unfinished run; --append adds prompts"
                )
            return have | set(again)
        if again and not skip_existing:
            raise RunError(
                f"{len(again)} prompt(s) of this corpus are already in the run in {self.path} (e.g. {again[0]!r}): "
                "a prompt is profiled once per run; --skip-existing leaves them out"
            )
        return set(again)

    def _check_new_ids(self, ids: Sequence[str]) -> None:
        """A prompt is in a run once: refuse a shard that holds a committed prompt id again."""
        have = self.committed_ids()
        again = [i for i in ids if i in have]
        if again:
            raise RunError(
                f"{len(again)} prompt(s) are already in the run in {self.path} (e.g. id {again[0]!r}): a prompt is "
                "profiled once per run (--skip-existing leaves them out)"
            )

    # -- commit --
    @property
    def next_shard(self) -> tuple[str, int]:
        """The name and first prompt number of the next shard to commit."""
        return shard_name(next_seq(self.doc)), self.n_prompts

    def commit(self, shard: Shard) -> None:
        """Write one shard: its files, then the accumulators, then ``run.json`` by atomic rename."""
        name, p0 = self.next_shard
        self._check_new_ids(shard.prompt_ids)
        files = write_shard_files(self.path, name, shard, p0, self.doc["meta"])
        self._commit_files(name, shard.n_prompts, shard.n_tokens, files, shard.accum)
        self._ids.update(shard.prompt_ids)

    def commit_staged(
        self, name: str, prompt0: int, n_prompts: int, n_tokens: int, files: Sequence[str], accum: dict | None
    ) -> None:
        """Commit a shard whose files a helper wrote under ``.staging/`` (``write_shard_files``) as shard ``name``
        starting at prompt ``prompt0``: they must be the next; the files are renamed into place. ``accum`` is
        folded into the run's accumulators with the shard's tokens counted from its first; None leaves them as they
        are (a merge commits a source run's whole accumulators with its first shard)."""
        if (name, prompt0) != self.next_shard:
            raise RunError(
                f"internal error: staged shard {name} (first prompt {prompt0}) is not the next of {self.path} "
                f"({self.next_shard[0]}, first prompt {self.next_shard[1]})"
            )
        staging = self.path / STAGING
        if not set(files) <= shard_files(name):
            raise RunError(f"internal error: staged shard {name} names files outside its own: {list(files)}")
        for rel in files:
            os.replace(staging / rel, self.path / rel)
        for part in {f.split("/")[0] for f in files}:
            fsync_dir(self.path / part)
        self._commit_files(name, n_prompts, n_tokens, list(files), accum)
        if self._ids is not None:
            self._ids = None  # read again from the index when next needed

    def _commit_files(self, name: str, n_prompts: int, n_tokens: int, files: list[str], accum: dict | None) -> None:
        doc = self.doc
        p0, t0 = int(doc["n_prompts"]), int(doc["n_tokens"])
        old_accum = doc["accum"]
        accum_file, sha = old_accum, doc.get("accum_sha256")
        if accum is not None:  # a new generation of the accumulators
            if doc["meta"].get("d_ff") is None and NEURON_MAX.key in accum:
                doc["meta"]["d_ff"] = int(accum[NEURON_MAX.key].shape[1])
            self.accum = combine_accum(self.accum, accum, t0)
            gen = int(doc["accum"].split("/a")[1].split(".")[0]) + 1 if doc["accum"] else 0
            accum_file = f"accum/a{gen:06d}.safetensors"
            sha = save_arrays(self.accum, self.path / accum_file)
            fsync_dir(self.path / "accum")
        doc["shards"].append(
            {"name": name, "n_prompts": n_prompts, "n_tokens": n_tokens, "prompt0": p0, "token0": t0}
            | {"files": files, "checksums": {rel: file_checksum(self.path / rel) for rel in files}}
        )
        doc["n_prompts"], doc["n_tokens"] = p0 + n_prompts, t0 + n_tokens
        doc["accum"], doc["accum_sha256"] = accum_file, sha
        self._write_manifest()
        if old_accum and old_accum != accum_file:
            (self.path / old_accum).unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        self.doc["digest"] = doc_digest(self.doc)
        write_bytes(self.path / RUN_FILE, json.dumps(self.doc, indent=1).encode())
        fsync_dir(self.path)
