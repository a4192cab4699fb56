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

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
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
RUN_SCHEMA = 2  # 2: run.json carries its own digest and every shard file's size and sha256
READ_SCHEMAS = (1, 2)  # 1: no checksums of the shard files (they are read unverified) and no digest
LOCK_FILE = ".lock"
STAGING = ".staging"  # shard files written ahead of their commit (by Ray actors)
PARTS = ("accum", "index", "prompts", "tokens", "vectors")
TABLES = ("index", "prompts", "tokens")
_SHARD_NAME = re.compile(r"s[0-9]{6}")
_ACCUM_FILE = re.compile(r"accum/a[0-9]{6}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk leaves no half-written file behind
        tmp.unlink(missing_ok=True)
        raise


def _write_parquet(table, path: Path) -> None:
    _, pq = _pa()
    tmp = path.with_name(path.name + ".tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _doc_digest(doc: dict) -> str:
    """sha256 of ``run.json``'s contents without its own digest, in a canonical form (whitespace-free)."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def shard_files(name: str) -> set[str]:
    """The files a shard named ``name`` may have, relative to the run: nothing else is ever opened."""
    return {f"{part}/{name}.parquet" for part in TABLES} | {f"vectors/{name}.safetensors"}


def _read_manifest(path: Path) -> dict:
    f = path / RUN_FILE
    try:
        if f.is_symlink():
            raise ProfileError(f"{f} is a symbolic link: a run's files must be its own")
        with open(f, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise ProfileError(f"{path} is not a run directory: {e.strerror}") from None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProfileError(f"{f} is corrupted ({e}); the run cannot be read") from None
    if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT:
        raise ProfileError(f"{path} is not an attnscope run ({RUN_FILE} has no format {RUN_FORMAT!r})")
    if doc.get("schema_version") not in READ_SCHEMAS:
        raise ProfileError(
            f"{path} has run schema {doc.get('schema_version')}, this attnscope reads "
            f"{', '.join(map(str, READ_SCHEMAS))}"
        )
    _check_manifest(path, doc)
    return doc


def _check_manifest(path: Path, doc: dict) -> None:
    """Refuse a ``run.json`` whose digest does not match, or that names anything but the run's own files."""

    def bad(what: str) -> ProfileError:
        return ProfileError(f"{path / RUN_FILE} is corrupted or was edited: {what}")

    if doc["schema_version"] >= 2 and doc.get("digest") != _doc_digest(doc):
        raise bad("its digest does not match its contents")
    meta, shards = doc.get("meta"), doc.get("shards")
    if not isinstance(meta, dict) or not isinstance(shards, list):
        raise bad("no meta or shards")
    for key in ("n_layers", "n_heads", "top_k"):
        if not isinstance(meta.get(key), int) or meta[key] < 1:
            raise bad(f"meta.{key} is {meta.get(key)!r}")
    if not isinstance(meta.get("vectors"), list) or not all(isinstance(v, str) for v in meta["vectors"]):
        raise bad("meta.vectors is not a list of names")
    seen: set[str] = set()
    p0 = t0 = 0
    for s in shards:
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or name in seen:
            raise bad(f"shard name {name!r} (a shard is named s<6 digits>, once)")
        seen.add(name)
        files = s.get("files")
        allowed = shard_files(name)
        if not isinstance(files, list) or not set(files) <= allowed or len(set(files)) != len(files):
            raise bad(f"shard {name} names files outside its own ({files!r})")
        if not {f"{part}/{name}.parquet" for part in TABLES} <= set(files):
            raise bad(f"shard {name} lacks one of its tables")
        for key, expect in (("prompt0", p0), ("token0", t0)):
            if s.get(key) != expect:
                raise bad(f"shard {name}: {key} is {s.get(key)!r}, the shards before it end at {expect}")
        for key in ("n_prompts", "n_tokens"):
            if not isinstance(s.get(key), int) or s[key] < 0:
                raise bad(f"shard {name}: {key} is {s.get(key)!r}")
        p0, t0 = p0 + s["n_prompts"], t0 + s["n_tokens"]
        sums = s.get("checksums")
        if doc["schema_version"] >= 2:
            ok = isinstance(sums, dict) and set(sums) == set(files)
            ok = ok and all(
                isinstance(c, dict) and isinstance(c.get("size"), int) and _SHA256.fullmatch(str(c.get("sha256")))
                for c in sums.values()
            )
            if not ok:
                raise bad(f"shard {name} has no size and sha256 for each of its files")
    if (doc.get("n_prompts"), doc.get("n_tokens")) != (p0, t0):
        raise bad(f"it counts {doc.get('n_prompts')} prompts and {doc.get('n_tokens')} tokens, its shards {p0}, {t0}")
    accum = doc.get("accum")
    if accum is not None and (not isinstance(accum, str) or not _ACCUM_FILE.fullmatch(accum)):
        raise bad(f"accumulators {accum!r} (they are accum/a<6 digits>.safetensors)")
    if accum is not None and not _SHA256.fullmatch(str(doc.get("accum_sha256"))):
        raise bad("the accumulators have no sha256")


# -- opening a run's files: only the files run.json names, no symbolic links, checked against their checksums --
_VERIFIED: dict[str, tuple] = {}  # absolute path -> the stat fingerprint its sha256 was last verified at


def _fingerprint(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _verified_cache_file(root: Path) -> Path:
    from attnscope import cache_dir

    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return cache_dir() / "verified" / f"{key}.json"


def _load_verified(root: Path) -> dict:
    try:
        return json.loads(_verified_cache_file(root).read_text())
    except (OSError, ValueError):
        return {}


def _save_verified(root: Path, seen: dict) -> None:
    """Remember which files were verified at which fingerprint, so that another process (each ``sql`` query)
    does not hash them again; best effort (a read-only cache only costs time)."""
    f = _verified_cache_file(root)
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(seen))
        os.replace(tmp, f)
    except OSError:
        pass


def _damaged(root: Path, rel: str, what: str) -> ProfileError:
    return ProfileError(
        f"{root / rel} {what}: the run's committed files cannot be trusted; `attnscope verify {root}` lists every "
        f"damaged shard (--resume cannot restore a committed shard)"
    )


def _lstat_inside(root: Path, rel: str) -> os.stat_result:
    """``lstat`` of ``root/rel`` after checking that neither the file nor its folder is a symbolic link."""
    part = rel.split("/")[0]
    try:
        pst = os.lstat(root / part)
        if stat.S_ISLNK(pst.st_mode) or not stat.S_ISDIR(pst.st_mode):
            raise _damaged(root, part, "is a symbolic link or not a folder")
        st = os.lstat(root / rel)
    except FileNotFoundError:
        raise _damaged(root, rel, "is missing") from None
    except OSError as e:
        raise _damaged(root, rel, f"cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _damaged(root, rel, "is a symbolic link or not a regular file")
    return st


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _checksum(path: Path) -> dict:
    return {"size": os.path.getsize(path), "sha256": _sha256_file(path)}


def _expected(root: Path, doc: dict, rel: str) -> dict:
    if rel == doc.get("accum"):
        return {"sha256": doc.get("accum_sha256")}
    for s in doc["shards"]:
        if rel in s["files"]:
            return (s.get("checksums") or {}).get(rel, {})
    raise _damaged(root, rel, "is not a file of this run")


def checked_files(root: Path, doc: dict, rels: Sequence[str], persist: bool = False) -> list[Path]:
    """The paths of ``rels``, files of the run that ``run.json`` names, once each is known to be the file that
    was committed: no symbolic link, its size and sha256 as recorded (hashed on its first read, then trusted while
    its fingerprint stays the same: in this process, and with ``persist`` in the next ones too). ``ProfileError``
    names the first file that is not."""
    seen = _load_verified(root) if persist else {}
    changed = False
    out = []
    for rel in rels:
        expect = _expected(root, doc, rel)
        st = _lstat_inside(root, rel)
        path = root / rel
        out.append(path)
        if "size" in expect and st.st_size != expect["size"]:
            raise _damaged(root, rel, f"has {st.st_size} bytes, {expect['size']} were committed")
        if not expect.get("sha256"):
            continue  # a run of schema 1: no checksum to verify against
        key, fp = str(path.resolve()), _fingerprint(st)
        if _VERIFIED.get(key) == fp or seen.get(rel) == [*fp, expect["sha256"]]:
            _VERIFIED[key] = fp
            continue
        try:
            sha = _sha256_file(path)
        except OSError as e:
            raise _damaged(root, rel, f"cannot be read ({e.strerror})") from None
        if sha != expect["sha256"]:
            raise _damaged(root, rel, "does not match its checksum in run.json (corrupted or replaced)")
        _VERIFIED[key] = fp
        seen[rel], changed = [*fp, sha], True
    if persist and changed:
        _save_verified(root, seen)
    return out


def checked_file(root: Path, doc: dict, rel: str) -> Path:
    """``checked_files`` of one file."""
    return checked_files(root, doc, [rel])[0]


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
                doc["status"] = "running"  # until this writer closes: a failed --append is continued by --resume
                if doc["schema_version"] < 2:  # record the checksums of the files already there, then go on
                    for s in doc["shards"]:
                        s["checksums"] = {rel: _checksum(p / rel) for rel in s["files"]}
                    doc["schema_version"] = RUN_SCHEMA
                self.doc = doc
                self._ids = None
                self.meta["keep_vectors"] = doc.get("keep_vectors", False)
                if doc.get("accum"):
                    self.accum = _load_accum(p, doc)
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
            self._ids = _committed_ids(self.path, self.doc) if self.doc else set()
        return set(self._ids)

    def prompts_to_skip(self, items, skip_existing: bool = False) -> set[str]:
        """The ids of the corpus ``items`` (``PromptItem``s) not to profile again, checked before any model loads.

        A prompt is in a run once. ``resume`` skips the committed prompts; of a run that is complete it refuses
        new prompts (that is ``append``). ``append`` refuses prompts already in the run (by id, or, for ids made
        from the index and text, by the text's sha256, since a text appended again gets a new index), or skips
        them with ``skip_existing``."""
        if self.mode not in ("resume", "append") or not is_run(self.path):
            return set()
        doc = _read_manifest(self.path)
        have, shas = set(), set()
        for s in doc["shards"]:
            t = _read_table(self.path, doc, f"index/{s['name']}.parquet", ["prompt_id", "sha256"])
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
        return shard_name(_next_seq(self.doc)), self.n_prompts

    def commit(self, shard: Shard) -> None:
        """Write one shard: its files, then the accumulators, then ``run.json`` by atomic rename."""
        name, p0 = self.next_shard
        self._check_new_ids(shard.prompt_ids)
        files = write_shard_files(self.path, name, shard, p0, self.doc["meta"])
        self._commit_files(name, shard.n_prompts, shard.n_tokens, files, shard.accum)
        self._ids.update(shard.prompt_ids)

    def commit_staged(self, name: str, prompt0: int, n_prompts: int, n_tokens: int, files: Sequence[str], accum):
        """Commit a shard whose files a helper wrote under ``.staging/`` (``write_shard_files``) as shard ``name``
        starting at prompt ``prompt0``: they must be the next; the files are renamed into place."""
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
            _fsync_dir(self.path / part)
        self._commit_files(name, n_prompts, n_tokens, list(files), accum)
        if self._ids is not None:
            self._ids = None  # read again from the index when next needed

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
            {"name": name, "n_prompts": n_prompts, "n_tokens": n_tokens, "prompt0": p0, "token0": t0}
            | {"files": files, "checksums": {rel: _checksum(self.path / rel) for rel in files}}
        )
        doc["n_prompts"], doc["n_tokens"] = p0 + n_prompts, t0 + n_tokens
        doc["accum"], doc["accum_sha256"] = accum_file, sha
        self._write_manifest()
        if old_accum:
            (self.path / old_accum).unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        self.doc["digest"] = _doc_digest(self.doc)
        _write_bytes(self.path / RUN_FILE, json.dumps(self.doc, indent=1).encode())
        _fsync_dir(self.path)


def _read_table(root: Path, doc: dict, rel: str, columns: Sequence[str] | None = None):
    """A committed Parquet table of the run, checked first (``checked_file``)."""
    pa, pq = _pa()
    path = checked_file(root, doc, rel)
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _damaged(root, rel, f"cannot be read as a table ({str(e).splitlines()[0] if str(e) else e})") from None


def _open_arrays(root: Path, doc: dict, rel: str):
    """A committed safetensors file of the run, checked first, opened for reading single tensors."""
    from safetensors import SafetensorError, safe_open

    path = checked_file(root, doc, rel)
    try:
        return safe_open(str(path), "numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise _damaged(root, rel, f"cannot be read ({e})") from None


def _get_tensor(root: Path, doc: dict, rel: str, key: str) -> np.ndarray:
    from safetensors import SafetensorError

    with _open_arrays(root, doc, rel) as st:
        try:
            return st.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise _damaged(root, rel, f"cannot be read ({e})") from None


def _committed_ids(path: Path, doc: dict) -> set[str]:
    out: set[str] = set()
    for s in doc["shards"]:
        t = _read_table(path, doc, f"index/{s['name']}.parquet", columns=["prompt_id"])
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
            pa, _ = _pa()
            tables = [_read_table(self.path, self.doc, f"index/{s['name']}.parquet") for s in self.shards]
            try:
                self._index = pa.concat_tables(tables) if tables else None
            except pa.ArrowException as e:
                raise ProfileError(f"{self.path}: the index tables do not fit together ({e})") from None
            n = np.zeros(0, np.int64) if self._index is None else self._index.column("n_tokens").to_numpy()
            if len(n) != self.doc["n_prompts"] or int(n.sum()) != self.doc["n_tokens"]:
                raise ProfileError(f"{self.path}: the index tables do not match {RUN_FILE} (prompt or token counts)")
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
            self._tokens_cache = (s, _read_table(self.path, self.doc, f"tokens/{self.shards[s]['name']}.parquet"))
        return self._tokens_cache[1]

    def token_part(self, s: int, column: str) -> np.ndarray:
        """One shard's token column: [T_s], or [T_s, width] for the fixed-size list columns."""
        pa, _ = _pa()
        rel = f"tokens/{self.shards[s]['name']}.parquet"
        t = _read_table(self.path, self.doc, rel, columns=[column])
        if t.num_rows != self.shards[s]["n_tokens"]:
            raise _damaged(self.path, rel, f"has {t.num_rows} rows, {self.shards[s]['n_tokens']} tokens were committed")
        col = t.column(column).combine_chunks()
        if isinstance(col.type, pa.FixedSizeListType):
            return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
        return col.to_numpy(zero_copy_only=False)

    def vector_keys(self) -> dict[str, tuple[int, str]]:
        """Per-prompt vectors-tier names (thumbnails, full matrices) with global prompt numbers -> (shard, name)."""
        if self._vec_keys is None:
            self._vec_keys = {}
            for s, sh in enumerate(self.shards):
                rel = f"vectors/{sh['name']}.safetensors"
                if rel not in sh["files"]:
                    continue
                with _open_arrays(self.path, self.doc, rel) as st:
                    for k in st.keys():
                        if k.startswith(("attn.thumb.p", "attn.full.p")):
                            head, rest = k.split(".p", 1)
                            idx, _, tail = rest.partition(".")
                            g = f"{head}.p{int(idx) + sh['prompt0']}" + (f".{tail}" if tail else "")
                            self._vec_keys[g] = (s, k)
        return self._vec_keys

    def tensor(self, s: int, key: str) -> np.ndarray:
        return _get_tensor(self.path, self.doc, f"vectors/{self.shards[s]['name']}.safetensors", key)


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
            out = lazy(lambda s: d.tensor(s, name), 2, (Ly, H, T), np.float32)
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
    path = Path(path)
    doc = _read_manifest(path)
    accum = _load_accum(path, doc)
    for s in doc["shards"]:  # every file is there and of its committed size; its contents are checked when read
        for rel in s["files"]:
            st = _lstat_inside(path, rel)
            size = (s.get("checksums") or {}).get(rel, {}).get("size")
            if size is not None and st.st_size != size:
                raise _damaged(path, rel, f"has {st.st_size} bytes, {size} were committed")
    data = _RunData(path, doc)
    meta = dict(doc["meta"])
    meta["run_status"] = doc.get("status")
    return Profile(meta=meta, prompts=_RunPrompts(data), arrays=_RunArrays(data, accum))


def _load_accum(path: Path, doc: dict) -> dict[str, np.ndarray]:
    """The run's accumulators, checked against their checksum, with the shapes the run's geometry implies."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if not doc.get("accum"):
        return {}
    rel = doc["accum"]
    f = checked_file(path, doc, rel)
    try:
        accum = dict(load(f.read_bytes()))
    except (SafetensorError, OSError, ValueError) as e:
        raise _damaged(path, rel, f"cannot be read ({e})") from None
    Ly, H = doc["meta"]["n_layers"], doc["meta"]["n_heads"]
    for name, a in accum.items():
        if name in ("attn.hist_all", "attn.hist_log", "attn.moments", "attn.dist", "attn.row_sums") and (
            a.shape[:2] != (Ly, H)
        ):
            raise _damaged(path, rel, f"holds {name} of shape {a.shape}, not [{Ly}, {H}, ...]")
    return accum


def run_tables(path: str | os.PathLike) -> dict[str, object]:
    """Where the tables of a run are, for SQL: Parquet globs of index/prompts/tokens, and the heads and neurons
    tables (pyarrow, from the accumulators)."""
    pa, _ = _pa()
    path = Path(path)
    prof = load_run(path)
    doc = prof.arrays.data.doc
    Ly, H = prof.n_layers, prof.n_heads
    out: dict[str, object] = {}
    for part in TABLES:  # every table is checked before DuckDB reads it (hashed once, then while unchanged)
        rels = [rel for s in doc["shards"] for rel in s["files"] if rel.startswith(part + "/")]
        out[part] = [str(f) for f in checked_files(path, doc, rels, persist=True)]
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
    pa, _ = _pa()
    docs = [_read_manifest(Path(s)) for s in sources]
    if not docs:
        raise RunError("merge needs at least one run")
    target = Path(out).resolve()
    for s in sources:
        src = Path(s).resolve()
        if src == target or target.is_relative_to(src) or src.is_relative_to(target):
            raise RunError(f"merge --out {out} is (or lies in, or holds) the input run {s}: choose a new --out")
    first = docs[0]
    for s, d in zip(sources[1:], docs[1:]):
        _check_identity(first, d["meta"], Path(s), "merge")
    for s, d in zip(sources, docs):
        if d.get("status") != "complete":
            raise RunError(f"{s} is an unfinished run: finish it with --resume before merging")
    owner: dict[str, str] = {}  # a prompt is in a run once: the inputs must not share one
    for s, d in zip(sources, docs):
        for pid in _committed_ids(Path(s), d):
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
        for src, d in zip(sources, docs):
            src = Path(src)
            accum = _load_accum(src, d)
            for sh in d["shards"]:
                p0, t0 = w.doc["n_prompts"], w.doc["n_tokens"]
                name = w.next_shard[0]
                files = []
                for rel in sh["files"]:
                    part = rel.split("/")[0]
                    if part == "vectors" and not keep:
                        continue
                    dst = w.path / part / (name + rel[len(part) + 1 + len(sh["name"]) :])
                    if part in TABLES:
                        t = _read_table(src, d, rel)
                        t = t.set_column(
                            t.schema.get_field_index("prompt"),
                            "prompt",
                            pa.compute.add(t.column("prompt"), pa.scalar(p0 - sh["prompt0"], pa.int64())),
                        )
                        if "token_offset" in t.column_names:  # older runs stored it; the SQL view computes it
                            t = t.drop_columns(["token_offset"])
                        _write_parquet(t, dst)
                    else:
                        shutil.copyfile(checked_file(src, d, rel), dst)
                    files.append(f"{part}/{dst.name}")
                w.doc["shards"].append(
                    {"name": name, "n_prompts": sh["n_prompts"], "n_tokens": sh["n_tokens"], "prompt0": p0}
                    | {"token0": t0, "files": files, "checksums": {f: _checksum(w.path / f) for f in files}}
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
    doc = _read_manifest(path)
    bad: list[Damage] = []
    pa, pq = _pa()
    jobs = [(None, doc["accum"])] if doc.get("accum") else []
    jobs += [(s["name"], rel) for s in doc["shards"] for rel in s["files"]]
    shards = {s["name"]: s for s in doc["shards"]}
    for name, rel in jobs:
        try:
            _VERIFIED.pop(str((path / rel).resolve()), None)
            f = checked_file(path, doc, rel)
            if rel.endswith(".parquet"):
                rows = pq.ParquetFile(f).metadata.num_rows
                want = shards[name]["n_tokens" if rel.startswith("tokens/") else "n_prompts"]
                want *= doc["meta"]["n_layers"] * doc["meta"]["n_heads"] if rel.startswith("prompts/") else 1
                if rows != want:
                    raise _damaged(path, rel, f"has {rows} rows, {want} were committed")
            elif rel.startswith("vectors/"):
                with _open_arrays(path, doc, rel) as st:
                    st.keys()
            else:
                _load_accum(path, doc)
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
