"""What each layer of a model computes, seen on a tiny forward pass before any work: which layers are attention
layers and of what kind (full causal, sliding window, chunks; scaling, softcapping, learned sinks), which MLP blocks
are dense and which mixtures of experts, the heads' real shapes, and where the backend differs from the model's eager
attention. A model that cannot be captured fails here, in one line, before a prompt is read."""

from __future__ import annotations

import torch

from .blocks import UnsupportedModelError, base_model, decoder_layers, mlp_blocks, model_geometry, n_experts
from .hooks import AttentionCall, capture

__all__ = ["describe_layers"]


def describe_layers(model: torch.nn.Module) -> dict:
    """``{"geometry", "layers", "notes"}`` of ``model`` from one forward pass of two 6-token prompts (one padded, so
    every mask is built). ``layers[i]`` is ``{"layer", "attention", "mlp"}``: ``attention`` is ``{"kind", "window",
    "chunk", "scaling", "softcap", "sinks"}`` (None: not an attention layer, e.g. a hybrid's linear-attention
    layer), ``mlp`` is ``"dense"``, ``"moe"`` or None. ``geometry`` is ``model_geometry``'s, with heads, KV heads and
    q/k head size as the queries and keys have them; ``experts`` is ``{"n_experts", "experts_per_token",
    "expert_dim"}`` (neurons per expert) of the MoE layers whose routing is seen (None: none); ``notes`` say where
    the backend differs from eager code."""
    geom = model_geometry(model)
    seen: dict[int, AttentionCall] = {}
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(12, device=device).reshape(2, 6) * 7 + 3) % vocab
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    routed: dict[int, tuple[int, int]] = {}  # MoE layer -> (experts per token, neurons per expert)
    on_route = lambda layer, idx, w, acts: routed.__setitem__(layer, (idx.shape[-1], acts.shape[-1]))  # noqa: E731
    on_attention = lambda call: seen.__setitem__(call.layer, call)  # noqa: E731
    with torch.no_grad(), capture(model, on_attention, None, on_route, expert_neurons=True) as info:
        base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
    if not seen:
        raise UnsupportedModelError(
            f"unsupported architecture {geom['model_type']!r}: no layer called transformers' attention interface "
            "(its modeling code computes attention itself), so its queries and keys cannot be seen"
        )
    attention = {}
    for layer, c in sorted(seen.items()):
        kind = "sliding" if c.window else "chunked" if c.chunk else "full"
        attention[layer] = {
            "kind": kind,
            "window": c.window,
            "chunk": c.chunk,
            "scaling": c.scaling,
            "softcap": c.softcap,
            "sinks": c.sinks is not None,
        }
    first = seen[min(seen)]
    geom = geom | {
        "n_heads": int(first.query.shape[1]),
        "n_kv_heads": int(first.key.shape[1]),
        "head_dim": int(first.query.shape[-1]),
        "n_layers": len(decoder_layers(model)),
    }
    blocks = mlp_blocks(model)
    mlp = {layer: b.kind for layer, b in blocks.items()}
    experts = None
    if routed:
        E = {n_experts(blocks[layer]) for layer in routed}
        ks = {k for k, _ in routed.values()}
        fs = {f for _, f in routed.values()}
        if len(E) != 1 or None in E or len(ks) != 1 or len(fs) != 1:
            raise UnsupportedModelError(
                f"unsupported architecture {geom['model_type']!r}: its MoE layers differ in experts, experts per "
                f"token or expert size ({sorted(map(str, E))}, {sorted(ks)}, {sorted(fs)})"
            )
        experts = {"n_experts": E.pop(), "experts_per_token": ks.pop(), "expert_dim": fs.pop()}
    return {
        "geometry": geom,
        "layers": [{"layer": i, "attention": attention.get(i), "mlp": mlp.get(i)} for i in range(geom["n_layers"])],
        "experts": experts,
        "notes": sorted(info.notes),
    }
