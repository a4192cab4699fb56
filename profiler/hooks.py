"""Capture post-rotary q/k of every attention layer and the down_proj input/output, without changing the output.

A transformers attention implementation named ``"attnscope"`` is registered with ``AttentionInterface``. While a
``capture`` context is active the model's config points to it; it runs the model's own backend (sdpa, eager,
flash, ...) for the real output, then hands ``query``/``key`` (GQA keys un-repeated), the module's ``scaling``,
its sliding window and the attention's log-sum-exp (when the backend gives one, else None) to a callback.

The log-sum-exp comes from the attention the model runs anyway. With the ``sdpa`` backend, while a capture context
is open, ``torch.nn.functional.scaled_dot_product_attention`` is stood in for by a function (installed once by the
first open context, restored by the last; a pass-through outside a captured layer) that, during a layer, asks torch
which kernel it would pick for exactly those arguments (``torch._fused_sdp_choice``, ``sdpa_backend``) and, where
that kernel has an lse-returning entry point (``lse_op``), calls it instead, as ``scaled_dot_product_attention``
itself calls it, and keeps the lse (``normalise_lse`` makes every op's lse [B, H, L] float32):
- CPU, flash kernel (torch's choice for float inputs, with or without a mask):
  ``aten._scaled_dot_product_flash_attention_for_cpu``, after the same boolean-mask conversion; the output is
  bit-identical (tested on every tiny architecture).
- CUDA, no mask (``is_causal``), head size a multiple of 8: the flash kernel
  (``aten._scaled_dot_product_flash_attention``, lse [B, H, L]), the memory-efficient one
  (``aten._scaled_dot_product_efficient_attention``, lse [B, H, L rounded up to 32]) or cuDNN's
  (``aten._scaled_dot_product_cudnn_attention``, lse [B, H, L, 1]; torch >= 2.10 prefers it on sm_90). The last
  two are asked for an lse that the plain call does not compute in inference; ``tests/test_capture.py`` checks on a
  GPU that their output stays bit-identical.
Everywhere else (eager or flash-attn backends, the math kernel, a mask on CUDA, dropout, torch without
``_fused_sdp_choice``) the call goes to torch unchanged and the lse is None: the statistics then compute it.

A mask function of the same name is registered with
``AttentionMaskInterface`` that builds exactly the mask the original backend would get, so outputs are unchanged.
Padding reaches the statistics as ``KeyRanges`` (two integers per row), never as a dense L x L mask.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "SDP_BACKENDS",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "capture",
    "down_proj_modules",
    "lse_op",
    "lse_sources",
    "model_geometry",
    "normalise_lse",
    "sdpa_backend",
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
    on_attention: Callable[..., None]  # (module, query, key, scaling, sliding_window, lse)


_ACTIVE: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("attnscope_capture", default=None)
# the lse of the scaled_dot_product_attention calls of the layer running now (None: no layer is collecting)
_LSE_SLOT: contextvars.ContextVar[list | None] = contextvars.ContextVar("attnscope_lse", default=None)
# counts of the lse sources while ``lse_sources()`` is active
_LSE_COUNTS: contextvars.ContextVar[collections.Counter | None] = contextvars.ContextVar(
    "attnscope_lse_n", default=None
)
_SDPA = torch.nn.functional.scaled_dot_product_attention
# torch.nn.attention.SDPBackend values returned by torch._fused_sdp_choice
SDP_BACKENDS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
_FLASH, _EFFICIENT, _CUDNN = 1, 2, 3


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


def sdpa_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The ``SDPBackend`` value ``scaled_dot_product_attention`` would pick for these arguments (see
    ``SDP_BACKENDS``), or None where torch cannot say."""
    try:
        return int(
            torch._fused_sdp_choice(
                query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
            )
        )
    except (AttributeError, TypeError, RuntimeError):
        return None


def lse_op(backend: int | None, device_type: str, has_mask: bool, head_dim: int) -> str | None:
    """The aten op that gives the lse for torch's choice ``backend``, or None where attnscope takes none."""
    if device_type == "cpu":
        return "_scaled_dot_product_flash_attention_for_cpu" if backend == _FLASH else None
    if device_type != "cuda" or has_mask or head_dim % 8:
        return None
    return {
        _FLASH: "_scaled_dot_product_flash_attention",
        _EFFICIENT: "_scaled_dot_product_efficient_attention",
        _CUDNN: "_scaled_dot_product_cudnn_attention",
    }.get(backend)


def normalise_lse(lse: torch.Tensor, B: int, H: int, L: int) -> torch.Tensor | None:
    """[B, H, L] float32 from an op's lse: flash [B, H, L], efficient [B, H, L rounded up to 32], cuDNN
    [B, H, L, 1]; None for any other shape."""
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse[..., 0]  # cuDNN
    if lse.dim() != 3 or tuple(lse.shape[:2]) != (B, H) or lse.shape[2] < L:
        return None
    return lse[..., :L].float()  # efficient: rows past L are padding


def _call_lse_op(op: str, query, key, value, attn_mask, dropout_p, is_causal, scale):
    """``(output, raw lse)`` from one aten op, with the arguments ``scaled_dot_product_attention`` gives it."""
    fn = getattr(torch.ops.aten, op)
    if op == "_scaled_dot_product_flash_attention_for_cpu":
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # as scaled_dot_product_attention converts it
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                attn_mask.logical_not(), float("-inf")
            )
        res = fn(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    elif op == "_scaled_dot_product_flash_attention":
        res = fn(query, key, value, dropout_p, is_causal, False, scale=scale)
    elif op == "_scaled_dot_product_efficient_attention":
        res = fn(query, key, value, None, True, dropout_p, is_causal, scale=scale)
    else:  # cuDNN: (query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask)
        res = fn(query, key, value, None, True, dropout_p, is_causal, False, scale=scale)
    return res[0], res[1]


def _attention_with_lse(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """``(output, lse [B, H, L] float32, op name)`` from the kernel ``scaled_dot_product_attention`` would run on
    these arguments, or ``(None, None, why not)`` where that kernel returns no lse (or its result could differ from
    the plain call's)."""
    if dropout_p or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return None, None, "none (dropout or autograd)"
    backend = sdpa_backend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    op = lse_op(backend, query.device.type, attn_mask is not None, query.shape[-1])
    if op is None:
        masked = ", with a mask" if attn_mask is not None else ""
        return None, None, f"none ({SDP_BACKENDS.get(backend, backend)} kernel on {query.device.type}{masked})"
    out, raw = _call_lse_op(op, query, key, value, attn_mask, dropout_p, is_causal, scale)
    B, H, L, _ = query.shape
    lse = normalise_lse(raw, B, H, L)
    if lse is None:
        return None, None, f"none ({op} gave an lse of shape {list(raw.shape)})"
    return out, lse, op


def _sdpa_collecting(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Stands in for ``torch.nn.functional.scaled_dot_product_attention`` while a layer runs: the same output, and
    the lse appended to the layer's slot (None when the kernel gives none)."""
    slot = _LSE_SLOT.get()
    out = None
    if slot is not None:
        out, lse, source = _attention_with_lse(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        slot.append(lse)
        counts = _LSE_COUNTS.get()
        if counts is not None:
            counts[source] += 1
    if out is not None:
        return out
    kw = {"enable_gqa": True} if enable_gqa else {}
    return _INNER(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)


@contextlib.contextmanager
def lse_sources() -> Iterator[collections.Counter]:
    """While active, counts where the lse of every captured ``sdpa`` attention call came from: the aten op's name,
    or ``"none (why)"`` where none gave one (the statistics then compute it)."""
    counts: collections.Counter = collections.Counter()
    token = _LSE_COUNTS.set(counts)
    try:
        yield counts
    finally:
        _LSE_COUNTS.reset(token)


def _attnscope_attention(module, query, key, value, attention_mask, **kwargs):
    session = _ACTIVE.get()
    if session is None:
        raise RuntimeError("the 'attnscope' attention implementation is only usable inside attnscope.capture()")
    fn = _original_attention(module, session.original)
    slot: list = []
    if session.original == "sdpa":  # this layer's sdpa calls (through the stand-in ``capture`` installed) keep the lse
        token = _LSE_SLOT.set(slot)
        try:
            out = fn(module, query, key, value, attention_mask, **kwargs)
        finally:
            _LSE_SLOT.reset(token)
    else:
        out = fn(module, query, key, value, attention_mask, **kwargs)
    B, H, L, _ = query.shape
    lse = slot[0] if len(slot) == 1 and slot[0] is not None and slot[0].shape == (B, H, L) else None
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    session.on_attention(module, query, key, float(scaling), kwargs.get("sliding_window"), lse)
    return out


def _attnscope_mask(*args, **kwargs):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    session = _ACTIVE.get()
    original = session.original if session is not None else "sdpa"
    fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(original, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return fn(*args, **kwargs)


_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0  # open capture contexts that need the stand-in
_INNER = _SDPA  # what the stand-in calls outside a collecting layer (what it replaced)


@contextlib.contextmanager
def _sdpa_stand_in() -> Iterator[None]:
    """``torch.nn.functional.scaled_dot_product_attention`` is ``_sdpa_collecting`` while any capture context is
    open (installed by the first, restored by the last, under a lock: contexts in several threads never restore
    each other's). Outside a collecting layer it calls torch's own function with the same arguments, so any other
    caller, in any thread, gets exactly what torch gives."""
    global _PATCH_USERS, _INNER
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            _INNER = torch.nn.functional.scaled_dot_product_attention  # torch's, or whatever stood there before
            torch.nn.functional.scaled_dot_product_attention = _sdpa_collecting
        _PATCH_USERS += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH_USERS -= 1
            if _PATCH_USERS == 0:
                torch.nn.functional.scaled_dot_product_attention = _INNER


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL_NAME, _attnscope_attention)
    AttentionMaskInterface.register(IMPL_NAME, _attnscope_mask)


@contextlib.contextmanager
def capture(
    model: torch.nn.Module,
    on_attention: Callable[[int, torch.Tensor, torch.Tensor, float, int | None, torch.Tensor | None], None],
    on_down_proj: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> Iterator[None]:
    """Route every attention layer of ``model`` through attnscope while the context is open.

    Args:
        model: a supported Hugging Face causal LM (see ``SUPPORTED_MODEL_TYPES``).
        on_attention: called as ``(layer, query [B, H, L, D], key [B, H_kv, L, D], scaling, sliding_window, lse)``
            after the layer computed its real output; ``lse`` [B, H, L] float32 is the natural-log log-sum-exp of
            each row from the model's own attention kernel, or None where that kernel gives none (see above).
        on_down_proj: called as ``(layer, x [B, L, d_ff], y [B, L, d_model])`` for each MLP down-projection.

    The model's own attention implementation and every hook are restored in ``finally``, also on error.
    """
    model_geometry(model)  # raises for unsupported architectures
    _register()
    config = model.config
    original = config._attn_implementation or "eager"
    if original == IMPL_NAME:
        raise RuntimeError("capture() contexts cannot be nested on the same model")

    def attention_cb(module, q, k, scaling, window, lse):
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise UnsupportedModelError(f"attention module {type(module).__name__} has no layer_idx")
        on_attention(int(layer), q, k, scaling, window, lse)

    handles = []
    stand_in = _sdpa_stand_in() if original == "sdpa" else contextlib.nullcontext()
    token = _ACTIVE.set(_Session(original=original, on_attention=attention_cb))
    try:
        with stand_in:
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
