"""Reading a run: ``load_run`` gives a ``Profile`` whose per-prompt and per-token data are read on first use."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from attnscope.kernels.stats import (
    DIST,
    EXPERT_NEURON_ARGMAX,
    EXPERT_NEURON_MAX,
    EXPERT_NEURON_SUM,
    EXPERT_NEURON_SUMSQ,
    EXPERT_TOKENS,
    EXPERT_WEIGHT,
    NEURON_ARGMAX,
    NEURON_MAX,
    NEURON_SUM,
    NEURON_SUMSQ,
    PER_PROMPT_PREFIXES,
    RECV_SUM,
    ROW_SUMS,
    SPAN_FIELDS,
    SPAN_PREFIX,
    THUMB_PREFIX,
    WINDOW_RECV,
    renumber_key,
    span_key,
)

from ..columns import token_columns
from ..data import Profile, ProfileError, mean_distance
from .layout import (
    OPTIONAL_TABLES,
    RUN_FILE,
    TABLES,
    check_present,
    checked_files,
    damaged,
    open_arrays,
    pyarrow_modules,
    read_accum,
    read_manifest,
    read_table,
    read_tensor,
    table_rows,
)


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
            pa, _ = pyarrow_modules()
            tables = [read_table(self.path, self.doc, f"index/{s['name']}.parquet") for s in self.shards]
            try:
                self._index = pa.concat_tables(tables, promote_options="default") if tables else None
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
            self._tokens_cache = (s, read_table(self.path, self.doc, f"tokens/{self.shards[s]['name']}.parquet"))
        return self._tokens_cache[1]

    def token_part(self, s: int, column: str) -> np.ndarray:
        """One shard's token column: [T_s], or [T_s, width] for the fixed-size list columns."""
        pa, _ = pyarrow_modules()
        rel = f"tokens/{self.shards[s]['name']}.parquet"
        t = read_table(self.path, self.doc, rel, columns=[column])
        col = t.column(column).combine_chunks()
        if isinstance(col.type, pa.FixedSizeListType):
            return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
        return col.to_numpy(zero_copy_only=False)

    def prompt_spans(self, i: int) -> dict | None:
        """Prompt ``i``'s named spans in tokens (name -> [[start, end], ...]), or None."""
        idx = self.index()
        if "spans" not in idx.column_names:
            return None
        v = idx.column("spans")[i].as_py()
        return json.loads(v) if v else None

    def span_keys(self) -> dict[str, int]:
        """``stats.span_key`` of every prompt with spans -> its prompt number."""
        idx = self.index()
        if idx is None or "spans" not in idx.column_names:
            return {}
        return {span_key(i): i for i, v in enumerate(idx.column("spans").to_pylist()) if v}

    def span_array(self, i: int) -> np.ndarray:
        """Prompt ``i``'s [Ly, H, Sq, Sk, 2] span attention, from its shard's spans table."""
        s = self.shard_of(i)
        name = self.shards[s]["name"]
        t = read_table(self.path, self.doc, f"spans/{name}.parquet", columns=["prompt", *SPAN_FIELDS])
        rows = np.flatnonzero(t.column("prompt").to_numpy() == i)
        Sk = len(self.prompt_spans(i))
        a = np.stack([t.column(c).to_numpy()[rows] for c in SPAN_FIELDS], -1)
        return a.astype(np.float32).reshape(int(self.meta["n_layers"]), int(self.meta["n_heads"]), Sk + 1, Sk, 2)

    def vector_keys(self) -> dict[str, tuple[int, str]]:
        """Per-prompt vectors-tier names (thumbnails, full matrices) with global prompt numbers -> (shard, name)."""
        if self._vec_keys is None:
            self._vec_keys = {}
            for s, sh in enumerate(self.shards):
                rel = f"vectors/{sh['name']}.safetensors"
                if rel not in sh["files"]:
                    continue
                with open_arrays(self.path, self.doc, rel) as st:
                    for k in st.keys():
                        if k.startswith(PER_PROMPT_PREFIXES):
                            self._vec_keys[renumber_key(k, sh["prompt0"])] = (s, k)
        return self._vec_keys

    def tensor(self, s: int, key: str) -> np.ndarray:
        return read_tensor(self.path, self.doc, f"vectors/{self.shards[s]['name']}.safetensors", key)


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
        cols = token_columns(bool(meta.get("logit_lens")), bool(meta.get("experts_per_token")))
        self.columns = {c.key: c for c in cols if c.key is not None}
        self.token_names = [*self.columns, "prompts.offsets"]

    def _names(self) -> list[str]:
        return (
            list(self.accum) + self.token_names + self.vec_names + list(self.data.vector_keys())
            + list(self.data.span_keys())
        )  # fmt: skip

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name) -> bool:
        if name in self.accum or name in self.token_names or name in self.vec_names:
            return True
        if isinstance(name, str) and name.startswith(SPAN_PREFIX):
            return name in self.data.span_keys()
        return isinstance(name, str) and name.startswith("attn.") and name in self.data.vector_keys()

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.accum:
            return self.accum[name]
        if name in self.cache:
            return self.cache[name]
        d, Ly, H = self.data, int(self.data.meta["n_layers"]), int(self.data.meta["n_heads"])
        T = int(d.doc["n_tokens"])
        token0 = np.array([sh["token0"] for sh in d.shards] + [T], dtype=np.int64)

        def lazy(load, axis, shape, dtype):
            return LazyTokenArray(load, token0, axis, shape, dtype)

        if name == "prompts.offsets":
            out = d.offsets()
        elif name in self.columns:
            c = self.columns[name]
            k = int(d.meta[c.width]) if c.width else 1
            shape = (Ly, T, k) if c.width else (Ly, T) if c.per_layer else (T,)

            def load(s, c=c, k=k):  # one shard's [T_s] or [Ly, T_s(, k)] from its column
                a = d.token_part(s, c.column)  # [T_s], or [T_s, Ly (* k)] for a list column
                if c.per_layer:
                    a = np.ascontiguousarray(
                        a.reshape(-1, Ly, k).transpose(1, 0, 2) if c.width else a.reshape(-1, Ly).T
                    )
                return a.astype(c.dtype, copy=False)

            out = lazy(load, c.token_axis, shape, c.dtype)
        elif name in self.vec_names:
            out = lazy(lambda s: d.tensor(s, name), 2, (Ly, H, T), np.float32)
        elif name.startswith(SPAN_PREFIX) and name in d.span_keys():
            return d.span_array(d.span_keys()[name])  # per prompt: small, not cached
        elif name.startswith("attn.") and name in d.vector_keys():
            s, key = d.vector_keys()[name]
            return d.tensor(s, key)  # per prompt: small, not cached
        elif name.startswith("attn.") and name[5:] in d.meta["vectors"] and ROW_SUMS.key in self.accum:
            i = list(d.meta["vectors"]).index(name[5:])
            means = self.accum[ROW_SUMS.key][..., i] / max(T, 1)  # [Ly, H]
            return TokenMeansOnly(
                name,
                means,
                T,
                f"{name}: this run did not keep the per-token per-head vectors (the vectors tier, opt-in for "
                "corpora): only their mean over all tokens is kept (Profile.head_means), and each prompt's mean is "
                "in prompts/*.parquet; profile again with --keep vectors for per-token views",
            )
        elif name.startswith(THUMB_PREFIX):
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
        out = {
            "id": row["prompt_id"],
            "sha256": row["sha256"],
            "n_tokens": row["n_tokens"],
            "preview": row["preview"],
            "tokens": text,
        }
        spans = d.prompt_spans(i)
        if spans is not None:
            out["spans"] = spans
        return out

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
    doc = read_manifest(path)
    accum = read_accum(path, doc)
    check_present(path, doc)  # sizes now; each file's contents when it is first read
    data = _RunData(path, doc)
    meta = dict(doc["meta"])
    meta["run_status"] = doc.get("status")
    return Profile(meta=meta, prompts=_RunPrompts(data), arrays=_RunArrays(data, accum))


def run_tables(path: str | os.PathLike, key_scores: bool = False) -> dict[str, object]:
    """Where the tables of a run are, for SQL: Parquet globs of index/prompts/tokens, and the heads and neurons
    tables (pyarrow, from the accumulators); with ``key_scores`` also that table (``_key_score_table``)."""
    pa, pq = pyarrow_modules()
    path = Path(path)
    prof = load_run(path)
    doc = prof.arrays.data.doc
    Ly, H = prof.n_layers, prof.n_heads
    out: dict[str, object] = {}
    for part in TABLES + OPTIONAL_TABLES:  # every table is checked before DuckDB reads it (hashed once, then while
        # unchanged)
        rels = [rel for s in doc["shards"] for rel in s["files"] if rel.startswith(part + "/")]
        out[part] = [str(f) for f in checked_files(path, doc, rels, persist=True)]
        for rel, f in zip(rels, out[part]):
            rows = pq.ParquetFile(f).metadata.num_rows  # the footer only
            if table_rows(doc, rel) is not None and rows != table_rows(doc, rel):
                raise damaged(path, rel, f"has {rows} rows, {table_rows(doc, rel)} were committed")
    heads = {"layer": np.repeat(np.arange(Ly), H), "head": np.tile(np.arange(H), Ly)}
    if doc["shards"]:
        for v, m in prof.head_means().items():
            heads[v] = m.reshape(-1)
        heads[DIST.summary] = mean_distance(prof.arrays[DIST.key]).reshape(-1)
    out["heads"] = pa.table(heads)
    neurons: dict[str, np.ndarray] = {}
    if NEURON_MAX.key in prof.arrays:
        mx = prof.arrays[NEURON_MAX.key]
        n = max(prof.n_tokens, 1)
        mean = prof.arrays[NEURON_SUM.key] / n
        neurons = {
            "layer": np.repeat(np.arange(mx.shape[0]), mx.shape[1]),
            "neuron": np.tile(np.arange(mx.shape[1]), mx.shape[0]),
            "max": mx.reshape(-1),
            "argmax_token": prof.arrays[NEURON_ARGMAX.key].reshape(-1),
            "mean": mean.reshape(-1),
            "std": np.sqrt(np.maximum(prof.arrays[NEURON_SUMSQ.key] / n - mean**2, 0)).reshape(-1),
        }
    out["neurons"] = pa.table(neurons) if neurons else None
    out["experts"] = None
    if EXPERT_TOKENS.key in prof.arrays:  # MoE layers: each expert's load (dense layers of the model are absent)
        tok, w = prof.arrays[EXPERT_TOKENS.key], prof.arrays[EXPERT_WEIGHT.key]  # [Ly, E]
        moe = np.flatnonzero(tok.sum(1) > 0)
        E = tok.shape[1]
        share = tok[moe] / np.maximum(tok[moe].sum(1, keepdims=True), 1)
        out["experts"] = pa.table(
            {
                "layer": np.repeat(moe, E),
                "expert": np.tile(np.arange(E), len(moe)),
                "tokens": tok[moe].reshape(-1),
                "share": share.reshape(-1),
                "weight_sum": w[moe].reshape(-1),
                "mean_weight": (w[moe] / np.maximum(tok[moe], 1)).reshape(-1),
            }
        )
    out["expert_neurons"] = None
    if EXPERT_NEURON_MAX.key in prof.arrays:  # each expert's neurons over the tokens routed to it
        tok = prof.arrays[EXPERT_TOKENS.key]
        moe = np.flatnonzero(tok.sum(1) > 0)
        mx = prof.arrays[EXPERT_NEURON_MAX.key][moe]  # [Ly_moe, E, Fe]
        _, E, Fe = mx.shape
        n = np.maximum(tok[moe], 1)[:, :, None].astype(np.float64)
        mean = prof.arrays[EXPERT_NEURON_SUM.key][moe] / n
        hit = np.broadcast_to(tok[moe][:, :, None] > 0, mx.shape)
        out["expert_neurons"] = pa.table(
            {
                "layer": np.repeat(moe, E * Fe),
                "expert": np.tile(np.repeat(np.arange(E), Fe), len(moe)),
                "neuron": np.tile(np.arange(Fe), len(moe) * E),
                "tokens": np.broadcast_to(tok[moe][:, :, None], mx.shape).reshape(-1),
                "max": pa.array(mx.reshape(-1), mask=~hit.reshape(-1)),
                "argmax_token": pa.array(prof.arrays[EXPERT_NEURON_ARGMAX.key][moe].reshape(-1), mask=~hit.reshape(-1)),
                "mean": pa.array(mean.reshape(-1), mask=~hit.reshape(-1)),
                "std": pa.array(
                    np.sqrt(np.maximum(prof.arrays[EXPERT_NEURON_SUMSQ.key][moe] / n - mean**2, 0)).reshape(-1),
                    mask=~hit.reshape(-1),
                ),
            }
        )
    out["key_scores"] = _key_score_table(prof, path) if key_scores else None
    return out


def _key_score_table(prof: Profile, path: Path):
    """The rows of the ``key_scores`` SQL view (pyarrow), from the vectors tier: one per (prompt, layer, head, key
    position), with ``snapkv``, the attention the prompt's last ``OBS_WINDOW`` rows give the key (SnapKV's and
    PyramidKV's observation-window score, Li et al. 2024), and ``h2o``, the attention all its rows give it (H2O's
    accumulated score, Zhang et al. 2023). ``ProfileError`` for a run that did not keep the vectors."""
    pa, _ = pyarrow_modules()
    d = prof.arrays.data
    if not d.doc.get("keep_vectors"):
        raise ProfileError(
            f"{path}: key_scores reads the per-key vectors, which this run did not keep (the vectors tier: profile "
            "with --keep vectors)"
        )
    Ly, H = prof.n_layers, prof.n_heads
    off = d.offsets()
    parts = []
    for s, sh in enumerate(d.shards):
        p0, p1 = int(sh["prompt0"]), int(sh["prompt0"]) + int(sh["n_prompts"])
        n = np.diff(off[p0 : p1 + 1])  # tokens of each prompt
        T = int(n.sum())
        prompt = np.repeat(np.arange(p0, p1), n)  # [T_s]
        position = np.arange(T) - np.repeat(off[p0:p1] - off[p0], n)
        cols = {
            "prompt": np.repeat(prompt, Ly * H),
            "layer": np.tile(np.repeat(np.arange(Ly, dtype=np.int32), H), T),
            "head": np.tile(np.arange(H, dtype=np.int32), T * Ly),
            "position": np.repeat(position, Ly * H).astype(np.int32),
        }
        for col, key in (("snapkv", WINDOW_RECV.key), ("h2o", RECV_SUM.key)):
            cols[col] = d.tensor(s, key).transpose(2, 0, 1).reshape(-1)  # [Ly, H, T_s] -> (token, layer, head)
        parts.append(pa.table(cols))
    if not parts:
        i32, f32 = pa.int32(), pa.float32()
        schema = pa.schema([("prompt", pa.int64()), ("layer", i32), ("head", i32), ("position", i32),
                            ("snapkv", f32), ("h2o", f32)])  # fmt: skip
        return schema.empty_table()
    return pa.concat_tables(parts)
