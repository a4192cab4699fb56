"""The per-token columns of a profile, declared once: each one's ``Profile`` array, its column in a run's
``tokens/<shard>.parquet`` table (and so in the ``tokens`` SQL view), its dtype and its shape.

The in-memory profile (``run.shards_to_profile``), the run writer (``store.writer``), the lazy run reader
(``store.reader``) and the SQL views (``cli.run``) are all driven by ``TOKEN_COLUMNS``; a new per-token column is one
line here (and the code that computes it). Imports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "LENS_ARRAYS",
    "LENS_COLUMNS",
    "LENS_TOP_ID",
    "LOGIT_ENTROPY",
    "MLP_TOKEN_ARRAYS",
    "ROUTING_ARRAYS",
    "TOKEN_AXIS",
    "TOKEN_COLUMNS",
    "TOKEN_IDS",
    "TokenColumn",
    "lens_fields",
    "token_columns",
]


@dataclass(frozen=True)
class TokenColumn:
    """A per-token column.

    Attributes:
        key: its name among a ``Profile``'s arrays, or None for the token text (kept in ``Profile.prompts``).
        column: its column in the run's token tables.
        dtype: numpy dtype of the array (``object`` for text).
        per_layer: one value per layer and token: the array is [Ly, T] ([Ly, T, k] with ``width``), the column a
            fixed-size list of Ly (Ly * k) values per token; else the array is [T].
        width: the ``meta`` key of how many values per layer the column holds (``"top_k"`` for the top-k neurons,
            ``"experts_per_token"`` for the routing), else ``""``.
        lens: written only by a ``--logit-lens`` run.
        moe: written only for a model with mixture-of-experts blocks (-1 / NaN on its dense layers).
        derived: computed when the shard is written (not part of the in-memory profile).
    """

    key: str | None
    column: str
    dtype: str
    per_layer: bool = False
    width: str = ""
    lens: bool = False
    derived: bool = False
    moe: bool = False

    @property
    def token_axis(self) -> int:
        """The axis of the array that runs over the tokens."""
        return 1 if self.per_layer else 0


def _lens(field: str, dtype: str) -> TokenColumn:
    return TokenColumn(f"lens.{field}", f"lens_{field}", dtype, per_layer=True, lens=True)


# the logit lens, per layer and token (``--logit-lens``): what ``profiler.lens`` computes, in its order
LENS_COLUMNS = (
    _lens("top_id", "int32"),
    TokenColumn("lens.top_token", "lens_top_token", "object", per_layer=True, lens=True, derived=True),
    _lens("top_prob", "float32"),
    _lens("entropy", "float32"),
    _lens("target_prob", "float32"),
    _lens("target_rank", "int32"),
    _lens("final_prob", "float32"),
)

TOKEN_IDS = "tokens.ids"
LOGIT_ENTROPY = "tokens.logit_entropy"  # the model's own next-token entropy
LENS_TOP_ID = LENS_COLUMNS[0].key  # the lens' top-1 token ids (the run's tables hold their text too)
# in the order of the token tables' columns (after ``prompt`` and ``position``)
TOKEN_COLUMNS = (
    TokenColumn(TOKEN_IDS, "token_id", "int64"),
    TokenColumn(None, "token", "object"),
    TokenColumn(LOGIT_ENTROPY, "logit_entropy", "float32"),
    TokenColumn("mlp.in_norm", "in_norm", "float32", per_layer=True),
    TokenColumn("mlp.out_norm", "out_norm", "float32", per_layer=True),
    TokenColumn("mlp.topk_idx", "topk_idx", "int32", per_layer=True, width="top_k"),
    TokenColumn("mlp.topk_val", "topk_val", "float32", per_layer=True, width="top_k"),
    TokenColumn("mlp.experts", "experts", "int32", per_layer=True, width="experts_per_token", moe=True),
    TokenColumn("mlp.expert_weights", "expert_weights", "float32", per_layer=True, width="experts_per_token", moe=True),
    *LENS_COLUMNS,
)


def token_columns(logit_lens: bool, moe: bool = False) -> tuple[TokenColumn, ...]:
    """The token columns of a run (the lens ones only when it ran with ``--logit-lens``, the routing ones only for a
    model with mixture-of-experts blocks)."""
    return tuple(c for c in TOKEN_COLUMNS if (logit_lens or not c.lens) and (moe or not c.moe))


def lens_fields() -> tuple[str, ...]:
    """The logit lens' fields as the ``logit_lens`` SQL view names them (``top_id``, ``top_token``, ...)."""
    return tuple(c.column.removeprefix("lens_") for c in LENS_COLUMNS)


# the down_proj statistics per token (``down_proj_stats``' outputs of the same names without ``mlp.``)
MLP_TOKEN_ARRAYS = tuple(c.key for c in TOKEN_COLUMNS if c.key and c.key.startswith("mlp.") and not c.moe)
# the routing of mixture-of-experts blocks per token
ROUTING_ARRAYS = tuple(c.key for c in TOKEN_COLUMNS if c.moe)
# the lens arrays a profile holds, [Ly, T] each (``lens.top_token`` is derived when a run writes its tables)
LENS_ARRAYS = tuple(c.key for c in LENS_COLUMNS if not c.derived)
# every per-token array of a profile but the attention vectors -> the axis that runs over the tokens
TOKEN_AXIS = {c.key: c.token_axis for c in TOKEN_COLUMNS if c.key is not None and not c.derived}
