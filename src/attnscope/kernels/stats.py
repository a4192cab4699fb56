"""Every statistic attnscope computes, declared once: what it is, how it accumulates, where it is kept, how it reads.

This module imports nothing (no torch, no numpy), so the kernels, the profile, the run store, the SQL views and the
renderers all read it. A statistic's name is spelled here and nowhere else: the float64 reference, the CPU fused
pass, the Triton kernel, the ``Profile`` arrays (``attn.<name>``), the run's tables and SQL columns, the head
summaries, the head roles and the report take it from the ``Stat`` objects below.

Adding a per-row attention statistic: declare it in ``VECTORS`` (its slot is its position), write its formula in
``reference.attn_stats_from_probs_ref``, ``torch_path`` (the torch fallback), ``_cpu_fused`` and
``qk_stats`` (each indexes the one [V, B, H, L] output by ``slot``); everything after the kernels (the profile, the
store, SQL, summaries, views) follows from the declaration.

Fields of a ``Stat``:

- ``kind``: ``vector`` (one value per row or key, [B, H, L]), ``histogram`` ([H, bins] counts), ``moments``
  ([H, 3]: n, sum, sum of squares), ``buckets`` ([B, H, N_DIST_BUCKETS]), ``pooled`` ([B, H, R, R]), ``spans``
  (per prompt [H, Sq, Sk, 2]: pooled over the cells its named spans cut, like the thumbnail over uniform cells);
- ``axis``: ``query`` (indexed by the row i), ``key`` (indexed by the key j: a column statistic), ``pair`` (over
  every allowed (i, j) pair);
- ``fold``: how partial results combine (query blocks, batches, shards, merged runs): ``sum``, ``max``, or
  ``store`` (each element is written by exactly one block);
- ``tier``: ``vectors`` (per token or per prompt: kept in memory, and in a run with ``--keep vectors``),
  ``prompt`` (per prompt, always kept: small; a ``score`` is one value per prompt, layer and head, a column of the
  prompts table) or ``accum`` (per layer and head: always kept, additive over prompts);
- ``label`` and ``unit``: how a figure, a table header or ``--help`` names it;
- ``summary``: its column in the per-head summary (``HEAD_SUMMARY``: the tables, the report, the head roles), or
  None; the ``heads`` and ``prompts`` SQL views hold the mean over rows of every vector under its ``name``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = [
    "ACCUMULATORS",
    "ACCUM_KEYS",
    "ARGMAX",
    "ASHAPE",
    "A_LOCAL",
    "A_SINK_KEYS",
    "OBS_WINDOW",
    "WINDOW_RECV",
    "ANSWER_SPAN",
    "FIRST_TOKEN",
    "FIRST_TOKEN_ROWS",
    "HEAD_SCORES",
    "NEEDLE_SPAN",
    "RETRIEVAL",
    "SINK_RATE_THRESHOLD",
    "LAST_SPAN",
    "SPAN",
    "SPAN_FIELDS",
    "span_key",
    "span_names",
    "PER_PROMPT_PREFIXES",
    "full_key",
    "renumber_key",
    "thumb_key",
    "DIAG",
    "DIST",
    "DUP",
    "ENTROPY",
    "FINAL",
    "HEAD_SUMMARY",
    "HIST_ALL",
    "HIST_LOG",
    "INDUCTION",
    "LAMINAR",
    "LAYER_STATS",
    "LEARNED_SINK",
    "MOMENTS",
    "N_DIST_BUCKETS",
    "PREV",
    "RECV_MAX",
    "RECV_SUM",
    "ROLES",
    "ROWMAX",
    "SINK",
    "THUMB",
    "VECTORS",
    "VECTOR_NAMES",
    "Accum",
    "Laminar",
    "Role",
    "Stat",
    "vector",
]

N_DIST_BUCKETS = 32  # distance buckets floor(log2(i - j + 1)): enough for 2**32 tokens


@dataclass(frozen=True)
class Stat:
    """One attention statistic (see the module docstring for the fields)."""

    name: str
    kind: str
    axis: str
    fold: str
    tier: str
    label: str
    unit: str
    summary: str | None = None
    formula: str = ""
    slot: int = -1  # position in the kernels' [V, B, H, L] vector output (vectors only)

    @property
    def key(self) -> str:
        """Its name among a ``Profile``'s arrays."""
        return f"attn.{self.name}"


def _vectors(*stats: Stat) -> tuple[Stat, ...]:
    return tuple(replace(s, slot=i) for i, s in enumerate(stats))


# -- per-row vectors: [B, H, L] float32 from every implementation, zero outside the valid rows --
VECTORS = _vectors(
    Stat("diag", "vector", "query", "store", "vectors", "self-attention p(i, i)", "weight", "self", "p_ii"),
    Stat("final", "vector", "key", "store", "vectors", "final token's attention p(L-1, j)", "weight", None,
         "p_{end-1, j}: the last real token's row, indexed by key j"),
    Stat("entropy", "vector", "query", "store", "vectors", "row entropy", "nats", "entropy",
         "H_i = -sum_j p_ij log p_ij"),
    Stat("rowmax", "vector", "query", "store", "vectors", "largest weight of the row", "weight", "rowmax",
         "max_j p_ij"),
    Stat("recv_sum", "vector", "key", "sum", "vectors", "attention received", "weight", None, "sum_i p_ij, by key j"),
    Stat("recv_max", "vector", "key", "max", "vectors", "largest attention received", "weight", None,
         "max_i p_ij, by key j"),
    Stat("sink", "vector", "query", "store", "vectors", "attention to the first token", "weight", "sink",
         "p_{i, start}"),
    Stat("prev", "vector", "query", "store", "vectors", "attention to the previous token", "weight", "prev",
         "p_{i, i-1}"),
    Stat("dup", "vector", "query", "store", "vectors", "duplicate-token mass", "weight", "dup",
         "sum_j p_ij [tok_j = tok_i, j < i]"),
    Stat("induction", "vector", "query", "store", "vectors", "induction mass", "weight", "induction",
         "sum_j p_ij [tok_{j-1} = tok_i, start <= j - 1, j < i]"),
    Stat("learned_sink", "vector", "query", "store", "vectors", "learned sink's share of the row", "weight",
         "learned_sink", "exp(sink_h - lse_i) = 1 - sum_j p_ij (0 for a model without learned sinks)"),
    Stat("argmax", "vector", "query", "store", "vectors", "key of the largest weight", "tokens", None,
         "argmax_j p_ij - start: the first such key on ties (float32: exact below 2^24 tokens)"),
    Stat("window_recv", "vector", "key", "sum", "vectors", "attention from the last 32 rows (SnapKV)", "weight", None,
         "sum_{i >= end - 32} p_ij, by key j: SnapKV's observation-window score"),
    Stat("ashape", "vector", "query", "store", "vectors", "A-shape coverage (128 sink keys + 1024 local)", "weight",
         None, "sum_j p_ij [j < start + 128 or i - j < 1024]: the mass an A-shape (StreamingLLM) mask keeps"),
)  # fmt: skip
DIAG, FINAL, ENTROPY, ROWMAX, RECV_SUM, RECV_MAX, SINK, PREV, DUP, INDUCTION, LEARNED_SINK = VECTORS[:11]
ARGMAX, WINDOW_RECV, ASHAPE = VECTORS[11:]
A_SINK_KEYS, A_LOCAL = 128, 1024  # the A-shape of ``ashape``: the first keys and a local window (MInference's)
OBS_WINDOW = 32  # the observation window of ``window_recv``: the last rows of each prompt (SnapKV's default)
VECTOR_NAMES = tuple(s.name for s in VECTORS)

# -- per layer and head, over every allowed pair --
HIST_ALL = Stat("hist_all", "histogram", "pair", "sum", "accum", "p of every causal pair", "count",
                formula="bins of p on [0, 1]")  # fmt: skip
HIST_LOG = Stat("hist_log", "histogram", "pair", "sum", "accum", "log10 p of every causal pair", "count",
                formula="bins of log10 p on [log_min, 0]; smaller p in bin 0")  # fmt: skip
MOMENTS = Stat("moments", "moments", "pair", "sum", "accum", "moments of p", "", formula="n pairs, sum p, sum p^2")
DIST = Stat("dist", "buckets", "pair", "sum", "accum", "mean attention distance (tokens, bucket midpoints)",
            "tokens", "distance", "sum p by floor(log2(i - j + 1))")  # fmt: skip
THUMB = Stat("thumb", "pooled", "pair", "sum", "vectors", "pooled attention", "weight",
             formula="mean p over the R x R cells of each prompt")  # fmt: skip
SPAN = Stat("span", "spans", "pair", "sum", "prompt", "span-to-span attention", "weight",
            formula="mass(Q, K) = mean over Q's rows of sum_{j in K} p_ij; top1(Q, K) = share of Q's rows whose "
            "argmax key lies in K; over the prompt's named spans (queries: also `last`, the final row)")  # fmt: skip
SPAN_FIELDS = ("mass", "top1")  # the last axis of a prompt's span array
# -- per prompt, layer and head: scores of the literature, from the vectors (and the spans) of the prompt --
RETRIEVAL = Stat("retrieval", "score", "prompt", "store", "prompt", "retrieval score (Wu et al. 2024)", "share",
                 formula="teacher-forced: hits / answer tokens; row i (predicting answer token i + 1) hits when "
                 "its argmax key j lies in the `needle` span and tok_j = tok_{i+1}; else NaN")  # fmt: skip
FIRST_TOKEN = Stat("first_token", "score", "prompt", "store", "prompt", "first-token score (Gu et al. 2025)",
                   "weight", formula="mean of p_{i, start} over the first 64 rows (a sink head: > 0.3)")  # fmt: skip
HEAD_SCORES = (RETRIEVAL, FIRST_TOKEN)  # columns of the prompts table, in this order
FIRST_TOKEN_ROWS = 64  # T of the first-token score
SINK_RATE_THRESHOLD = 0.3  # a head whose first-token score exceeds it counts towards the sink rate
NEEDLE_SPAN, ANSWER_SPAN = "needle", "answer"  # the spans the retrieval score reads
LAST_SPAN = "last"  # the query span of the final token's row
LAYER_STATS = (HIST_ALL, HIST_LOG, MOMENTS, DIST, THUMB, SPAN)


FULL_PREFIX = "attn.full.p"  # attn.full.p<i>.l<layer>.h<head>: a kept full matrix of prompt i
THUMB_PREFIX = THUMB.key + ".p"  # attn.thumb.p<i>: the thumbnails of prompt i
SPAN_PREFIX = SPAN.key + ".p"  # attn.span.p<i>: the span-to-span attention of prompt i
PER_PROMPT_PREFIXES = (THUMB_PREFIX, SPAN_PREFIX, FULL_PREFIX)  # the per-prompt arrays of a profile, by prompt


def thumb_key(prompt: int) -> str:
    """The ``Profile`` array of prompt ``prompt``'s thumbnails, [Ly, H, r, r]."""
    return f"{THUMB_PREFIX}{prompt}"


def span_key(prompt: int) -> str:
    """The ``Profile`` array of prompt ``prompt``'s span attention, [Ly, H, Sq, Sk, 2] (``SPAN_FIELDS``)."""
    return f"{SPAN_PREFIX}{prompt}"


def span_names(spans) -> tuple[list[str], list[str]]:
    """The query spans (every named span, then ``last``) and the key spans (every named span) of a prompt's spans."""
    names = list(spans)
    return names + [LAST_SPAN], names


def full_key(prompt: int, layer: int, head: int) -> str:
    """The ``Profile`` array of a kept full attention matrix, [L, L]."""
    return f"{FULL_PREFIX}{prompt}.l{layer}.h{head}"


def renumber_key(key: str, offset: int) -> str:
    """A per-prompt array's key with its prompt number moved by ``offset`` (joining profiles or shards)."""
    head, rest = key.split(".p", 1)
    idx, _, tail = rest.partition(".")
    return f"{head}.p{int(idx) + offset}" + (f".{tail}" if tail else "")


def vector(name: str) -> Stat:
    """The vector statistic called ``name``; ``KeyError`` naming the known ones."""
    for s in VECTORS:
        if s.name == name:
            return s
    raise KeyError(f"no attention vector {name!r}; the vectors are {', '.join(VECTOR_NAMES)}")


# -- the per-head summary (mean over every row of the profile), in the order tables show it --
_SUMMARY_LABELS = {
    ENTROPY: "mean row entropy (nats)",
    SINK: "mean attention to the first token",
    PREV: "mean attention to the previous token",
    DIAG: "mean self-attention p(i, i)",
    INDUCTION: "mean induction mass (earlier keys that follow a copy of the query's token)",
    DUP: "mean duplicate-token mass (earlier keys holding the query's token)",
    DIST: "mean attention distance (tokens, bucket midpoints)",
    ROWMAX: "mean of the largest weight per row",
    LEARNED_SINK: "mean share of the learned sink (the softmax's extra logit)",
}
HEAD_SUMMARY: dict[str, tuple[Stat, str]] = {s.summary: (s, label) for s, label in _SUMMARY_LABELS.items()}


# -- laminar profiles: the KDE of a kind of weight per layer --
@dataclass(frozen=True)
class Laminar:
    """A laminar view: ``samples`` the vector whose values it draws (None: every pair, from the histogram), and
    the accumulators that stand for those values in a run without the vectors tier."""

    kind: str
    label: str
    samples: Stat | None
    hist: str  # the key of its histogram among a profile's arrays
    moments: str  # the key of its moments (n, sum, sum of squares)
    kde: bool = True  # a KDE of the weights on [0, 1]; False: the log10 histogram itself


LAMINAR: dict[str, Laminar] = {
    "self": Laminar("self", DIAG.label, DIAG, "attn.self_hist", "attn.self_moments"),
    "final": Laminar("final", FINAL.label, FINAL, "attn.final_hist", "attn.final_moments"),
    "all": Laminar("all", "all causal pairs p(i, j)", None, HIST_ALL.key, MOMENTS.key),
    "log": Laminar("log", "log10 p(i, j) of all causal pairs", None, HIST_LOG.key, MOMENTS.key, kde=False),
}


# -- head roles: a head takes the role whose threshold its score passes by the largest factor --
@dataclass(frozen=True)
class Role:
    name: str
    score: str  # a column of the head summary, or a score derived from one (``local``, ``broad``)
    threshold: float
    colour: str
    meaning: str


ROLES = (
    Role("sink", SINK.summary, 0.5, "#4d4d4d", "p(i, first token)"),
    Role("previous-token", PREV.summary, 0.4, "#1f77b4", "p(i, i - 1)"),
    Role("induction", INDUCTION.summary, 0.3, "#d62728", "sum of p(i, j) over j < i with tok(j - 1) = tok(i)"),
    Role("duplicate", DUP.summary, 0.3, "#ff7f0e", "sum of p(i, j) over j < i with tok(j) = tok(i)"),
    Role("self", DIAG.summary, 0.4, "#9467bd", "p(i, i)"),
    Role("local", "local", 0.8, "#2ca02c", "attention within distance 6 (i - j <= 6)"),
    Role("broad", "broad", 0.7, "#17becf", "row entropy / log(number of keys)"),
)
MIXED_COLOUR = "#f0f0f0"  # a head that passes no threshold


# -- a profile's accumulators: one value per layer and head (or neuron) over every prompt --
@dataclass(frozen=True)
class Accum:
    """An accumulator of a profile or run: ``fold`` ``sum`` (additive), ``max`` (with the token holding it in
    ``companion``, ties to the earlier token) or ``topk`` (the k largest along axis -2, with their tokens in
    ``companion``); ``shape`` in the symbols Ly (layers), H (heads), bins, R (thumbnail), V (vectors), F (d_ff),
    k (contexts), E (routed experts), Fe (neurons per expert); ``dtype`` a numpy dtype name."""

    key: str
    fold: str
    shape: tuple[str, ...]
    dtype: str
    companion: str | None = None  # the argmax / token array that travels with a max or top-k
    of: str = ""  # what it accumulates


HIST_ALL_ACC = Accum(HIST_ALL.key, "sum", ("Ly", "H", "bins"), "int64", of=HIST_ALL.formula)
HIST_LOG_ACC = Accum(HIST_LOG.key, "sum", ("Ly", "H", "bins"), "int64", of=HIST_LOG.formula)
MOMENTS_ACC = Accum(MOMENTS.key, "sum", ("Ly", "H", "3"), "float64", of=MOMENTS.formula)
DIST_ACC = Accum(DIST.key, "sum", ("Ly", "H", str(N_DIST_BUCKETS)), "float64", of=DIST.formula)
ROW_SUMS = Accum("attn.row_sums", "sum", ("Ly", "H", "V"), "float64", of="sum over tokens of each vector (slots)")
THUMB_REL = Accum("attn.thumb_rel", "sum", ("Ly", "H", "R", "R"), "float64", of="thumbnails in relative position")
THUMB_REL_COUNT = Accum("attn.thumb_rel_count", "sum", ("R", "R"), "int64", of="prompts that fed each relative cell")
NEURON_SUM = Accum("mlp.neuron_sum", "sum", ("Ly", "F"), "float64", of="sum over tokens of each down_proj input")
NEURON_SUMSQ = Accum("mlp.neuron_sumsq", "sum", ("Ly", "F"), "float64", of="sum of squares of the same")
NEURON_MAX = Accum("mlp.neuron_max", "max", ("Ly", "F"), "float32", "mlp.neuron_argmax", of="largest activation")
NEURON_ARGMAX = Accum("mlp.neuron_argmax", "companion", ("Ly", "F"), "int64", of="the token (run index) holding it")
CTX_VALUE = Accum("mlp.ctx_value", "topk", ("Ly", "k", "F"), "float32", "mlp.ctx_token", of="top-k per neuron")
EXPERT_TOKENS = Accum("mlp.expert_tokens", "sum", ("Ly", "E"), "int64", of="tokens routed to each expert")
EXPERT_WEIGHT = Accum("mlp.expert_weight", "sum", ("Ly", "E"), "float64", of="sum of their routing weights")
CTX_TOKEN = Accum("mlp.ctx_token", "companion", ("Ly", "k", "F"), "int64", of="their tokens (-1: none)")
# the neurons of the routed experts (Fe per expert), over the tokens routed to each expert
_EN = ("Ly", "E", "Fe")
EXPERT_NEURON_SUM = Accum("mlp.expert_neuron_sum", "sum", _EN, "float64", of="sum over its tokens of each activation")
EXPERT_NEURON_SUMSQ = Accum("mlp.expert_neuron_sumsq", "sum", _EN, "float64", of="sum of squares of the same")
EXPERT_NEURON_MAX = Accum(
    "mlp.expert_neuron_max", "max", _EN, "float32", "mlp.expert_neuron_argmax", of="largest activation (-inf: none)"
)
EXPERT_NEURON_ARGMAX = Accum("mlp.expert_neuron_argmax", "companion", _EN, "int64", of="the token holding it")
EXPERT_CTX_VALUE = Accum(
    "mlp.expert_ctx_value", "topk", ("Ly", "E", "k", "Fe"), "float32", "mlp.expert_ctx_token", of="top-k per neuron"
)
EXPERT_CTX_TOKEN = Accum("mlp.expert_ctx_token", "companion", ("Ly", "E", "k", "Fe"), "int64", of="their tokens")


def _laminar_accums(lam: Laminar) -> tuple[Accum, Accum]:
    what = lam.samples.formula if lam.samples else ""
    return (
        Accum(lam.hist, "sum", ("Ly", "H", "bins"), "int64", of=f"linear histogram of {what}"),
        Accum(lam.moments, "sum", ("Ly", "H", "3"), "float64", of=f"n, sum, sum of squares of {what}"),
    )


# in the order a run's accumulator file and ``Profile.arrays`` list them
ACCUMULATORS = (
    HIST_ALL_ACC,
    HIST_LOG_ACC,
    MOMENTS_ACC,
    DIST_ACC,
    *_laminar_accums(LAMINAR["self"]),
    *_laminar_accums(LAMINAR["final"]),
    ROW_SUMS,
    THUMB_REL,
    THUMB_REL_COUNT,
    NEURON_SUM,
    NEURON_SUMSQ,
    NEURON_MAX,
    NEURON_ARGMAX,
    CTX_VALUE,
    CTX_TOKEN,
    EXPERT_TOKENS,
    EXPERT_WEIGHT,
    EXPERT_NEURON_SUM,
    EXPERT_NEURON_SUMSQ,
    EXPERT_NEURON_MAX,
    EXPERT_NEURON_ARGMAX,
    EXPERT_CTX_VALUE,
    EXPERT_CTX_TOKEN,
)
ACCUM_KEYS = tuple(a.key for a in ACCUMULATORS)
