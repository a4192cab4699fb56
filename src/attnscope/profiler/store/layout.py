"""The run layout: its names and constants, ``run.json`` (read, checked against its digest, naming only the run's
own files), and the one way to open a committed file (no symbolic link, size and sha256 as committed)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnscope.kernels.stats import ACCUMULATORS, ROW_SUMS

from ..columns import TOKEN_IDS
from ..data import ProfileError
from .direct import known_sha256, remember, write_file

# the accumulators of shape [Ly, H, ...]
_PER_HEAD = tuple(a.key for a in ACCUMULATORS if a.shape[:2] == ("Ly", "H"))

RUN_FILE = "run.json"
RUN_FORMAT = "attnscope-run"
RUN_SCHEMA = 2  # 2: run.json carries its own digest and every shard file's size and sha256
READ_SCHEMAS = (1, 2)  # 1: no checksums of the shard files (they are read unverified) and no digest
LOCK_FILE = ".lock"
STAGING = ".staging"  # shard files written ahead of their commit (by Ray actors)
PARTS = ("accum", "index", "prompts", "tokens", "vectors", "spans")
TABLES = ("index", "prompts", "tokens")  # every shard has these
OPTIONAL_TABLES = ("spans",)  # a shard of prompts with named spans has these too (one row per prompt, layer, head,
# query span, key span: ``data.SPAN_COLUMNS``)
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


class RunError(ProfileError):
    """A run directory cannot be written: busy, foreign, read-only, or of another model or settings."""


def pyarrow_modules():
    """pyarrow and pyarrow.parquet, imported on first use (a dependency, but a slow import)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


@dataclass
class Shard:
    """The statistics of a contiguous slice of the corpus, in corpus order (P prompts, T tokens)."""

    prompt_ids: list[str]
    sha256: list[str]
    previews: list[str]
    lengths: np.ndarray  # [P] int64
    token_text: list[str]  # [T]
    per_token: dict[
        str, np.ndarray
    ]  # columns.TOKEN_COLUMNS key -> [T] or [Ly, T(, k)] (the lens ones with --logit-lens)
    row_means: np.ndarray  # [P, Ly, H, V] float32: mean of each vector over the prompt's tokens
    distance: np.ndarray  # [P, Ly, H] float64: mean attention distance
    accum: dict[str, np.ndarray]  # data.ACCUM_NAMES; neuron_argmax counts the shard's own tokens from 0
    vectors: dict[str, np.ndarray] | None = None  # attn.<v> [Ly, H, T]
    thumbs: list[np.ndarray] | None = None  # per prompt [Ly, H, r, r]
    full: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)  # (prompt, layer, head) -> [L, L]
    lens_vocab: dict[int, str] | None = None  # decoded text of every lens top-1 id of the shard
    spans: list | None = None  # per prompt its named spans in tokens, or None (``profiler.spans``)
    span_attn: list | None = None  # per prompt [Ly, H, Sq, Sk, 2] float32 span attention (mass, top1), or None
    head_scores: np.ndarray | None = None  # [P, Ly, H, len(stats.HEAD_SCORES)] float64 (NaN: not defined)

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def token_ids(self) -> np.ndarray:
        return self.per_token[TOKEN_IDS]


# -- small file helpers --
def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    write_chunks(path, [data])


def write_chunks(path: Path, chunks: Iterable[bytes | memoryview]) -> str:
    """Write the bytes-like ``chunks`` one after another as ``path`` (atomically, fsynced, past the page cache where
    the file system allows: ``direct.write_file``); returns their sha256."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        sha = write_file(tmp, chunks)
        os.replace(tmp, path)
    except BaseException:  # a full disk leaves no half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    remember(path, sha)
    return sha


def write_parquet(table, path: Path) -> str:
    """Write a pyarrow table as a zstd Parquet file at ``path`` (atomically, fsynced); returns its sha256.

    Dictionary encoding only for text columns: on the float and index columns it made the files larger and their
    writing twice as slow."""
    pa, pq = pyarrow_modules()
    sink = pa.BufferOutputStream()
    text = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    pq.write_table(table, sink, compression="zstd", use_dictionary=text)
    return write_chunks(path, [sink.getvalue()])


# numpy dtype -> safetensors dtype, in safetensors' own order of dtypes (its writer lays tensors out by that order,
# last first, then by name: every offset is aligned to its item size)
_SAFETENSORS_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16", "int32": "I32",
    "uint32": "U32", "float32": "F32", "float64": "F64", "int64": "I64", "uint64": "U64",
}  # fmt: skip
_DTYPE_RANK = {name: i for i, name in enumerate(_SAFETENSORS_DTYPES)}


def save_arrays(arrays: dict[str, np.ndarray], path: Path) -> str:
    """Write ``arrays`` as one safetensors file (atomically, fsynced); returns its sha256.

    Written straight from the arrays, header then each array's bytes, hashed as they go: building the file in memory
    first (``safetensors.numpy.save`` and its ``bytes`` copy) touched ~100 MB of fresh pages per shard commit of the
    50 MB accumulators, 0.2-0.8 s each on a 2-core machine. The bytes are those ``safetensors.numpy.save`` writes.
    """
    order = sorted(arrays, key=lambda k: (-_DTYPE_RANK[np.dtype(arrays[k].dtype).name], k))
    data = {k: np.ascontiguousarray(arrays[k]).astype(np.dtype(arrays[k].dtype).newbyteorder("<"), copy=False)
            for k in order}  # fmt: skip
    header, offset = {}, 0
    for k, v in data.items():
        header[k] = {
            "dtype": _SAFETENSORS_DTYPES[v.dtype.name],
            "shape": list(v.shape),
            "data_offsets": [offset, offset + v.nbytes],
        }
        offset += v.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    body = (memoryview(v.reshape(-1)).cast("B") for v in data.values())
    return write_chunks(path, (struct.pack("<Q", len(head)), head, *body))


def is_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory (it holds a ``run.json`` of this format)."""
    try:
        with open(Path(path) / RUN_FILE) as f:
            return json.load(f).get("format") == RUN_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def doc_digest(doc: dict) -> str:
    """sha256 of ``run.json``'s contents without its own digest, in a canonical form (whitespace-free)."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def shard_files(name: str) -> set[str]:
    """The files a shard named ``name`` may have, relative to the run: nothing else is ever opened."""
    return {f"{part}/{name}.parquet" for part in TABLES + OPTIONAL_TABLES} | {f"vectors/{name}.safetensors"}


def read_manifest(path: Path) -> dict:
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

    if doc["schema_version"] >= 2 and doc.get("digest") != doc_digest(doc):
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
    if accum is None and shards:
        raise bad("it has shards but no accumulators")
    if doc["schema_version"] < 2 and ("digest" in doc or any("checksums" in s for s in shards)):
        raise bad("it says schema 1 but carries the checksums of schema 2")
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


def damaged(root: Path, rel: str, what: str) -> ProfileError:
    return ProfileError(
        f"{root / rel} {what}: the run's committed files cannot be trusted; `attnscope verify {root}` lists every "
        f"damaged shard (--resume cannot restore a committed shard)"
    )


def lstat_inside(root: Path, rel: str) -> os.stat_result:
    """``lstat`` of ``root/rel`` after checking that neither the file nor its folder is a symbolic link."""
    part = rel.split("/")[0]
    try:
        pst = os.lstat(root / part)
        if stat.S_ISLNK(pst.st_mode) or not stat.S_ISDIR(pst.st_mode):
            raise damaged(root, part, "is a symbolic link or not a folder")
        st = os.lstat(root / rel)
    except FileNotFoundError:
        raise damaged(root, rel, "is missing") from None
    except OSError as e:
        raise damaged(root, rel, f"cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise damaged(root, rel, "is a symbolic link or not a regular file")
    return st


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_checksum(path: Path) -> dict:
    """Size and sha256 of ``path`` (remembered from writing it, where this process did: not read back)."""
    return {"size": os.path.getsize(path), "sha256": known_sha256(path) or _sha256_file(path)}


def _expected(root: Path, doc: dict, rel: str) -> dict:
    if rel == doc.get("accum"):
        return {"sha256": doc.get("accum_sha256")}
    for s in doc["shards"]:
        if rel in s["files"]:
            return (s.get("checksums") or {}).get(rel, {})
    raise damaged(root, rel, "is not a file of this run")


def _stat_committed(root: Path, doc: dict, rel: str) -> tuple[dict, os.stat_result]:
    """What ``run.json`` records of ``rel``, and its ``lstat`` once it is known to be there, no link, and of its
    committed size."""
    expect = _expected(root, doc, rel)
    st = lstat_inside(root, rel)
    if "size" in expect and st.st_size != expect["size"]:
        raise damaged(root, rel, f"has {st.st_size} bytes, {expect['size']} were committed")
    return expect, st


def check_present(root: Path, doc: dict) -> None:
    """Every committed shard file is there, no link, and of its committed size (cheap: no file is read)."""
    for s in doc["shards"]:
        for rel in s["files"]:
            _stat_committed(root, doc, rel)


def forget_verified(path: Path) -> None:
    """Forget that ``path`` was verified in this process (``verify_run`` hashes every file afresh)."""
    _VERIFIED.pop(str(path.resolve()), None)


def checked_files(root: Path, doc: dict, rels: Sequence[str], persist: bool = False) -> list[Path]:
    """The paths of ``rels``, files of the run that ``run.json`` names, once each is known to be the file that
    was committed: no symbolic link, its size and sha256 as recorded (hashed on its first read, then trusted while
    its fingerprint stays the same: in this process, and with ``persist`` in the next ones too). ``ProfileError``
    names the first file that is not."""
    seen = _load_verified(root) if persist else {}
    changed = False
    out = []
    for rel in rels:
        expect, st = _stat_committed(root, doc, rel)
        path = root / rel
        out.append(path)
        if not expect.get("sha256"):
            continue  # a run of schema 1: no checksum to verify against
        key, fp = str(path.resolve()), _fingerprint(st)
        if _VERIFIED.get(key) == fp or seen.get(rel) == [*fp, expect["sha256"]]:
            _VERIFIED[key] = fp
            continue
        try:
            sha = _sha256_file(path)
        except OSError as e:
            raise damaged(root, rel, f"cannot be read ({e.strerror})") from None
        if sha != expect["sha256"]:
            raise damaged(root, rel, "does not match its checksum in run.json (corrupted or replaced)")
        _VERIFIED[key] = fp
        seen[rel], changed = [*fp, sha], True
    if persist and changed:
        _save_verified(root, seen)
    return out


def checked_file(root: Path, doc: dict, rel: str) -> Path:
    """``checked_files`` of one file."""
    return checked_files(root, doc, [rel])[0]


def read_table(root: Path, doc: dict, rel: str, columns: Sequence[str] | None = None):
    """A committed Parquet table of the run, checked first (``checked_file``)."""
    pa, pq = pyarrow_modules()
    path = checked_file(root, doc, rel)
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise damaged(root, rel, f"cannot be read as a table ({str(e).splitlines()[0] if str(e) else e})") from None
    want = table_rows(doc, rel)
    if want is not None and table.num_rows != want:
        raise damaged(root, rel, f"has {table.num_rows} rows, {want} were committed")
    return table


def table_rows(doc: dict, rel: str) -> int | None:
    """How many rows the committed table ``rel`` holds, by ``run.json``: a prompt a row in index, a token a row in
    tokens, a (prompt, layer, head) a row in prompts; None for spans (their count depends on the spans; the file's
    sha256 in ``run.json`` guards it)."""
    part, name = rel.split("/")[0], rel.split("/")[1].split(".")[0]
    if part in OPTIONAL_TABLES:
        return None
    s = next(s for s in doc["shards"] if s["name"] == name)
    if part == "tokens":
        return s["n_tokens"]
    return s["n_prompts"] * (doc["meta"]["n_layers"] * doc["meta"]["n_heads"] if part == "prompts" else 1)


def open_arrays(root: Path, doc: dict, rel: str):
    """A committed safetensors file of the run, checked first, opened for reading single tensors."""
    from safetensors import SafetensorError, safe_open

    path = checked_file(root, doc, rel)
    try:
        return safe_open(str(path), "numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise damaged(root, rel, f"cannot be read ({e})") from None


def read_tensor(root: Path, doc: dict, rel: str, key: str) -> np.ndarray:
    from safetensors import SafetensorError

    with open_arrays(root, doc, rel) as st:
        try:
            return st.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise damaged(root, rel, f"cannot be read ({e})") from None


def read_committed_ids(path: Path, doc: dict) -> set[str]:
    out: set[str] = set()
    for s in doc["shards"]:
        t = read_table(path, doc, f"index/{s['name']}.parquet", columns=["prompt_id"])
        out.update(t.column("prompt_id").to_pylist())
    return out


def committed_ids(path: str | os.PathLike) -> set[str]:
    """The ``prompt_id`` of every prompt committed to the run at ``path``."""
    return read_committed_ids(Path(path), read_manifest(Path(path)))


def read_accum(path: Path, doc: dict) -> dict[str, np.ndarray]:
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
        raise damaged(path, rel, f"cannot be read ({e})") from None
    Ly, H = doc["meta"]["n_layers"], doc["meta"]["n_heads"]
    sums = accum.get(ROW_SUMS.key)
    if sums is None or sums.shape != (Ly, H, len(doc["meta"]["vectors"])):
        raise damaged(path, rel, f"does not hold the row sums of {Ly} layers x {H} heads x the run's vectors")
    for name, a in accum.items():
        if name in _PER_HEAD and (a.shape[:2] != (Ly, H)):
            raise damaged(path, rel, f"holds {name} of shape {a.shape}, not [{Ly}, {H}, ...]")
    return accum
