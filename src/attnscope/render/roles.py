"""Head roles: a table "attention head -> behaviour" and a layers x heads map, from a profile alone.

Every score is a mean over all rows (query tokens) of all prompts, so it is additive over prompts:

| score | per row | role, when the score reaches |
|---|---|---|
| ``sink`` | p(i, first token) | ``sink`` >= 0.5 |
| ``prev`` | p(i, i - 1) | ``previous-token`` >= 0.4 |
| ``induction`` | sum of p(i, j) over j < i with tok(j - 1) = tok(i) | ``induction`` >= 0.3 |
| ``dup`` | sum of p(i, j) over j < i with tok(j) = tok(i) | ``duplicate`` >= 0.3 |
| ``self`` | p(i, i) | ``self`` >= 0.4 |
| ``local`` | attention within distance 6 (i - j <= 6) | ``local`` >= 0.8 |
| ``broad`` | row entropy / log(number of keys) | ``broad`` >= 0.7 |

``induction``, ``dup`` and ``prev`` follow TransformerLens ``detect_head`` ("mul" scoring). A head whose scores
pass several thresholds takes the role it passes by the largest factor (score / threshold); one that passes
none is ``mixed``. The first tokens of a prompt cannot show induction or duplication (nothing repeats yet), so
these scores are only meaningful on text with repeats.
"""

from __future__ import annotations

import math

import numpy as np

from attnscope.kernels.stats import DIST, DUP, ENTROPY, INDUCTION, MIXED_COLOUR, PREV, SINK
from attnscope.kernels.stats import ROLES as DECLARED_ROLES

from .summary import head_summary

__all__ = [
    "NOT_ATTENTION",
    "ROLE_THRESHOLDS",
    "ROLES",
    "head_roles",
    "non_attention_layers",
    "plot_head_roles",
    "role_summary",
]

# role -> (score, threshold), in the order ``stats.ROLES`` declares them (a tie goes to the earlier role)
ROLE_THRESHOLDS: dict[str, tuple[str, float]] = {r.name: (r.score, r.threshold) for r in DECLARED_ROLES}
NOT_ATTENTION = "not attention"  # a hybrid's layers of another kind (linear attention, state space)
ROLES = (*ROLE_THRESHOLDS, "mixed", NOT_ATTENTION)
_ROLE_COLOURS = (*(r.colour for r in DECLARED_ROLES), MIXED_COLOUR, "#ffffff")


def non_attention_layers(prof) -> list[int]:
    """The layers the run's probe saw make no attention call (``meta.layers[i].attention`` null)."""
    return [i for i, lay in enumerate(prof.meta.get("layers") or []) if lay.get("attention") is None]


def _mean_log_keys(prof) -> float:
    """Mean over all rows of log(number of keys the row sees), causal rows 0..L-1 of every prompt."""
    lengths = np.diff(prof.offsets)
    return float(sum(math.lgamma(int(n) + 1) for n in lengths) / max(int(lengths.sum()), 1))


def head_roles(prof) -> dict[str, np.ndarray]:
    """Per (layer, head): every score of the module table, entropy and mean distance, and the role label.

    Returns name -> [layers, heads] arrays (``role`` holds strings).
    """
    s = head_summary(prof)
    dist = prof.arrays[DIST.key]  # [Ly, H, N_DIST_BUCKETS], bucket k: i - j + 1 in [2^k, 2^(k+1))
    total = dist.sum(-1)
    s["local"] = np.divide(dist[..., :3].sum(-1), total, out=np.zeros_like(total), where=total > 0)
    s["broad"] = s[ENTROPY.summary] / max(_mean_log_keys(prof), 1e-12)
    ratio = np.stack([s[col] / thr for col, thr in ROLE_THRESHOLDS.values()])  # [roles, Ly, H]
    best = ratio.argmax(0)
    names = np.array(list(ROLE_THRESHOLDS), dtype=object)
    s["role"] = np.where(ratio.max(0) >= 1.0, names[best], "mixed")
    other = non_attention_layers(prof)
    if other:  # no scores there: NaN, and their own label
        for name, a in s.items():
            if name != "role" and np.asarray(a).dtype.kind == "f":
                s[name] = np.array(a, dtype=np.float64)
                s[name][other] = np.nan
        s["role"][other] = NOT_ATTENTION
    return s


def role_summary(r: dict[str, np.ndarray], top: int = 3) -> list[str]:
    """One line per role from ``head_roles``: how many heads pass its threshold, how many carry its label (a head
    that passes several takes the one it passes by the largest factor), and the ``top`` highest scores, each with
    the head's label; then the ``mixed`` count. Scores are shown cut (not rounded) to two decimals, so a score
    below its threshold never shows as reaching it."""
    role = np.asarray(r["role"]).reshape(-1)
    H = np.asarray(r["role"]).shape[-1]
    lines = []
    for name, (col, thr) in ROLE_THRESHOLDS.items():
        score = np.asarray(r[col], dtype=np.float64).reshape(-1)
        order = np.argsort(-score, kind="stable")[:top]
        best = ", ".join(f"{i // H}:{i % H} {np.floor(score[i] * 100) / 100:.2f} ({role[i]})" for i in order)
        passing, labelled = int((score >= thr).sum()), int((role == name).sum())
        lines.append(f"{name:>15} ({col} >= {thr}): {passing:3d} pass, {labelled:3d} labelled {name}; highest {best}")
    lines.append(
        f"{'mixed':>15} (passes none): {int((role == 'mixed').sum()):3d} heads; a head that passes several "
        "thresholds is labelled with the one it passes by the largest factor (score / threshold)"
    )
    if (role == NOT_ATTENTION).any():
        lines.append(f"{NOT_ATTENTION:>15}: {int((role == NOT_ATTENTION).sum()):3d} heads (layers of another kind)")
    return lines


def plot_head_roles(prof, scores=(INDUCTION.summary, DUP.summary, PREV.summary, SINK.summary)):
    """Figure: the role of every head as a layers x heads map, and the scores behind it, one panel each."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from .base import pyplot

    plt = pyplot()
    r = head_roles(prof)
    Ly, H = prof.n_layers, prof.n_heads
    fig, axes = plt.subplots(
        1, 1 + len(scores), figsize=(2.2 + 2.1 * (1 + len(scores)) * max(1.0, H / 12), 1.2 + 0.22 * Ly + 1.0)
    )
    codes = np.vectorize(ROLES.index)(r["role"])  # [Ly, H]
    ax = axes[0]
    ax.imshow(
        codes,
        cmap=ListedColormap(_ROLE_COLOURS),
        vmin=-0.5,
        vmax=len(ROLES) - 0.5,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_title("role", fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    present = [i for i in range(len(ROLES)) if (codes == i).any()]
    ax.legend(
        handles=[Patch(facecolor=_ROLE_COLOURS[i], edgecolor="0.6", label=ROLES[i]) for i in present],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.08 - 0.6 / max(Ly, 1)),
        ncol=2,
        fontsize=7,
        frameon=False,
    )
    step = max(1, H // 8)
    for ax in axes:
        ax.set_xticks(range(0, H, step))
    for ax, name in zip(axes[1:], scores):
        # each score on its own scale from 0 to its maximum, so a weak role is still visible; the bar says so
        top = max(float(np.nanmax(r[name], initial=0.0)), 1e-3)
        im = ax.imshow(r[name], cmap="viridis", vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
        ax.set_title(f"{name} score (max {top:.2f})", fontsize=9)
        ax.set_xlabel("head")
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.1, pad=0.03, shrink=0.9, label="mean mass per row, 0 to max")
    fig.suptitle(f"head roles: {prof.meta.get('model_id', '')}", fontsize=10)
    fig.tight_layout()
    return fig
