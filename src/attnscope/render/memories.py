"""FFN key-value memories as rules "trigger context -> promoted tokens" (Geva et al. 2021, 2022), from a profile's
running top-k contexts per neuron and the tokens each neuron's output vector promotes (numpy only)."""

from __future__ import annotations

import numpy as np

from attnscope.kernels.stats import CTX_TOKEN, CTX_VALUE, EXPERT_CTX_TOKEN, EXPERT_CTX_VALUE

__all__ = ["RULE_COLUMNS", "neuron_rules", "rules_table"]

RULE_COLUMNS = (
    "layer",
    "expert",
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
    promoted: dict[str, np.ndarray],  # "token" / "logit" [layers, d_ff, k]; "expert_token" / "expert_logit"
    vocab: dict[int, str],  # decoded text of the promoted token ids
    top_neurons: int = 20,
    window: int = 8,
    layers=None,
) -> list[dict]:
    """One rule per neuron: its strongest trigger contexts over the run and the tokens it promotes.

    Neurons are chosen per layer by their largest activation over the run (``top_neurons`` each): a dense layer's
    d_ff neurons, a mixture-of-experts layer's neurons of every routed expert (``expert``: which; contexts among the
    tokens routed to it). A rule's ``adds_logit_bias`` is the logit each promoted token gains when the neuron fires
    as strongly as at its first trigger: activation x (W_U g W_out[:, n]), before the final norm rescales the
    residual stream (and, for an expert, before its routing weight).
    """
    dense, moe = CTX_VALUE.key in prof.arrays, EXPERT_CTX_VALUE.key in prof.arrays
    if not (dense or moe):
        raise ValueError(
            "this profile kept no neuron contexts: profile again with --neuron-contexts K (K > 0, the default 8)"
        )
    Ly = prof.arrays[(CTX_VALUE if dense else EXPERT_CTX_VALUE).key].shape[0]
    layers = range(Ly) if layers is None else layers
    cache: dict[int, list[str]] = {}
    rules = []

    def add(layer, expert, n, value, token, promo_ids, promo_logit):  # value / token [k] of one neuron
        ok = token >= 0
        if not ok.any():
            return
        ctx = _contexts(prof, token[ok], window, cache)
        acts = value[ok].astype(float)
        rules.append(
            {
                "layer": int(layer),
                "expert": expert,
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

    for layer in layers:
        if dense:
            value, token = prof.arrays[CTX_VALUE.key][layer], prof.arrays[CTX_TOKEN.key][layer]  # [k, F]
            for n in np.argsort(-value[0], kind="stable")[:top_neurons].tolist():
                add(layer, None, n, value[:, n], token[:, n], promoted["token"][layer, n], promoted["logit"][layer, n])
        if moe and "expert_token" in promoted:
            value, token = prof.arrays[EXPERT_CTX_VALUE.key][layer], prof.arrays[EXPERT_CTX_TOKEN.key][layer]
            E, _, Fe = value.shape  # [E, k, Fe]
            for flat in np.argsort(-value[:, 0].reshape(-1), kind="stable")[:top_neurons].tolist():
                e, n = divmod(flat, Fe)
                pt, pl = promoted["expert_token"][layer, e, n], promoted["expert_logit"][layer, e, n]
                add(layer, e, n, value[e, :, n], token[e, :, n], pt, pl)
    return rules


def rules_table(rules: list[dict], promoted_logit_per_unit: bool = True) -> dict[str, list]:
    """One row per (rule, context), columns ``RULE_COLUMNS`` (``expert`` -1: a dense layer's neuron);
    ``promoted_logit`` is per unit of activation."""
    out: dict[str, list] = {c: [] for c in RULE_COLUMNS}
    for r in rules:
        names = list(r["adds_logit_bias"])
        scale = r["activation"] if promoted_logit_per_unit and r["activation"] else 1.0
        logits = [v / scale for v in r["adds_logit_bias"].values()]
        for rank, c in enumerate(r["contexts"]):
            for col, v in (
                ("layer", r["layer"]),
                ("expert", -1 if r.get("expert") is None else r["expert"]),
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
