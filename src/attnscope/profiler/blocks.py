"""Where a causal LM keeps what attnscope reads, found from its structure, not from a list of model types.

- ``check_capturable``: a causal transformers model with a list of decoder layers; else one
  ``UnsupportedModelError`` that says why. Whether its attention code calls transformers' attention interface is
  seen on a tiny forward pass before any work (``probe.describe_layers``): no class attribute says it reliably.
- ``model_geometry``: layers, heads, KV heads, q/k head size from the text config, with the fallbacks older
  configs need (``n_layer``/``n_head``/``n_embd``; MLA's ``qk_nope_head_dim + qk_rope_head_dim``).
- ``decoder_layers``, ``final_norm``: the base model's list of decoder layers and the norm before the unembedding.
- ``mlp_blocks``: per decoder layer its MLP block: a dense MLP (its down projection: ``down_proj``,
  ``dense_4h_to_h``, ``c_proj``, ``fc2``, ...; whose input is the neuron activations and whose output is the block's)
  or a mixture-of-experts block (a child ``experts``: fused 3-D expert parameters or a list of expert modules).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "MLPBlock",
    "base_model",
    "UnsupportedModelError",
    "check_capturable",
    "decoder_layers",
    "final_norm",
    "logit_transform",
    "mlp_blocks",
    "expert_activations",
    "expert_write_out",
    "n_experts",
    "routing_hook",
    "model_geometry",
    "text_config",
    "write_out_weight",
]


class UnsupportedModelError(ValueError):
    """The model's architecture is one attnscope cannot capture (the message says why)."""


# the MLP block of a decoder layer, by the names the modeling files give it (the first that is a module)
_BLOCK_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "moe", "ffn", "mlp_block", "sparse_moe")
# a dense MLP's down projection (a 2-D weight: Linear, or GPT-2's Conv1D [d_ff, d_model])
_DOWN_NAMES = ("down_proj", "dense_4h_to_h", "c_proj", "fc2", "fc_out", "w2", "wo", "dense_out")
# the final norm, as an attribute of the base model
_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f", "final_norm")


def text_config(model: torch.nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no config: attnscope profiles transformers models")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def check_capturable(model: torch.nn.Module) -> None:
    """Raise ``UnsupportedModelError`` (one line: why) for a model attnscope cannot capture by its structure."""
    cfg = text_config(model)
    name = getattr(model.config, "model_type", None) or type(model).__name__
    if not getattr(cfg, "is_causal", True):
        raise UnsupportedModelError(f"unsupported architecture {name!r}: attnscope profiles causal attention")
    decoder_layers(model)


def model_geometry(model: torch.nn.Module) -> dict:
    """Layers, heads, KV heads and q/k head size of a capturable model (raises ``UnsupportedModelError``)."""
    check_capturable(model)
    cfg = text_config(model)

    def first(*names):
        for n in names:
            v = getattr(cfg, n, None)
            if v is not None:
                return v
        return None

    n_layers = len(decoder_layers(model))
    n_heads = first("num_attention_heads", "n_head", "num_heads")
    n_kv = first("num_key_value_heads", "num_kv_heads", "n_head_kv") or n_heads
    hidden = first("hidden_size", "n_embd", "d_model")
    head_dim = first("head_dim")
    if getattr(cfg, "qk_nope_head_dim", None) is not None:  # MLA: q/k carry the no-rope and rope parts
        head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    head_dim = head_dim or hidden // n_heads
    n_pos = first("max_position_embeddings", "n_positions", "n_ctx")
    return {
        "model_type": getattr(model.config, "model_type", None),
        "n_layers": int(n_layers),
        "n_heads": int(n_heads),
        "n_kv_heads": int(n_kv),
        "head_dim": int(head_dim),
        "max_positions": int(n_pos) if n_pos else None,
    }


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its LM head: what returns the last hidden state (after the final norm). Some causal LMs
    (Llama-4's text model) do not name it as their ``base_model_prefix``: then their one child that is not the
    unembedding."""
    base = model.base_model
    if base is model:
        head = model.get_output_embeddings()
        base = next((c for c in model.children() if c is not head), model)
    return base


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The base model's list of decoder layers: the first ``ModuleList`` as long as ``num_hidden_layers``."""
    cfg = text_config(model)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for _, module in base_model(model).named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise UnsupportedModelError(
        f"unsupported architecture {getattr(model.config, 'model_type', type(model).__name__)!r}: no list of "
        f"{n} decoder layers in {type(model.base_model).__name__}"
    )


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm the last hidden state goes through before the unembedding (identity where the model has none): an
    attribute of the base model or of one of its children (OPT's ``decoder.final_layer_norm``)."""
    base = base_model(model)
    for owner in (base, *base.children()):
        for name in _NORM_NAMES:
            module = getattr(owner, name, None)
            if isinstance(module, torch.nn.Module):
                return module
    return torch.nn.Identity()


def logit_transform(model: torch.nn.Module) -> tuple[float, float | None]:
    """``(scale, softcap)`` the model applies to its logits after the unembedding: z' = scale * z, then
    softcap * tanh(z' / softcap) where softcap is not None (Gemma-2's ``final_logit_softcapping``; Granite divides
    by ``logits_scaling``, Cohere multiplies by ``logit_scale``)."""
    cfg = text_config(model)
    scale = 1.0
    if getattr(cfg, "logits_scaling", None):
        scale /= float(cfg.logits_scaling)
    if getattr(cfg, "logit_scale", None):
        scale *= float(cfg.logit_scale)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return scale, (float(cap) if cap else None)


@dataclass(frozen=True)
class MLPBlock:
    """The MLP block of one decoder layer.

    Attributes:
        kind: ``"dense"`` or ``"moe"``.
        module: the block (its forward output is the block's output).
        down: a dense block's down projection (its input: the neuron activations), else None.
        experts: a mixture-of-experts block's experts module, else None.
    """

    kind: str
    module: torch.nn.Module
    down: torch.nn.Module | None = None
    experts: torch.nn.Module | None = None


def _down(module: torch.nn.Module) -> torch.nn.Module | None:
    for name in _DOWN_NAMES:
        child = getattr(module, name, None)
        if isinstance(child, torch.nn.Module) and getattr(child, "weight", None) is not None:
            if child.weight.ndim == 2:
                return child
    return None


def mlp_blocks(model: torch.nn.Module) -> dict[int, MLPBlock]:
    """Layer index -> its MLP block (layers without one, e.g. attention-only layers, are absent)."""
    found: dict[int, MLPBlock] = {}
    for i, layer in enumerate(decoder_layers(model)):
        block = next(
            (getattr(layer, n) for n in _BLOCK_NAMES if isinstance(getattr(layer, n, None), torch.nn.Module)), None
        )
        if block is None:  # OPT: fc1 / fc2 on the layer itself
            down = _down(layer)
            if down is not None:
                found[i] = MLPBlock("dense", down, down)
            continue
        experts = getattr(block, "experts", None)
        if isinstance(experts, torch.nn.Module):
            found[i] = MLPBlock("moe", block, experts=experts)
            continue
        down = _down(block)
        if down is not None:
            found[i] = MLPBlock("dense", block, down)
    return found


def n_experts(block: MLPBlock) -> int | None:
    """How many routed experts a mixture-of-experts block has (fused 3-D parameters or a list of modules)."""
    return (_n_experts(block.experts) or None) if block.experts is not None else None


def _gate_up(ex: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s intermediate activations on the rows x [n, d_model]: what its down projection reads.

    Fused 3-D experts as ``@use_experts_implementation`` declares them (``has_gate``: a ``gate_up_proj``, else an
    ``up_proj``; ``is_transposed``: [E, d_model, out] rather than [E, out, d_model]; ``has_bias``; the class's own
    ``_apply_gate``, e.g. gpt-oss's clamped interleaved SwiGLU), computed as transformers' own experts
    implementations compute them. An undecorated module (Llama-4) has the default layout its forward spells:
    ``gate_up_proj`` [E, d_model, 2 F], gate and up the two halves, ``act_fn(gate) * up``."""
    gated = getattr(ex, "has_gate", True)
    w = (ex.gate_up_proj if gated else ex.up_proj)[e]
    transposed = getattr(ex, "is_transposed", None)
    if transposed is None:
        transposed = w.shape[0] == x.shape[-1] and w.shape[1] != x.shape[-1]
    h = x.to(w.dtype) @ w if transposed else torch.nn.functional.linear(x.to(w.dtype), w)
    if getattr(ex, "has_bias", False):
        h = h + (ex.gate_up_proj_bias if gated else ex.up_proj_bias)[e]
    if not gated:
        return ex.act_fn(h)
    if hasattr(ex, "_apply_gate"):
        return ex._apply_gate(h)
    gate, up = h.chunk(2, dim=-1)
    return ex.act_fn(gate) * up


def expert_activations(ex: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The intermediate activations of each token's chosen experts: float32 [N, k, F_expert] from the experts'
    input x (shared by every expert: [N, d_model]; or each expert's own copy: [E, N, d_model]) and the router's
    choice idx [N, k] (slot s of token t: expert idx[t, s]). Recomputed from the experts' weights, one expert at a
    time over the tokens routed to it (the experts run fused or batched inside the model; their intermediate
    activations are nowhere to hook)."""
    N, k = idx.shape
    E = _n_experts(ex)
    out = None
    for e in torch.unique(idx).tolist():
        if not 0 <= e < E:  # an expert-parallel sentinel: no expert here
            continue
        tok, slot = torch.where(idx == e)
        a = _gate_up(ex, e, x[tok] if x.ndim == 2 else x[e, tok]).float()
        if out is None:
            out = torch.zeros((N, k, a.shape[-1]), device=a.device)
        out[tok, slot] = a
    return out if out is not None else torch.zeros((N, k, 0), device=x.device)


def _n_experts(ex: torch.nn.Module) -> int:
    """The number of experts of an experts module (0: not known)."""
    if getattr(ex, "num_experts", None):
        return int(ex.num_experts)
    if isinstance(ex, torch.nn.ModuleList):
        return len(ex)
    p3 = [p for p in ex.parameters(recurse=False) if p.ndim == 3]
    return int(p3[0].shape[0]) if p3 else 0


def routing_hook(block: MLPBlock, fn, neurons: bool = False) -> list[torch.utils.hooks.RemovableHandle]:
    """Register hooks that call ``fn(experts [N, k] int64, weights [N, k], acts)`` with a MoE block's routing and,
    with ``neurons``, its chosen experts' activations (``expert_activations``: [N, k, F_expert]; else None).
    Returns the handles (none: the routing is not readable).

    Experts modules behind transformers' ``@use_experts_implementation`` (fused 3-D experts of Mixtral, Qwen-MoE,
    OLMoE, gpt-oss, DeepSeek, ...) receive ``(hidden_states, top_k_index, top_k_weights)``: a pre-hook reads them.
    Otherwise the router (``router`` / ``gate``) with a ``top_k`` that returns ``(scores [N, E], logits)`` (Llama-4:
    sigmoid scores of the top-k logits, 0 elsewhere): the top-k of its logits and their scores; the experts then
    receive each expert's copy of the tokens scaled by its score ([E * N, d_model]), from which a pre-hook on them
    recomputes the activations."""
    ex = block.experts
    if ex is not None and hasattr(ex, "has_gate"):  # set by @use_experts_implementation

        def pre(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            idx = args[1] if len(args) > 1 else kwargs.get("top_k_index")
            w = args[2] if len(args) > 2 else kwargs.get("top_k_weights")
            if idx is not None and w is not None:
                acts = expert_activations(module, x.detach(), idx) if neurons and x is not None else None
                fn(idx.detach(), w.detach(), acts)

        return [ex.register_forward_pre_hook(pre, with_kwargs=True)]
    router = next((getattr(block.module, n) for n in ("router", "gate") if hasattr(block.module, n)), None)
    if router is None or not getattr(router, "top_k", None):
        return []
    chosen: list = []

    def post(module, args, output):
        if isinstance(output, tuple) and len(output) == 2 and output[0].shape == output[1].shape:
            scores, logits = output
            idx = torch.topk(logits.detach(), int(module.top_k), dim=-1).indices
            w = scores.detach().gather(-1, idx)
            if neurons and ex is not None:
                chosen[:] = [idx, w]  # the experts' pre-hook, next, adds the activations
            else:
                fn(idx, w, None)

    def experts_pre(module, args):
        if chosen and args:
            idx, w = chosen
            x = args[0].detach().reshape(_n_experts(module), idx.shape[0], -1)  # expert e's copy of the tokens
            chosen.clear()
            fn(idx, w, expert_activations(module, x, idx))

    handles = [router.register_forward_hook(post)]
    if neurons and ex is not None:
        handles.append(ex.register_forward_pre_hook(experts_pre))
    return handles


def expert_write_out(ex: torch.nn.Module, e: int) -> torch.Tensor:
    """Expert ``e``'s W_out as [d_model, F_expert]: column n is what its neuron n adds to the block's output (before
    the routing weight). ``is_transposed`` experts keep [E, F_expert, d_model]; an undecorated module's layout is
    told by its ``gate_up_proj`` ([E, d_model, 2 F]: transposed, as Llama-4's)."""
    w = ex.down_proj[e].detach()
    transposed = getattr(ex, "is_transposed", None)
    if transposed is None:
        transposed = w.shape[-1] == ex.gate_up_proj.shape[-2]
    return w.T if transposed else w


def write_out_weight(down: torch.nn.Module) -> torch.Tensor:
    """A down projection's W_out as [d_model, d_ff] (GPT-2's Conv1D stores [d_ff, d_model])."""
    w = down.weight.detach()
    return w.T if type(down).__name__ == "Conv1D" else w
