"""FFN key-value memories as rules "trigger context -> promoted tokens" (Geva et al. 2021, 2022), from a profile's
running top-k contexts per neuron and the tokens each neuron's output vector promotes (numpy only)."""

from __future__ import annotations

import numpy as np
from attnscope.kernels.stats import CTX_TOKEN, CTX_VALUE

__all__ = ["RULE_COLUMNS", "neuron_rules", "rules_table"]

RULE_COLUMNS = (
    "layer",
    "neuron",
    "rank",
    "activation",
    "prompt",
    "position",
    "trigger_token",
    "trigger",
    "promoted",
    "promoted_logit",
)


def _by_text(ids: np.ndarray, values: np.ndarray, vocab: dict[int, str]) -> dict[str, float]:
    """{token text: value}; a text two ids share (or an empty one) gets its id appended, so none is lost."""
    out: dict[str, float] = {}
    for t, z in zip(ids.tolist(), values.tolist()):
        text = vocab.get(t, "")
        key = text if text and text not in out else f"{text}[{t}]"
        out[key] = round(z, 4)
    return out


def _contexts(prof, tokens: np.ndarray, window: int, cache: dict) -> list[tuple[int, int, str, str]]:
    """(prompt, position, token text, window text ending at the token) of global token indices."""
    off = np.asarray(prof.offsets)
    out = []
    for g in tokens.tolist():
        p = int(np.searchsorted(off, g, side="right") - 1)
        pos = g - int(off[p])
        if p not in cache:
            cache[p] = prof.prompts[p].get("tokens") or []
        toks = cache[p]
        text = "".join(toks[max(0, pos - window + 1) : pos + 1]) if toks else ""
        out.append((p, pos, toks[pos] if pos < len(toks) else "", text))
    return out


def neuron_rules(
    prof,
    promoted: dict[str, np.ndarray],  # "token" / "logit" [layers, d_ff, k]
    vocab: dict[int, str],  # decoded text of the promoted token ids
    top_neurons: int = 20,
    window: int = 8,
    layers=None,
) -> list[dict]:
    """One rule per neuron: its strongest trigger contexts over the run and the tokens it promotes.

    Neurons are chosen per layer by their largest activation over the run (``top_neurons`` each). A rule's
    ``adds_logit_bias`` is the logit each promoted token gains when the neuron fires as strongly as at its first
    trigger: activation x (W_U g W_out[:, n]), before the final norm rescales the residual stream.
    """
    if CTX_VALUE.key not in prof.arrays:
        raise ValueError(
            "this profile kept no neuron contexts: profile again with --neuron-contexts K (K > 0, the default 8)"
        )
    value, token = prof.arrays[CTX_VALUE.key], prof.arrays[CTX_TOKEN.key]  # [Ly, k, F]
    layers = range(value.shape[0]) if layers is None else layers
    cache: dict[int, list[str]] = {}
    rules = []
    for layer in layers:
        order = np.argsort(-value[layer, 0], kind="stable")[:top_neurons]
        for n in order.tolist():
            ok = token[layer, :, n] >= 0
            if not ok.any():
                continue
            ctx = _contexts(prof, token[layer, ok, n], window, cache)
            acts = value[layer, ok, n].astype(float)
            promo_ids, promo_logit = promoted["token"][layer, n], promoted["logit"][layer, n]
            rules.append(
                {
                    "layer": int(layer),
                    "activation_neuron": int(n),
                    "trigger": ctx[0][3],
                    "trigger_token": ctx[0][2],
                    "activation": round(float(acts[0]), 4),
                    "adds_logit_bias": _by_text(promo_ids, promo_logit * float(acts[0]), vocab),
                    "contexts": [
                        {"text": c[3], "token": c[2], "prompt": c[0], "position": c[1], "activation": round(a, 4)}
                        for c, a in zip(ctx, acts.tolist())
                    ],
                }
            )
    return rules


def rules_table(rules: list[dict], promoted_logit_per_unit: bool = True) -> dict[str, list]:
    """One row per (rule, context), columns ``RULE_COLUMNS``; ``promoted_logit`` is per unit of activation."""
    out: dict[str, list] = {c: [] for c in RULE_COLUMNS}
    for r in rules:
        names = list(r["adds_logit_bias"])
        scale = r["activation"] if promoted_logit_per_unit and r["activation"] else 1.0
        logits = [v / scale for v in r["adds_logit_bias"].values()]
        for rank, c in enumerate(r["contexts"]):
            for col, v in (
                ("layer", r["layer"]),
                ("neuron", r["activation_neuron"]),
                ("rank", rank),
                ("activation", c["activation"]),
                ("prompt", c["prompt"]),
                ("position", c["position"]),
                ("trigger_token", c["token"]),
                ("trigger", c["text"]),
                ("promoted", names),
                ("promoted_logit", logits),
            ):
                out[col].append(v)
    return out
