"""Capture post-rotary q/k of every attention layer and the down_proj input/output, without changing the output.

A transformers attention implementation named ``"attnscope"`` is registered with ``AttentionInterface``. While a
``capture`` context is active the model's config points to it; it runs the model's own backend (sdpa, eager,
flash, ...) for the real output, then hands ``query``/``key`` (GQA keys un-repeated), the module's ``scaling``
and its sliding window to a callback. A mask function of the same name is registered with
``AttentionMaskInterface`` that builds exactly the mask the original backend would get, so outputs are unchanged.
Padding reaches the statistics as ``KeyRanges`` (two integers per row), never as a dense L x L mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "capture",
    "down_proj_modules",
    "model_geometry",
]

IMPL_NAME = "attnscope"

# model_type -> name of the MLP down-projection module inside a block (TransformerLens: blocks.{L}.mlp.hook_post)
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "mlp.down_proj",
    "mistral": "mlp.down_proj",
    "qwen2": "mlp.down_proj",
    "qwen3": "mlp.down_proj",
    "gpt_neox": "mlp.dense_4h_to_h",
    "gpt2": "mlp.c_proj",
}


class UnsupportedModelError(ValueError):
    """The model's architecture is not one attnscope knows how to capture."""


@dataclass
class _Session:
    original: str  # the model's own attention implementation
    on_attention: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, float, int | None], None]


_ACTIVE: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("attnscope_capture", default=None)


def model_geometry(model: torch.nn.Module) -> dict:
    """Layers, heads, KV heads and head size of a supported model; raises ``UnsupportedModelError`` otherwise."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}: attnscope supports {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    n_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    n_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return {
        "model_type": model_type,
        "n_layers": int(n_layers),
        "n_heads": int(n_heads),
        "n_kv_heads": int(n_kv),
        "head_dim": int(head_dim),
        "max_positions": int(n_pos) if n_pos else None,
    }


def down_proj_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> the MLP down-projection module of that layer."""
    suffix = SUPPORTED_MODEL_TYPES[model_geometry(model)["model_type"]]
    found: dict[int, torch.nn.Module] = {}
    pattern = re.compile(r"(?:^|\.)(\d+)\." + re.escape(suffix) + r"$")
    for name, module in model.named_modules():
        m = pattern.search(name)
        if m:
            found[int(m.group(1))] = module
    return found


def _original_attention(module: torch.nn.Module, name: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
        # every modeling file defines its own eager function; the model would have used it
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _attnscope_attention(module, query, key, value, attention_mask, **kwargs):
    session = _ACTIVE.get()
    if session is None:
        raise RuntimeError("the 'attnscope' attention implementation is only usable inside attnscope.capture()")
    out = _original_attention(module, session.original)(module, query, key, value, attention_mask, **kwargs)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    session.on_attention(module, query, key, float(scaling), kwargs.get("sliding_window"))
    return out


def _attnscope_mask(*args, **kwargs):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    session = _ACTIVE.get()
    original = session.original if session is not None else "sdpa"
    fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(original, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return fn(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL_NAME, _attnscope_attention)
    AttentionMaskInterface.register(IMPL_NAME, _attnscope_mask)


@contextlib.contextmanager
def capture(
    model: torch.nn.Module,
    on_attention: Callable[[int, torch.Tensor, torch.Tensor, float, int | None], None],
    on_down_proj: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> Iterator[None]:
    """Route every attention layer of ``model`` through attnscope while the context is open.

    Args:
        model: a supported Hugging Face causal LM (see ``SUPPORTED_MODEL_TYPES``).
        on_attention: called as ``(layer, query [B, H, L, D], key [B, H_kv, L, D], scaling, sliding_window)``
            after the layer computed its real output.
        on_down_proj: called as ``(layer, x [B, L, d_ff], y [B, L, d_model])`` for each MLP down-projection.

    The model's own attention implementation and every hook are restored in ``finally``, also on error.
    """
    model_geometry(model)  # raises for unsupported architectures
    _register()
    config = model.config
    original = config._attn_implementation or "eager"
    if original == IMPL_NAME:
        raise RuntimeError("capture() contexts cannot be nested on the same model")

    def attention_cb(module, q, k, scaling, window):
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise UnsupportedModelError(f"attention module {type(module).__name__} has no layer_idx")
        on_attention(int(layer), q, k, scaling, window)

    handles = []
    token = _ACTIVE.set(_Session(original=original, on_attention=attention_cb))
    try:
        if on_down_proj is not None:
            for layer, module in down_proj_modules(model).items():
                handles.append(module.register_forward_hook(_down_proj_hook(layer, on_down_proj)))
        config._attn_implementation = IMPL_NAME
        yield
    finally:
        config._attn_implementation = original
        for h in handles:
            h.remove()
        _ACTIVE.reset(token)


def _down_proj_hook(layer: int, fn: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Callable:
    def hook(module, args, output):
        fn(layer, args[0], output)

    return hook
