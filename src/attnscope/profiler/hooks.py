"""Capture post-rotary q/k of every attention layer and each MLP block's input/output, without changing the output.

A transformers attention implementation named ``"attnscope"`` is registered with ``AttentionInterface``. While a
``capture`` context is active the model's config points to it; it runs the model's own backend (sdpa, eager,
flash, ...) for the real output, then hands an ``AttentionCall`` to a callback: ``query``/``key`` (GQA keys
un-repeated) and what the module itself passes to the interface (``scaling``, ``softcap``, learned sinks
``s_aux``), the layer's mask kind (full causal, a sliding window, chunks) and the attention's log-sum-exp (when the
backend gives one, else None). Any model whose attention modules call the interface is captured: nothing here
lists model types (``blocks`` finds the layers and MLP blocks by structure).

The layer's mask kind comes from the mask itself: the mask function registered under the same name (below) sees
the ``mask_function`` transformers composed for each mask it builds (causal, sliding-window or chunked overlay),
classifies it by evaluating it on a small grid of positions, and remembers which mask object is which; the
attention call looks its mask up. A mask the model did not build through ``masking_utils`` cannot be classified:
the call raises ``UnsupportedModelError``. Where the backend running the model computes something other than the
model's eager code (``sdpa`` ignores learned sinks), the capture notes it once (``CaptureInfo.notes``).

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
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch

from .blocks import UnsupportedModelError, check_capturable, mlp_blocks, routing_hook

__all__ = [
    "SDP_BACKENDS",
    "AttentionCall",
    "CaptureInfo",
    "UnsupportedModelError",
    "as_tokens",
    "capture",
    "down_proj_modules",
    "lse_op",
    "lse_sources",
    "normalise_lse",
    "sdpa_backend",
]

IMPL_NAME = "attnscope"


@dataclass
class AttentionCall:
    """One attention layer's call, as the model made it (what ``capture``'s ``on_attention`` receives).

    Attributes:
        layer: the module's ``layer_idx``.
        query: [B, H, L, D] post-rotary queries; key: [B, H_kv, L, D] keys (GQA keys not repeated).
        scaling: the module's own score scale (1/sqrt(D) where it passes none).
        window: the layer's sliding window (a query sees itself and window - 1 keys before it), or None.
        chunk: the layer's chunk size (chunked attention: the keys of the query's own chunk), or None.
        softcap: attention-logit softcapping (s' = c tanh(s / c)), or None.
        sinks: [H] learned sink logits in the softmax's denominator, or None.
        lse: [B, H, L] float32 log-sum-exp of each row from the model's own kernel, or None (then the statistics
            compute it; always None with softcapping or sinks).
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    window: int | None = None
    chunk: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    lse: torch.Tensor | None = None


@dataclass
class CaptureInfo:
    """What a ``capture`` context saw: where the backend's attention differs from the model's eager code
    (``notes``, one line each)."""

    notes: set = field(default_factory=set)


@dataclass
class _Session:
    original: str  # the model's own attention implementation
    on_attention: Callable[[AttentionCall], None]
    info: CaptureInfo
    masks: dict = field(default_factory=dict)  # id(mask) -> (mask, window, chunk); None: ambiguous
    # layer -> weak references to (query, key) of its last call in this forward: holding the tensors themselves
    # would keep every layer's q and k alive until the forward ends (~25 MB a layer of SmolLM2 at 8k tokens)
    calls: dict = field(default_factory=dict)


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


def down_proj_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> the down projection of that layer's dense MLP (MoE layers are absent)."""
    return {i: b.down for i, b in mlp_blocks(model).items() if b.down is not None}


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
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    if sinks is not None and session.original == "sdpa":
        session.info.notes.add(
            "the sdpa backend leaves out the learned attention sinks (s_aux) the model's eager attention has: the "
            "statistics are of the eager attention, the model's output is sdpa's"
        )
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise UnsupportedModelError(f"attention module {type(module).__name__} has no layer_idx")
    if kwargs.get("position_bias") is not None:  # Inkling's relative-position logits: an L x L additive bias
        raise UnsupportedModelError(
            f"layer {layer} adds a position_bias to its attention scores (an L x L additive bias): attnscope's "
            "statistics take scores that are q . k scaled, softcapped and masked by two integers per row only"
        )
    window, chunk = _layer_kind(session, attention_mask, kwargs.get("sliding_window"), int(layer))
    if softcap is not None or sinks is not None:
        lse = None  # the kernel's lse need not be of the capped scores or count the sinks
    call = AttentionCall(
        int(layer),
        query,
        key,
        float(scaling),
        window,
        chunk,
        None if softcap is None else float(softcap),
        None if sinks is None else sinks.detach(),
        lse,
    )
    last = session.calls.get(call.layer)
    if last is not None and last[0]() is query and last[1]() is key:
        return out  # the same scores again (DiffLlama's second call, on the other half of V): counted once
    session.calls[call.layer] = (weakref.ref(query), weakref.ref(key))
    session.on_attention(call)
    return out


def _layer_kind(session: _Session, mask, sliding_window, layer: int) -> tuple[int | None, int | None]:
    """(window, chunk) of the layer whose attention got ``mask``, from the mask function it was built with."""
    if mask is None:
        if session.original in ("sdpa", "eager"):  # ``is_causal``: skipped only where plain causal attention is exact
            return None, None
        return (int(sliding_window) if sliding_window else None), None  # flash backends: the window argument
    got = session.masks.get(id(mask), False)
    if got is None or (got is False and mask.dim() == 2):  # a flash backend's padding mask: its window argument
        return (int(sliding_window) if sliding_window else None), None
    if got is False:
        raise UnsupportedModelError(
            f"layer {layer}'s attention mask was not built by transformers' masking_utils, so its kind (causal, "
            "sliding, chunked) is unknown"
        )
    if got[1] == "other":
        raise UnsupportedModelError(
            f"layer {layer}'s attention mask is neither causal, sliding-window nor chunked (a mask_function "
            "attnscope cannot express as two integers per row)"
        )
    return got[1], got[2]


def classify_mask_function(mask_function: Callable, local_size: int | None) -> tuple:
    """``("full", None, None)``, ``("sliding", window, None)``, ``("chunked", None, chunk)`` or ``("other", ...)``:
    the pattern of a transformers mask function (``masking_utils``: batch, head, query and key index -> allowed),
    found by evaluating it on the rows where the patterns differ (keys 0 .. 2 local_size + 2) against each
    pattern's definition."""
    w = int(local_size or 4)
    n = 2 * w + 3
    kv = torch.arange(n)
    q = torch.tensor(sorted({0, 1, w - 1, w, w + 1, 2 * w - 1, 2 * w, 2 * w + 1, 2 * w + 2}))  # where patterns differ
    zero = torch.zeros((), dtype=torch.long)
    try:
        got = mask_function(zero, zero, q[:, None], kv[None, :])
        got = torch.as_tensor(got, dtype=torch.bool).expand(len(q), n)
    except Exception:  # a mask function over other indices than positions
        return "other", None, None
    causal = kv[None, :] <= q[:, None]
    if torch.equal(got, causal):
        return "full", None, None
    if local_size:
        if torch.equal(got, causal & (kv[None, :] > q[:, None] - w)):
            return "sliding", w, None
        if torch.equal(got, causal & (kv[None, :] // w == q[:, None] // w)):
            return "chunked", None, w
    return "other", None, None


def _attnscope_mask(*args, **kwargs):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    session = _ACTIVE.get()
    original = session.original if session is not None else "sdpa"
    fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(original, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    mask = fn(*args, **kwargs)
    if session is not None and isinstance(mask, torch.Tensor) and "mask_function" in kwargs:
        kind, window, chunk = classify_mask_function(kwargs["mask_function"], kwargs.get("local_size"))
        key = id(mask)
        entry = (mask, kind if kind == "other" else window, chunk)
        old = session.masks.get(key)
        if old is not None and old[0] is mask and old[1:] != entry[1:]:
            entry = None  # one mask object stands for two kinds (a flash backend's padding mask)
        session.masks[key] = entry  # the entry holds the mask: its id is not reused while the session lives
    return mask


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
    on_attention: Callable[[AttentionCall], None],
    on_mlp: Callable[[int, torch.Tensor | None, torch.Tensor], None] | None = None,
    on_route: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None = None,
    expert_neurons: bool = False,
) -> Iterator[CaptureInfo]:
    """Route every attention layer of ``model`` through attnscope while the context is open.

    Args:
        model: a Hugging Face causal LM whose attention modules call transformers' attention interface
            (``blocks.check_capturable`` raises ``UnsupportedModelError`` for any other, before any work).
        on_attention: called with an ``AttentionCall`` after each attention layer computed its real output.
        on_mlp: called as ``(layer, x, y)`` for each MLP block: a dense block's down projection input
            x [B, L, d_ff] (the neuron activations) and output y [B, L, d_model] (the block's output); a
            mixture-of-experts block's output y [B, L, d_model] with x None.
        on_route: called as ``(layer, experts [B * L, k] int64, weights [B * L, k], acts)`` for each
            mixture-of-experts block: the experts its router chose for each token (row-major over the batch) and
            their weights, as the block applies them (``blocks.routing_hook``); with ``expert_neurons`` ``acts`` is
            the chosen experts' intermediate activations [B * L, k, F_expert] (``blocks.expert_activations``),
            else None.

    Yields a ``CaptureInfo`` that fills as the model runs. The model's own attention implementation and every
    hook are restored in ``finally``, also on error.
    """
    check_capturable(model)
    _register()
    config = model.config
    original = config._attn_implementation or "eager"
    if original == IMPL_NAME:
        raise RuntimeError("capture() contexts cannot be nested on the same model")
    info = CaptureInfo()
    handles = []
    stand_in = _sdpa_stand_in() if original == "sdpa" else contextlib.nullcontext()
    token = _ACTIVE.set(_Session(original=original, on_attention=on_attention, info=info))
    try:
        with stand_in:
            for layer, block in (mlp_blocks(model) if on_mlp or on_route else {}).items():
                if on_mlp is not None:
                    hooked = block.down if block.down is not None else block.module
                    hook = _mlp_hook(layer, block.down is not None, on_mlp)
                    handles.append(hooked.register_forward_hook(hook, with_kwargs=True))
                if on_route is not None and block.kind == "moe":
                    handles += routing_hook(block, partial(on_route, layer), expert_neurons)
            config._attn_implementation = IMPL_NAME
            yield info
    finally:
        config._attn_implementation = original
        for h in handles:
            h.remove()
        _ACTIVE.reset(token)


def _mlp_hook(layer: int, dense: bool, fn: Callable) -> Callable:
    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()), None)
        if dense:
            fn(layer, x, output)
            return
        y = output[0] if isinstance(output, tuple) else output
        if x is not None and y.dim() == 2 and x.dim() == 3:  # blocks that return [B * L, d] (Llama-4)
            y = y.reshape(x.shape)
        fn(layer, None, y)

    return hook


def as_tokens(x: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """An MLP tensor as [B, L, d] for a batch's [B, L] mask (OPT's MLP works on [B * L, d])."""
    if x is None or x.dim() == 3:
        return x
    return x.reshape(*mask.shape, x.shape[-1])
