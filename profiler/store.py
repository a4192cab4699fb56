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

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import LENS_ARRAYS, Profile, ProfileError, combine_accum, mean_distance

__all__ = [
    "RUN_FILE",
    "RunError",
    "RunWriter",
    "Shard",
    "committed_ids",
    "is_run",
    "load_run",
    "shard_name",
    "write_shard_files",
    "merge_runs",
    "run_tables",
]

RUN_FILE = "run.json"
RUN_FORMAT = "attnscope-run"
RUN_SCHEMA = 1
LOCK_FILE = ".lock"
STAGING = ".staging"  # shard files written ahead of their commit (by Ray actors)
PARTS = ("accum", "index", "prompts", "tokens", "vectors")
# identity of a run: what must agree to resume or append to it, and what each difference means to a user
IDENTITY = {
    "config_digest": "another model (its config differs)",
    "model_dtype": "the dtype differs",  # before the weights: their digest changes with the dtype
    "weights_digest": "another model (its weights differ)",
    "spec": "the statistics settings (--bins, --thumb-size) differ",
    "top_k": "--top-k differs",
    "vectors": "the attention vectors differ (another attnscope version)",
    "neuron_contexts": "--neuron-contexts differs",
    "logit_lens": "--logit-lens differs (a run keeps the lens on or off throughout)",
}


_LENS_INT = ("lens.top_id", "lens.target_rank")


class RunError(ProfileError):
    """A run directory cannot be written: busy, foreign, read-only, or of another model or settings."""


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RunError("run directories need pyarrow: pip install pyarrow") from None
    return pa, pq


@dataclass
class Shard:
    """The statistics of a contiguous slice of the corpus, in corpus order (P prompts, T tokens)."""

    prompt_ids: list[str]
    sha256: list[str]
    previews: list[str]
    lengths: np.ndarray  # [P] int64
    token_ids: np.ndarray  # [T] int64
    token_text: list[str]  # [T]
    logit_entropy: np.ndarray  # [T] float32
    mlp: dict[str, np.ndarray]  # in_norm/out_norm [Ly, T] float32, topk_idx/topk_val [Ly, T, k]
    row_means: np.ndarray  # [P, Ly, H, V] float32: mean of each vector over the prompt's tokens
    distance: np.ndarray  # [P, Ly, H] float64: mean attention distance
    accum: dict[str, np.ndarray]  # data.ACCUM_NAMES; neuron_argmax counts the shard's own tokens from 0
    vectors: dict[str, np.ndarray] | None = None  # attn.<v> [Ly, H, T]
    thumbs: list[np.ndarray] | None = None  # per prompt [Ly, H, r, r]
    full: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)  # (prompt, layer, head) -> [L, L]
    lens: dict[str, np.ndarray] | None = None  # data.LENS_ARRAYS, each [Ly, T] (--logit-lens)
    lens_vocab: dict[int, str] | None = None  # decoded text of every lens top-1 id of the shard

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


# -- small file helpers --
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_parquet(table, path: Path) -> None:
    _, pq = _pa()
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_arrays(arrays: dict[str, np.ndarray], path: Path) -> str:
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    _write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def is_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory (it holds a ``run.json`` of this format)."""
    try:
        with open(Path(path) / RUN_FILE) as f:
            return json.load(f).get("format") == RUN_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_manifest(path: Path) -> dict:
    try:
        with open(path / RUN_FILE) as f:
            doc = json.load(f)
    except OSError as e:
        raise ProfileError(f"{path} is not a run directory: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path / RUN_FILE} is corrupted: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT:
        raise ProfileError(f"{path} is not an attnscope run ({RUN_FILE} has no format {RUN_FORMAT!r})")
    if doc.get("schema_version") != RUN_SCHEMA:
        raise ProfileError(f"{path} has run schema {doc.get('schema_version')}, this attnscope reads {RUN_SCHEMA}")
    return doc


def _shard_tables(shard: Shard, prompt0: int, Ly: int, H: int, vectors: Sequence[str]):
    """The three Parquet tables of a shard whose first prompt is number ``prompt0`` in the run: index, prompts,
    tokens. Nothing in them depends on the tokens before the shard, so a shard can be written before the shards
    ahead of it are done (a Ray actor writes its own)."""
    pa, _ = _pa()
    P, T = shard.n_prompts, shard.n_tokens
    prompt = np.arange(prompt0, prompt0 + P, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(shard.lengths)]).astype(np.int64)
    index = pa.table(
        {
            "prompt": prompt,
            "prompt_id": pa.array(shard.prompt_ids, pa.string()),
            "sha256": pa.array(shard.sha256, pa.string()),
            "n_tokens": shard.lengths.astype(np.int64),
            "preview": pa.array(shard.previews, pa.string()),
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
    cols["distance"] = shard.distance.reshape(n)
    prompts = pa.table(cols)
    pos = np.arange(T) - np.repeat(offsets[:-1], shard.lengths)
    k = shard.mlp["topk_idx"].shape[-1]

    def per_token(a: np.ndarray, width: int):  # [Ly, T, ...] -> fixed-size list column of Ly * ... per token
        flat = np.ascontiguousarray(np.moveaxis(a, 1, 0).reshape(T, width))
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)

    tokens = pa.table(
        {
            "prompt": np.repeat(prompt, shard.lengths),
            "position": pos.astype(np.int32),
            "token_id": shard.token_ids.astype(np.int64),
            "token": pa.array(shard.token_text, pa.string()),
            "logit_entropy": shard.logit_entropy.astype(np.float32),
            "in_norm": per_token(shard.mlp["in_norm"], Ly),
            "out_norm": per_token(shard.mlp["out_norm"], Ly),
            "topk_idx": per_token(shard.mlp["topk_idx"].astype(np.int32), Ly * k),
            "topk_val": per_token(shard.mlp["topk_val"].astype(np.float32), Ly * k),
        }
    )
    if shard.lens is not None:  # the logit lens: one value per layer and token, and the top-1 tokens' text
        for name, a in shard.lens.items():
            tokens = tokens.append_column(name.replace(".", "_"), per_token(a, Ly))
        top = shard.lens["lens.top_id"]
        text = np.array([shard.lens_vocab[int(t)] for t in np.unique(top)], dtype=object)[
            np.searchsorted(np.unique(top), top)
        ]  # [Ly, T]
        tokens = tokens.append_column("lens_top_token", per_token(text, Ly))
    return index, prompts, tokens


def shard_name(seq: int) -> str:
    return f"s{seq:06d}"


def _next_seq(doc: dict | None) -> int:
    return max([int(s["name"][1:]) for s in (doc or {}).get("shards", [])], default=-1) + 1


def write_shard_files(root: str | os.PathLike, name: str, shard: Shard, prompt0: int, meta: dict) -> list[str]:
    """Write a shard's files (Parquet tables, and its vectors when it has any) under ``root`` in the run layout;
    returns their paths relative to ``root``. Committing them is the writer's job (``RunWriter.commit``, or
    ``commit_staged`` for files written under ``.staging/`` by a helper)."""
    root = Path(root)
    Ly, H = int(meta["n_layers"]), int(meta["n_heads"])
    index, prompts, tokens = _shard_tables(shard, prompt0, Ly, H, meta["vectors"])
    files = []
    for part, table in (("index", index), ("prompts", prompts), ("tokens", tokens)):
        (root / part).mkdir(parents=True, exist_ok=True)
        _write_parquet(table, root / part / f"{name}.parquet")
        files.append(f"{part}/{name}.parquet")
    vec: dict[str, np.ndarray] = {}
    if shard.vectors is not None:
        vec.update(shard.vectors)
    for i, t in enumerate(shard.thumbs or []):
        vec[f"attn.thumb.p{i}"] = t
    for (i, layer, head), m in shard.full.items():
        vec[f"attn.full.p{i}.l{layer}.h{head}"] = m
    if vec:
        (root / "vectors").mkdir(exist_ok=True)
        _save_arrays(vec, root / "vectors" / f"{name}.safetensors")
        files.append(f"vectors/{name}.safetensors")
    for part in {f.split("/")[0] for f in files}:
        _fsync_dir(root / part)
    return files


class _Lock:
    """An exclusive ``flock`` on ``dir/.lock``; the kernel releases it when the holder dies."""

    def __init__(self, path: Path):
        self.path = path / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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


def _check_identity(doc: dict, meta: dict, path: Path, what: str) -> None:
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
        if self._existing and not is_run(p):
            if not (p / "profile.json").is_file():
                raise RunError(
                    f"--out {p} is not empty and not an attnscope run; choose another --out "
                    "(--force never deletes a directory that is not a run)"
                )
            if self.mode != "force":
                raise RunError(f"--out {p} holds a profile of the single-file format; --force replaces it")
        if self._existing and is_run(p) and self.mode == "new":
            doc = _read_manifest(p)
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
            doc = _read_manifest(p)
            if self.mode == "new":
                raise RunError(f"--out {p} already holds a run: --append adds to it, --force replaces it")
            if self.mode == "force":
                self._wipe()
                doc = None
            else:
                _check_identity(doc, self.meta, p, self.mode)
                if self.mode == "append" and doc.get("keep_vectors") != self.meta.get("keep_vectors"):
                    raise RunError(
                        f"cannot append to the run in {p}: it was written with keep vectors "
                        f"{doc.get('keep_vectors')}, this run with {self.meta.get('keep_vectors')} (--keep)"
                    )
                _clean_uncommitted(p, doc)
                self.doc = doc
                self.meta["keep_vectors"] = doc.get("keep_vectors", False)
                if doc.get("accum"):
                    self.accum = self._load_accum(doc)
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

    def _load_accum(self, doc: dict) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return dict(load_file(str(self.path / doc["accum"])))

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
        return _committed_ids(self.path, self.doc) if self.doc else set()

    # -- commit --
    @property
    def next_shard(self) -> tuple[str, int]:
        """The name and first prompt number of the next shard to commit."""
        return shard_name(_next_seq(self.doc)), self.n_prompts

    def commit(self, shard: Shard) -> None:
        """Write one shard: its files, then the accumulators, then ``run.json`` by atomic rename."""
        name, p0 = self.next_shard
        files = write_shard_files(self.path, name, shard, p0, self.doc["meta"])
        self._commit_files(name, shard.n_prompts, shard.n_tokens, files, shard.accum)

    def commit_staged(self, name: str, prompt0: int, n_prompts: int, n_tokens: int, files: Sequence[str], accum):
        """Commit a shard whose files a helper wrote under ``.staging/`` (``write_shard_files``) as shard ``name``
        starting at prompt ``prompt0``: they must be the next; the files are renamed into place."""
        if (name, prompt0) != self.next_shard:
            raise RunError(
                f"internal error: staged shard {name} (first prompt {prompt0}) is not the next of {self.path} "
                f"({self.next_shard[0]}, first prompt {self.next_shard[1]})"
            )
        staging = self.path / STAGING
        for rel in files:
            os.replace(staging / rel, self.path / rel)
        for part in {f.split("/")[0] for f in files}:
            _fsync_dir(self.path / part)
        self._commit_files(name, n_prompts, n_tokens, list(files), accum)

    def _commit_files(self, name: str, n_prompts: int, n_tokens: int, files: list[str], accum) -> None:
        doc = self.doc
        if doc["meta"].get("d_ff") is None and "mlp.neuron_max" in accum:
            doc["meta"]["d_ff"] = int(accum["mlp.neuron_max"].shape[1])
        p0, t0 = int(doc["n_prompts"]), int(doc["n_tokens"])
        self.accum = combine_accum(self.accum, accum, t0)
        gen = int(doc["accum"].split("/a")[1].split(".")[0]) + 1 if doc["accum"] else 0
        accum_file = f"accum/a{gen:06d}.safetensors"
        sha = _save_arrays(self.accum, self.path / accum_file)
        _fsync_dir(self.path / "accum")
        old_accum = doc["accum"]
        doc["shards"].append(
            {"name": name, "n_prompts": n_prompts, "n_tokens": n_tokens, "prompt0": p0, "token0": t0} | {"files": files}
        )
        doc["n_prompts"], doc["n_tokens"] = p0 + n_prompts, t0 + n_tokens
        doc["accum"], doc["accum_sha256"] = accum_file, sha
        self._write_manifest()
        if old_accum:
            (self.path / old_accum).unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        _write_bytes(self.path / RUN_FILE, json.dumps(self.doc, indent=1).encode())
        _fsync_dir(self.path)


def _committed_ids(path: Path, doc: dict) -> set[str]:
    _, pq = _pa()
    out: set[str] = set()
    for s in doc["shards"]:
        t = pq.read_table(path / f"index/{s['name']}.parquet", columns=["prompt_id"])
        out.update(t.column("prompt_id").to_pylist())
    return out


def committed_ids(path: str | os.PathLike) -> set[str]:
    """The ``prompt_id`` of every prompt committed to the run at ``path``."""
    return _committed_ids(Path(path), _read_manifest(Path(path)))


# -- reading --
class _RunData:
    """Reads a run's files on demand, one shard at a time, and caches what it read."""

    def __init__(self, path: Path, doc: dict):
        self.path, self.doc = path, doc
        self.meta = doc["meta"]
        self.shards = doc["shards"]
        self.prompt0 = np.array([s["prompt0"] for s in self.shards] + [doc["n_prompts"]], dtype=np.int64)
        self._index = None
        self._offsets: np.ndarray | None = None
        self._tokens_cache: tuple[int, object] | None = None
        self._vec_keys: dict[str, tuple[int, str]] | None = None

    def index(self):
        if self._index is None:
            _, pq = _pa()
            import pyarrow as pa

            tables = [pq.read_table(self.path / f"index/{s['name']}.parquet") for s in self.shards]
            self._index = pa.concat_tables(tables) if tables else None
        return self._index

    def offsets(self) -> np.ndarray:
        """[P + 1] the first token of every prompt in the run (read once)."""
        if self._offsets is None:
            idx = self.index()
            n = np.zeros(0, np.int64) if idx is None else idx.column("n_tokens").to_numpy()
            self._offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        return self._offsets

    def shard_of(self, prompt: int) -> int:
        return int(np.searchsorted(self.prompt0, prompt, side="right") - 1)

    def tokens(self, s: int):
        if self._tokens_cache is None or self._tokens_cache[0] != s:
            _, pq = _pa()
            self._tokens_cache = (s, pq.read_table(self.path / f"tokens/{self.shards[s]['name']}.parquet"))
        return self._tokens_cache[1]

    def token_part(self, s: int, column: str) -> np.ndarray:
        """One shard's token column: [T_s], or [T_s, width] for the fixed-size list columns."""
        _, pq = _pa()
        import pyarrow as pa

        col = pq.read_table(self.path / f"tokens/{self.shards[s]['name']}.parquet", columns=[column]).column(column)
        col = col.combine_chunks()
        if isinstance(col.type, pa.FixedSizeListType):
            return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
        return col.to_numpy(zero_copy_only=False)

    def vector_keys(self) -> dict[str, tuple[int, str]]:
        """Per-prompt vectors-tier names (thumbnails, full matrices) with global prompt numbers -> (shard, name)."""
        if self._vec_keys is None:
            from safetensors import safe_open

            self._vec_keys = {}
            for s, sh in enumerate(self.shards):
                f = self.path / f"vectors/{sh['name']}.safetensors"
                if f"vectors/{sh['name']}.safetensors" not in sh["files"]:
                    continue
                with safe_open(str(f), "numpy") as st:
                    for k in st.keys():
                        if k.startswith(("attn.thumb.p", "attn.full.p")):
                            head, rest = k.split(".p", 1)
                            idx, _, tail = rest.partition(".")
                            g = f"{head}.p{int(idx) + sh['prompt0']}" + (f".{tail}" if tail else "")
                            self._vec_keys[g] = (s, k)
        return self._vec_keys

    def vector_part(self, s: int, name: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(self.path / f"vectors/{self.shards[s]['name']}.safetensors"), "numpy") as st:
            return st.get_tensor(name)

    def tensor(self, s: int, key: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(self.path / f"vectors/{self.shards[s]['name']}.safetensors"), "numpy") as st:
            return st.get_tensor(key)


class LazyTokenArray:
    """A per-token array of a run, read shard by shard: indexing with a slice along the token axis (what every
    per-prompt view does) reads only the shards that slice touches; anything else reads the whole array once.

    Behaves as a numpy array for reading (``np.asarray``, ``.shape``, ``.mean(...)`` ...).
    """

    def __init__(self, load_part, token0: np.ndarray, axis: int, shape: tuple, dtype):
        self._load_part, self._token0, self.axis = load_part, token0, axis  # token0: [shards + 1] token offsets
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self._full: np.ndarray | None = None
        self._parts: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def _part(self, s: int) -> np.ndarray:
        if s not in self._parts:
            if len(self._parts) >= 4:  # a few recent shards, not the run
                self._parts.pop(next(iter(self._parts)))
            self._parts[s] = self._load_part(s)
        return self._parts[s]

    def full(self) -> np.ndarray:
        if self._full is None:
            n = len(self._token0) - 1
            parts = [self._part(s) if s in self._parts else self._load_part(s) for s in range(n)]
            self._full = np.concatenate(parts, axis=self.axis) if parts else np.zeros(self.shape, self.dtype)
        return self._full

    def __array__(self, dtype=None, copy=None):
        a = self.full()
        return a if dtype is None else a.astype(dtype)

    def __getattr__(self, name):
        return getattr(self.full(), name)

    def __getitem__(self, key):
        tup = key if isinstance(key, tuple) else (key,)
        if self._full is None and len(tup) > self.axis and isinstance(tup[self.axis], slice):
            sl = tup[self.axis]
            start, stop, step = sl.indices(self.shape[self.axis])
            if step == 1 and all(isinstance(k, (int, np.integer, slice)) for k in tup):
                if stop <= start:
                    return self.full()[key]
                lo = int(np.searchsorted(self._token0, start, side="right") - 1)
                hi = int(np.searchsorted(self._token0, stop - 1, side="right") - 1)
                part = np.concatenate([self._part(s) for s in range(lo, hi + 1)], axis=self.axis)
                base = int(self._token0[lo])
                local = tup[: self.axis] + (slice(start - base, stop - base),) + tup[self.axis + 1 :]
                return part[local]
        return self.full()[key]

    def __repr__(self) -> str:
        return f"LazyTokenArray(shape={self.shape}, dtype={self.dtype})"


class TokenMeansOnly:
    """An attention vector of a run without the vectors tier: its mean over the token axis (``.mean(-1)``, what the
    per-head tables need) comes from the additive row sums; any per-token read raises ``ProfileError`` saying which
    option keeps it."""

    def __init__(self, name: str, means: np.ndarray, n_tokens: int, message: str):
        self.name, self._means, self._message = name, means, message
        self.shape, self.dtype, self.ndim = (*means.shape, n_tokens), np.dtype(np.float32), 3

    def mean(self, axis=None, dtype=None, **kw):
        if axis not in (-1, 2) or kw:
            raise ProfileError(self._message)
        return self._means if dtype is None else self._means.astype(dtype)

    def _refuse(self, *a, **k):
        raise ProfileError(self._message)

    __getitem__ = __array__ = __len__ = __iter__ = _refuse

    def __getattr__(self, name):
        raise ProfileError(self._message)


class _RunArrays(Mapping):
    """``Profile.arrays`` of a run: accumulators at once, per-token data read (and cached) on first use."""

    def __init__(self, data: _RunData, accum: dict[str, np.ndarray]):
        self.data, self.accum = data, accum
        self.cache: dict[str, np.ndarray] = {}
        meta = data.meta
        self.vec_names = [f"attn.{v}" for v in meta["vectors"]] if data.doc.get("keep_vectors") else []
        self.token_names = ["tokens.ids", "tokens.logit_entropy", "mlp.in_norm", "mlp.out_norm", "mlp.topk_idx"]
        self.token_names += ["mlp.topk_val", "prompts.offsets"]
        if meta.get("logit_lens"):
            self.token_names += [*LENS_ARRAYS, "lens.top_token"]

    def _names(self) -> list[str]:
        return list(self.accum) + self.token_names + self.vec_names + list(self.data.vector_keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name) -> bool:
        if name in self.accum or name in self.token_names or name in self.vec_names:
            return True
        return isinstance(name, str) and name.startswith("attn.") and name in self.data.vector_keys()

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.accum:
            return self.accum[name]
        if name in self.cache:
            return self.cache[name]
        d, Ly, H = self.data, int(self.data.meta["n_layers"]), int(self.data.meta["n_heads"])
        k = int(d.meta["top_k"])
        T = int(d.doc["n_tokens"])
        token0 = np.array([sh["token0"] for sh in d.shards] + [T], dtype=np.int64)

        def lazy(load, axis, shape, dtype):
            return LazyTokenArray(load, token0, axis, shape, dtype)

        if name == "prompts.offsets":
            out = d.offsets()
        elif name == "tokens.ids":
            out = lazy(lambda s: d.token_part(s, "token_id").astype(np.int64), 0, (T,), np.int64)
        elif name == "tokens.logit_entropy":
            out = lazy(lambda s: d.token_part(s, "logit_entropy").astype(np.float32), 0, (T,), np.float32)
        elif name in ("mlp.in_norm", "mlp.out_norm"):
            col = name[4:]
            out = lazy(lambda s: np.ascontiguousarray(d.token_part(s, col).T), 1, (Ly, T), np.float32)  # [Ly, T]
        elif name in ("mlp.topk_idx", "mlp.topk_val"):
            col, dt = name[4:], (np.int32 if name.endswith("idx") else np.float32)

            def load(s, col=col):  # [Ly, T_s, k]
                return np.ascontiguousarray(d.token_part(s, col).reshape(-1, Ly, k).transpose(1, 0, 2))

            out = lazy(load, 1, (Ly, T, k), dt)
        elif name in LENS_ARRAYS or name == "lens.top_token":
            col = name.replace(".", "_")
            dt = object if name == "lens.top_token" else np.int32 if name in _LENS_INT else np.float32

            def load(s, col=col, dt=dt):  # [Ly, T_s]
                return np.ascontiguousarray(d.token_part(s, col).reshape(-1, Ly).T).astype(dt)

            out = lazy(load, 1, (Ly, T), dt)
        elif name in self.vec_names:
            out = lazy(lambda s: d.vector_part(s, name), 2, (Ly, H, T), np.float32)
        elif name.startswith("attn.") and name in d.vector_keys():
            s, key = d.vector_keys()[name]
            return d.tensor(s, key)  # per prompt: small, not cached
        elif name.startswith("attn.") and name[5:] in d.meta["vectors"] and "attn.row_sums" in self.accum:
            i = list(d.meta["vectors"]).index(name[5:])
            means = self.accum["attn.row_sums"][..., i] / max(T, 1)  # [Ly, H]
            return TokenMeansOnly(
                name,
                means,
                T,
                f"{name}: this run did not keep the per-token per-head vectors (the vectors tier, opt-in for "
                "corpora): only their mean over all tokens is kept (Profile.head_means), and each prompt's mean is "
                "in prompts/*.parquet; profile again with --keep vectors for per-token views",
            )
        elif name.startswith("attn.thumb.p"):
            raise ProfileError(
                f"{name}: this run did not keep per-prompt thumbnails (the vectors tier); --keep vectors keeps them, "
                "and attn.thumb_rel holds the mean thumbnail of the whole run in relative position"
            )
        else:
            raise KeyError(name)
        self.cache[name] = out
        return out


class _RunPrompts(Sequence):
    """``Profile.prompts`` of a run: one dict per prompt, built on demand from the index and token tables."""

    def __init__(self, data: _RunData):
        self.data = data

    def __len__(self) -> int:
        return int(self.data.doc["n_prompts"])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"prompt index {i} out of range: the run holds {len(self)} prompts")
        d = self.data
        idx = d.index()
        row = {c: idx.column(c)[i].as_py() for c in ("prompt_id", "sha256", "n_tokens", "preview")}
        s = d.shard_of(i)
        tok = d.tokens(s)
        lo = int(d.offsets()[i]) - d.shards[s]["token0"]
        text = tok.column("token").slice(lo, row["n_tokens"]).to_pylist()
        return {
            "id": row["prompt_id"],
            "sha256": row["sha256"],
            "n_tokens": row["n_tokens"],
            "preview": row["preview"],
            "tokens": text,
        }

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __add__(self, other):
        return list(self) + list(other)

    def __eq__(self, other):
        return list(self) == list(other)


def load_run(path: str | os.PathLike) -> Profile:
    """A run directory as a ``Profile``: the accumulators are read now, everything per token on first use."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    doc = _read_manifest(path)
    accum: dict[str, np.ndarray] = {}
    if doc.get("accum"):
        f = path / doc["accum"]
        try:
            data = f.read_bytes()
        except OSError as e:
            raise ProfileError(f"{f} is missing or unreadable: {e.strerror}") from None
        if hashlib.sha256(data).hexdigest() != doc.get("accum_sha256"):
            raise ProfileError(f"{f} is corrupted or does not belong to {path / RUN_FILE} (checksum mismatch)")
        try:
            accum = dict(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ProfileError(f"{f} is corrupted: {e}") from None
    for s in doc["shards"]:
        for rel in s["files"]:
            if not (path / rel).is_file():
                raise ProfileError(f"{path} is incomplete: {rel}, named in {RUN_FILE}, is missing")
    data = _RunData(path, doc)
    meta = dict(doc["meta"])
    meta["run_status"] = doc.get("status")
    return Profile(meta=meta, prompts=_RunPrompts(data), arrays=_RunArrays(data, accum))


def run_tables(path: str | os.PathLike) -> dict[str, object]:
    """Where the tables of a run are, for SQL: Parquet globs of index/prompts/tokens, and the heads and neurons
    tables (pyarrow, from the accumulators)."""
    pa, _ = _pa()
    path = Path(path)
    prof = load_run(path)
    doc = _read_manifest(path)
    Ly, H = prof.n_layers, prof.n_heads
    out: dict[str, object] = {}
    for part in ("index", "prompts", "tokens"):
        out[part] = [str(path / rel) for s in doc["shards"] for rel in s["files"] if rel.startswith(part + "/")]
    heads = {"layer": np.repeat(np.arange(Ly), H), "head": np.tile(np.arange(H), Ly)}
    if doc["shards"]:
        for v, m in prof.head_means().items():
            heads[v] = m.reshape(-1)
        heads["distance"] = mean_distance(prof.arrays["attn.dist"]).reshape(-1)
    out["heads"] = pa.table(heads)
    neurons: dict[str, np.ndarray] = {}
    if "mlp.neuron_max" in prof.arrays:
        mx = prof.arrays["mlp.neuron_max"]
        n = max(prof.n_tokens, 1)
        mean = prof.arrays["mlp.neuron_sum"] / n
        neurons = {
            "layer": np.repeat(np.arange(mx.shape[0]), mx.shape[1]),
            "neuron": np.tile(np.arange(mx.shape[1]), mx.shape[0]),
            "max": mx.reshape(-1),
            "argmax_token": prof.arrays["mlp.neuron_argmax"].reshape(-1),
            "mean": mean.reshape(-1),
            "std": np.sqrt(np.maximum(prof.arrays["mlp.neuron_sumsq"] / n - mean**2, 0)).reshape(-1),
        }
    out["neurons"] = pa.table(neurons) if neurons else None
    return out


def merge_runs(
    sources: Sequence[str | os.PathLike], out: str | os.PathLike, force: bool = False
) -> tuple[Path, list[str]]:
    """Join runs of the same model and settings into a new run at ``out``: the shards of each, in order, with
    prompts and tokens renumbered, and the accumulators combined. Equal to one run of all their prompts.

    The merged run keeps the vectors tier only if every source has it (``--keep auto`` keeps it for small runs
    only, so two default runs may differ); returns ``(out, the sources whose vectors were left out)``."""
    pa, pq = _pa()
    docs = [_read_manifest(Path(s)) for s in sources]
    if not docs:
        raise RunError("merge needs at least one run")
    first = docs[0]
    for s, d in zip(sources[1:], docs[1:]):
        _check_identity(first, d["meta"], Path(s), "merge")
    for s, d in zip(sources, docs):
        if d.get("status") != "complete":
            raise RunError(f"{s} is an unfinished run: finish it with --resume before merging")
    meta = dict(first["meta"])
    meta["keep_vectors"] = keep = all(d.get("keep_vectors") for d in docs)
    dropped = [str(s) for s, d in zip(sources, docs) if d.get("keep_vectors") and not keep]
    with RunWriter(out, meta, mode="force" if force else "new") as w:
        for src, d in zip(sources, docs):
            src = Path(src)
            accum = load_run(src).arrays.accum if d.get("accum") else {}
            for sh in d["shards"]:
                p0, t0 = w.doc["n_prompts"], w.doc["n_tokens"]
                name = w.next_shard[0]
                files = []
                for rel in sh["files"]:
                    part = rel.split("/")[0]
                    if part == "vectors" and not keep:
                        continue
                    dst = w.path / part / (name + rel[len(part) + 1 + len(sh["name"]) :])
                    if part in ("index", "prompts", "tokens"):
                        t = pq.read_table(src / rel)
                        t = t.set_column(
                            t.schema.get_field_index("prompt"),
                            "prompt",
                            pa.compute.add(t.column("prompt"), pa.scalar(p0 - sh["prompt0"], pa.int64())),
                        )
                        if "token_offset" in t.column_names:  # older runs stored it; the SQL view computes it
                            t = t.drop_columns(["token_offset"])
                        _write_parquet(t, dst)
                    else:
                        shutil.copyfile(src / rel, dst)
                    files.append(f"{part}/{dst.name}")
                w.doc["shards"].append(
                    {"name": name, "n_prompts": sh["n_prompts"], "n_tokens": sh["n_tokens"], "prompt0": p0}
                    | {"token0": t0, "files": files}
                )
                w.doc["n_prompts"], w.doc["n_tokens"] = p0 + sh["n_prompts"], t0 + sh["n_tokens"]
            base = w.doc["n_tokens"] - d["n_tokens"]
            if accum:
                w.accum = combine_accum(w.accum, accum, base)
        if w.accum is not None:
            gen_file = "accum/a000000.safetensors"
            w.doc["accum"], w.doc["accum_sha256"] = gen_file, _save_arrays(w.accum, w.path / gen_file)
        w.doc["meta"]["d_ff"] = first["meta"].get("d_ff")
        w._write_manifest()
    return Path(out), dropped
