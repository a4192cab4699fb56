"""The logit-lens picture: layers x tokens, each cell coloured by the probability that layer gives to the model's
final prediction, with the layer's own top-1 token written in the cell where it fits."""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_LENS_TOKENS", "has_lens", "plot_logit_lens", "plot_logit_lens_of"]

MAX_LENS_TOKENS = 48  # columns with readable text; longer prompts show a window of them


def _clean(text: str, width: int = 8) -> str:
    t = text.replace("\n", "\\n").replace("\t", "\\t")
    return t if len(t) <= width else t[: width - 1] + "…"


def plot_logit_lens(
    final_prob: np.ndarray,  # [layers, n] probability of the final prediction at each layer
    top_text: list[list[str]],  # [layers][n] each layer's top-1 token, decoded
    tokens: list[str],  # [n] the input tokens (x axis)
    first: int = 0,  # position of column 0 in the prompt
    title: str = "logit lens",
):
    """Figure of one window of a prompt: X the input tokens, Y the layers (last on top), colour p(final prediction).

    The text in a cell is what that layer would predict next; the column's last row is the model's own prediction.
    """
    from .base import pyplot

    plt = pyplot()
    n_layers, n = final_prob.shape
    fig_w = min(2.5 + 0.62 * n, 34.0)
    fig_h = min(1.8 + 0.24 * n_layers, 14.0)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(
        final_prob, cmap="viridis", vmin=0.0, vmax=1.0, origin="lower", aspect="auto", interpolation="nearest"
    )
    font = 6.5 if n <= 32 else 5.5
    if n <= MAX_LENS_TOKENS:
        for layer in range(n_layers):
            for t in range(n):
                dark = final_prob[layer, t] < 0.55
                ax.text(
                    t, layer, _clean(top_text[layer][t]), ha="center", va="center", fontsize=font,
                    color="white" if dark else "black",
                )  # fmt: skip
    ax.set_xticks(range(n))
    ax.set_xticklabels([f"{_clean(tok, 10)}" for tok in tokens], rotation=90, fontsize=7)
    ax.set_xlabel(f"input token (positions {first}..{first + n - 1}); each cell: that layer's top-1 next token")
    step = max(1, n_layers // 15)
    ax.set_yticks(range(0, n_layers, step))
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="p(final prediction) at this layer")
    fig.tight_layout()
    return fig


def has_lens(prof) -> bool:
    """Whether the profile was made with ``--logit-lens``."""
    return "lens.top_id" in prof.arrays


def plot_logit_lens_of(prof, prompt: int = 0, lo: int | None = None, hi: int | None = None):
    """The logit-lens figure of tokens ``lo:hi`` of one prompt of a profile (default: the last ``MAX_LENS_TOKENS``);
    negative positions count from the end."""
    from .summary import ViewError, token_labels

    if not has_lens(prof):
        raise ViewError("this profile has no logit lens: profile again with --logit-lens")
    sl = prof.prompt_slice(prompt)
    n = sl.stop - sl.start
    lo = max(0, n - MAX_LENS_TOKENS) if lo is None else (lo + n if lo < 0 else lo)
    hi = n if hi is None else (hi + n if hi < 0 else hi)
    lo, hi = max(0, lo), min(n, hi)
    if hi <= lo:
        raise ViewError(f"positions {lo}:{hi} select no token of prompt {prompt} ({n} tokens)")
    cols = slice(sl.start + lo, sl.start + hi)
    top = np.asarray(prof.arrays["lens.top_id"][:, cols])  # [Ly, n]
    if "lens.top_token" in prof.arrays:
        text = np.asarray(prof.arrays["lens.top_token"][:, cols]).tolist()
    else:
        vocab = prof.meta.get("lens_vocab", {})
        text = [[vocab.get(str(int(t)), str(int(t))) for t in row] for row in top]
    return plot_logit_lens(
        np.asarray(prof.arrays["lens.final_prob"][:, cols]),
        text,
        token_labels(prof, prompt)[lo:hi],
        first=lo,
        title=f"logit lens: {prof.meta.get('model_id', '')}, prompt {prompt}",
    )
