"""``Profile``: the reduced statistics of one or more prompts, mergeable, saved and loaded atomically.

This module imports numpy and safetensors only (no torch), so renderers can read a profile anywhere.

On disk (one directory): ``profile.safetensors`` holds every array, ``profile.json`` the metadata, the prompt
list and a SHA-256 of the arrays file (a profile whose two files disagree is refused). Arrays, with
Ly layers, H heads, T tokens of all prompts concatenated (prompt p owns ``offsets[p]:offsets[p+1]``):

    attn.<vector>                   [Ly, H, T] float32    each per-row vector of ``stats.VECTORS`` (``Stat.key``)
    stats.thumb_key(i)              [Ly, H, R, R] float32 average-pooled p of prompt i (R = min(thumb, L_i))
    stats.full_key(i, l, h)         [L_i, L_i] float32    full matrices of the heads the user chose to keep
    stats.span_key(i)               [Ly, H, Sq, Sk, 2]    span attention (mass, top1) of prompt i's named spans
                                                          (``prompts[i]["spans"]``: name -> token pieces)
    mlp.in_norm, mlp.out_norm       [Ly, T] float32       L2 norm of the down_proj input and output per token
    mlp.topk_idx, mlp.topk_val      [Ly, T, k]            neurons of largest |x| per token
    tokens.ids                      [T] int64
    tokens.logit_entropy            [T] float32           entropy of the next-token distribution (nats)
    lens.<field>                    [Ly, T]               the logit lens (``LENS_ARRAYS``), when it was on
    prompts.offsets                 [P + 1] int64

and the accumulators of ``stats.ACCUMULATORS`` (per layer and head, or per neuron; each with its shape, dtype and
fold declared there), which let a corpus run without the per-token vectors still draw every view of the whole run:
the pair histograms and moments, the distance buckets, the histograms and moments of the self and final weights
(``stats.LAMINAR``), the row sums of every vector, the thumbnails pooled in relative position, and the neurons'
sums, maxima and top contexts.

The final-token row of prompt p is ``arrays[stats.FINAL.key][..., offsets[p]:offsets[p+1]]`` (one value per key).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnscope.kernels.stats import (
    ACCUM_KEYS,
    LAMINAR,
    PER_PROMPT_PREFIXES,
    ROW_SUMS,
    SPAN_FIELDS,
    VECTOR_NAMES,
    VECTORS,
    renumber_key,
    span_key,
    span_names,
)

from .accum import combine_accum, topk_fold
from .columns import LENS_ARRAYS
from .columns import TOKEN_AXIS as COLUMN_AXIS

__all__ = [
    "SPAN_COLUMNS",
    "span_rows",
    "ACCUM_NAMES",
    "ATTN_VECTORS",
    "LENS_ARRAYS",
    "SCHEMA_VERSION",
    "TOKEN_AXIS",
    "Profile",
    "ProfileError",
    "combine_accum",
    "load_profile_dir",
    "mean_distance",
    "topk_fold",
]

SCHEMA_VERSION = 2  # 2: the head-role vectors attn.dup and attn.induction
FORMAT_NAME = "attnscope-profile"
ARRAYS_FILE = "profile.safetensors"
META_FILE = "profile.json"

ATTN_VECTORS = VECTOR_NAMES
ACCUM_NAMES = ACCUM_KEYS
# per-token arrays: name -> the axis that runs over the tokens of all prompts
TOKEN_AXIS = {s.key: 2 for s in VECTORS} | COLUMN_AXIS
# metadata that must agree for two profiles to be merged
_IDENTITY_KEYS = ("model_id", "config_digest", "weights_digest", "spec", "top_k", "vectors")


class ProfileError(ValueError):
    """A profile directory is missing, corrupted, foreign, or incompatible with another profile."""


SPAN_COLUMNS = ("prompt", "prompt_id", "layer", "head", "query_span", "key_span", *SPAN_FIELDS)


def span_rows(
    prompt0: int, prompt_ids: Sequence[str], spans: Sequence, arrays: Sequence, prompts: Sequence[int] | None = None
) -> dict[str, list]:
    """The ``spans`` table's columns (``SPAN_COLUMNS``) of prompts numbered from ``prompt0`` (or ``prompts``): one
    row per (prompt, layer, head, query span, key span); prompts without spans hold none."""
    cols: dict[str, list] = {c: [] for c in SPAN_COLUMNS}
    for n, (pid, sp, a) in enumerate(zip(prompt_ids, spans, arrays)):
        if sp is None or a is None:
            continue
        number = prompt0 + n if prompts is None else prompts[n]
        queries, keys = span_names(sp)
        Ly, H, Sq, Sk, _ = a.shape
        grid = np.indices((Ly, H, Sq, Sk)).reshape(4, -1)
        m = Ly * H * Sq * Sk
        cols["prompt"] += [number] * m
        cols["prompt_id"] += [pid] * m
        cols["layer"] += grid[0].tolist()
        cols["head"] += grid[1].tolist()
        cols["query_span"] += [queries[q] for q in grid[2]]
        cols["key_span"] += [keys[k] for k in grid[3]]
        for f, col in enumerate(SPAN_FIELDS):
            cols[col] += a[..., f].reshape(-1).tolist()
    return cols


def mean_distance(dist: np.ndarray) -> np.ndarray:
    """Mean attention distance (tokens) from distance buckets [..., 32], bucket k holding i - j + 1 in
    [2^k, 2^(k+1)): each bucket counts at its midpoint 1.5 * 2^k - 1.5; 0 where no mass."""
    mid = 1.5 * 2.0 ** np.arange(dist.shape[-1]) - 1.5
    mass = dist.sum(-1)
    return np.divide((dist * mid).sum(-1), mass, out=np.zeros_like(mass), where=mass > 0)


@dataclass
class Profile:
    """Reduced attention and down_proj statistics of a set of prompts for one model.

    Attributes:
        meta: model id, config and weights digests, geometry, dtypes, tokenizer, statistics spec, versions.
        prompts: one dict per prompt: ``sha256``, ``n_tokens``, ``preview`` and the decoded ``tokens``.
        arrays: name -> numpy array (see the module docstring for names and shapes).
    """

    meta: dict
    prompts: list[dict] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"Profile(model={self.meta.get('model_id')!r}, prompts={len(self.prompts)}, tokens={self.n_tokens}, "
            f"layers={self.n_layers}, heads={self.n_heads}, arrays={len(self.arrays)})"
        )

    # -- shape helpers --
    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.meta["n_heads"])

    @property
    def offsets(self) -> np.ndarray:
        return self.arrays["prompts.offsets"]

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def prompt_slice(self, i: int) -> slice:
        """Token-axis slice of prompt ``i``."""
        if not 0 <= i < len(self.prompts):
            raise IndexError(f"prompt index {i} out of range: the profile holds {len(self.prompts)} prompts")
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    # -- laminar profiles --
    def weights(self, which: str):
        """The weights a laminar kind draws (``"self"``: p_ii, ``"final"``: each final-token row), [layers, heads,
        tokens], or None where the profile holds only their additive histogram and moments (a corpus run without
        the vectors tier)."""
        lam = LAMINAR.get(which)
        if lam is None or lam.samples is None:
            kinds = [k for k, v in LAMINAR.items() if v.samples is not None]
            raise ValueError(f"which must be {_one_of(kinds)} to have weights, got {which!r}")
        return self.arrays[lam.samples.key] if lam.samples.key in self.arrays else None

    def laminar(
        self, which: str = "self", points: int = 300, head: int | None = None, lo: float = 0.0, hi: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer KDE of attention weights (the "laminar" profile).

        Args:
            which: a KDE kind of ``stats.LAMINAR``: ``"self"`` (diagonal p_ii), ``"final"`` (last token's row) or
                ``"all"`` (every causal pair).
            points: grid size, ``np.linspace(lo, hi, points)``.
            head: one head, or None to pool every head of a layer.
            lo, hi: grid range; [0, 1] as the seed draws it (part of the kernel mass of weights near 0 or 1
                falls outside it, so a curve integrates to 1 only over a wider range).

        Returns:
            ``(grid [points], density [layers, points])``: Gaussian KDE with Scott's bandwidth, equal to
            scipy.stats.gaussian_kde on the materialised weights (exactly for self/final; from the
            histogram for all, see ``attnscope.kernels.kde.BinnedKDE`` for its error bound).
        """
        from attnscope.kernels.kde import BinnedKDE, ExactKDE

        kinds = [k for k, v in LAMINAR.items() if v.kde]
        if which not in kinds:
            raise ValueError(f"which must be {_one_of(kinds)}, got {which!r}")
        if head is not None and not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range: the model has {self.n_heads} heads")
        lam = LAMINAR[which]
        heads = slice(None) if head is None else slice(head, head + 1)
        grid = np.linspace(lo, hi, points)
        weights = self.weights(which) if lam.samples is not None else None
        if weights is not None:
            samples = [weights[layer, heads].reshape(-1).astype(np.float64) for layer in range(self.n_layers)]
            return grid, ExactKDE(grid)(samples)
        # every pair, or a corpus run without the vectors tier: the same KDE from the additive histogram and moments
        if lam.hist not in self.arrays:
            raise ProfileError(f"this profile holds neither the {which} vectors nor their histogram")
        hist = self.arrays[lam.hist][:, heads].sum(1)  # [Ly, bins]
        mom = self.arrays[lam.moments][:, heads].sum(1)  # [Ly, 3]
        return grid, BinnedKDE(grid)(hist, mom)

    def head_means(self) -> dict[str, np.ndarray]:
        """Per (layer, head) mean over every token of each vector of ``stats.VECTORS``, [layers, heads] float64.

        Comes from the additive row sums (``stats.ROW_SUMS``), so it needs no per-token vector (a corpus run has
        none).
        """
        names = self.meta.get("vectors", list(VECTOR_NAMES))
        if ROW_SUMS.key in self.arrays:
            sums = self.arrays[ROW_SUMS.key]  # [Ly, H, V]
            return {v: sums[..., i] / max(self.n_tokens, 1) for i, v in enumerate(names)}
        return {v: self.arrays[f"attn.{v}"].mean(-1).astype(np.float64) for v in names}

    def span_attention(self) -> dict[str, list]:
        """The span attention of every prompt with named spans, as columns (``SPAN_COLUMNS``: one row per prompt,
        layer, head, query span, key span; what the run's ``span_attention`` SQL view holds)."""
        idx = [i for i in range(len(self.prompts)) if self.prompts[i].get("spans")]
        return span_rows(
            0,
            [str(i) for i in idx],
            [self.prompts[i]["spans"] for i in idx],
            [self.arrays[span_key(i)] for i in idx],
            prompts=idx,
        )

    # -- merge --
    def check_compatible(self, other: Profile) -> None:
        for key in _IDENTITY_KEYS:
            if self.meta.get(key) != other.meta.get(key):
                raise ProfileError(
                    f"cannot combine profiles of different models or settings: {key} differs "
                    f"({self.meta.get(key)!r} vs {other.meta.get(key)!r})"
                )

    def check_compatible_model(self, other: Profile) -> None:
        """``ProfileError`` unless both profiles come from the same model (config and weights), e.g. to compare."""
        for key in ("config_digest", "weights_digest"):
            if self.meta.get(key) != other.meta.get(key):
                raise ProfileError(
                    f"profiles of different models: {self.meta.get('model_id')!r} and {other.meta.get('model_id')!r} "
                    f"differ in {key.replace('_', ' ')}"
                )

    def merge(self, other: Profile) -> Profile:
        """The profile of both prompt sets, equal to profiling them together (self's prompts first)."""
        self.check_compatible(other)
        a, b = self.arrays, other.arrays
        out: dict[str, np.ndarray] = {}
        n_self = len(self.prompts)
        out.update(combine_accum(dict(a.items()), dict(b.items()), self.n_tokens))
        for name in TOKEN_AXIS:
            if name in a and name in b:
                out[name] = np.concatenate([a[name], b[name]], axis=TOKEN_AXIS[name])
        out["prompts.offsets"] = np.concatenate([a["prompts.offsets"], b["prompts.offsets"][1:] + self.n_tokens])
        for name, arr in a.items():
            if name.startswith(PER_PROMPT_PREFIXES):
                out[name] = arr
        for name, arr in b.items():
            if name.startswith(PER_PROMPT_PREFIXES):
                out[renumber_key(name, n_self)] = arr
        meta = dict(self.meta)
        return Profile(meta=meta, prompts=list(self.prompts) + list(other.prompts), arrays=out)

    # -- disk --
    def save(self, path: str | os.PathLike, overwrite: bool = True, force: bool = False) -> Path:
        """Write the profile directory atomically: a crash leaves either the old directory or the new one.

        Refuses (``ProfileError``) to replace a directory that holds another model's profile, or anything that is
        not a profile; ``overwrite=False`` refuses any existing profile; ``force=True`` replaces whatever is there.
        """
        from safetensors.numpy import save_file

        path = Path(path)
        if path.exists() and force and not path.is_dir():
            path.unlink()
        if path.exists() and not force:
            if not path.is_dir():
                raise ProfileError(f"{path} exists and is not a directory")
            if any(path.iterdir()):
                try:
                    old = load_profile_dir(path)
                except ProfileError as e:
                    raise ProfileError(
                        f"refusing to overwrite {path}: it is not empty and not a profile ({e})"
                    ) from None
                if not overwrite:
                    raise ProfileError(f"{path} already holds a profile")
                try:
                    old.check_compatible_model(self)  # same model, any settings: a re-run replaces it
                except ProfileError as e:
                    raise ProfileError(
                        f"refusing to overwrite {path}: it holds another model's profile ({e})"
                    ) from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        try:
            arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays.items()}
            save_file(arrays, str(tmp / ARRAYS_FILE))
            meta = {
                "format": FORMAT_NAME,
                "schema_version": SCHEMA_VERSION,
                "arrays_sha256": _sha256(tmp / ARRAYS_FILE),
                "meta": self.meta,
                "prompts": self.prompts,
            }
            with open(tmp / META_FILE, "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            for f in (tmp / ARRAYS_FILE, tmp / META_FILE):  # mkdtemp and the writers create them private
                os.chmod(f, 0o666 & ~umask)
            os.chmod(tmp, 0o777 & ~umask)
            if path.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, trash / "old")
                os.replace(tmp, path)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        """A profile directory written by ``Profile.save`` (``attnscope.load`` reads run directories too)."""
        return load_profile_dir(path)


def _one_of(names) -> str:
    """``'a', 'b' or 'c'``."""
    q = [repr(n) for n in names]
    return q[0] if len(q) == 1 else f"{', '.join(q[:-1])} or {q[-1]}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_profile_dir(path: str | os.PathLike) -> Profile:
    """Load a profile directory written by ``Profile.save``; ``ProfileError`` if it is not one (``attnscope.load``
    reads run directories too)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_dir():
        raise ProfileError(f"{path} is not a profile directory (it does not exist or is not a directory)")
    meta_path, arrays_path = path / META_FILE, path / ARRAYS_FILE
    if not meta_path.is_file() or not arrays_path.is_file():
        raise ProfileError(f"{path} is not a profile directory: {META_FILE} or {ARRAYS_FILE} is missing")
    try:
        with open(meta_path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ProfileError(f"{meta_path} is corrupted: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ProfileError(f"{path} is not an attnscope profile ({META_FILE} has no format {FORMAT_NAME!r})")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ProfileError(
            f"{path} has schema version {doc.get('schema_version')}, this attnscope reads version {SCHEMA_VERSION}"
        )
    if _sha256(arrays_path) != doc.get("arrays_sha256"):
        raise ProfileError(f"{arrays_path} is corrupted or does not belong to {meta_path} (checksum mismatch)")
    try:
        arrays = load_file(str(arrays_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ProfileError(f"{arrays_path} is corrupted: {e}") from None
    return Profile(meta=doc["meta"], prompts=doc["prompts"], arrays=arrays)
