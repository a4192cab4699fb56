"""The logit lens: each layer's residual stream read through the final norm and the unembedding, reduced on the spot.

For layer l and token t, h = final_norm(resid_post[l][t]) and the distribution softmax(h W_U^T + b) is reduced by
``attnscope.kernels.vocab_stats`` to its top-1 token and probability, entropy, and the probability and rank of the
token that actually comes next. The [tokens x vocab] logits of a layer are never held at once (vocabulary chunks on
the CPU, a fused matmul + online-softmax kernel on CUDA), and layers are reduced one by one as the forward pass
produces them. The last layer's lens is the model's own next-token distribution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .blocks import decoder_layers, final_norm, logit_transform
from .columns import LENS_ARRAYS

__all__ = [
    "LENS_FIELDS",
    "LensCollector",
    "lens_modules",
    "logit_lens",
    "next_token_entropy",
    "next_token_targets",
    "residual_hooks",
    "vocab_stats",
]

# what the lens computes per layer and token, as the run stores it (``columns.LENS_COLUMNS``)
LENS_FIELDS = tuple(key.removeprefix("lens.") for key in LENS_ARRAYS)


def lens_modules(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.Module, torch.nn.Module]:
    """(decoder layers, final norm, unembedding) of a model, found by structure (``blocks``)."""
    return decoder_layers(model), final_norm(model), model.get_output_embeddings()


def vocab_stats(
    h: torch.Tensor,  # [T, d] hidden rows after the final norm
    weight: torch.Tensor,  # [V, d]
    target: torch.Tensor,  # [T] int64, -1: none
    bias: torch.Tensor | None = None,
    impl: str = "auto",
    budget: int = 1 << 22,  # logits per chunk: 16 MB of float32 per temporary
    scale: float = 1.0,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """``kernels.vocab_stats`` on CUDA (Triton) or the CPU (torch, vocabulary chunks of at most ``budget`` logits),
    of the logits the model outputs: softcap * tanh(scale * z / softcap) (``blocks.logit_transform``)."""
    if scale != 1.0:  # scale * (h W^T + b) = (scale h) W^T + scale b
        h = h * scale
        bias = None if bias is None else bias * scale
    use_triton = impl == "triton" or (impl == "auto" and h.is_cuda)
    if use_triton:
        from attnscope.kernels.vocab_stats import vocab_stats_triton

        return vocab_stats_triton(h, weight.to(h.dtype), target, bias, softcap=softcap)
    from attnscope.kernels.vocab_stats_torch import vocab_stats_torch

    chunk = max(256, budget // max(1, h.shape[0]))
    return vocab_stats_torch(h, weight, target, bias, chunk=chunk, softcap=softcap)


def next_token_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L] the token after each position, -1 at the last real token and on padding."""
    nxt = torch.full_like(ids, -1)
    nxt[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -1)
    return torch.where(mask.bool(), nxt, -1)


@contextlib.contextmanager
def residual_hooks(model: torch.nn.Module, fn: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(layer, resid_post [B, L, d])`` after every decoder layer (TransformerLens:
    ``blocks.{l}.hook_resid_post``); hooks are removed in ``finally``."""
    layers, _, _ = lens_modules(model)

    def make(layer: int):
        def hook(module, args, output):
            fn(layer, output[0] if isinstance(output, tuple) else output)

        return hook

    handles = [m.register_forward_hook(make(i)) for i, m in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class LensCollector:
    """Reduces every layer's residual stream of one batch as the forward pass produces it (``on_layer``), then
    ``finish()`` gives ``{field: [layers, T]}`` over the batch's real tokens in row-major order."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, impl: str = "auto"):
        self.sel = mask.bool()  # [B, L]
        self.target = next_token_targets(ids, mask)[self.sel]  # [T]
        _, self.norm, self.head = lens_modules(model)
        self.bias = getattr(self.head, "bias", None)
        self.scale, self.softcap = logit_transform(model)
        self.impl = impl
        self.rows: dict[int, dict[str, torch.Tensor]] = {}
        self.kept: dict[int, torch.Tensor] = {}

    def on_layer(self, layer: int, resid: torch.Tensor) -> None:
        h = self.norm(resid[self.sel.to(resid.device)])  # [T, d]
        self.rows[layer] = vocab_stats(
            h, self.head.weight, self.target.to(h.device), self.bias, self.impl, scale=self.scale, softcap=self.softcap
        )
        self.kept[layer] = h

    def finish(self) -> dict[str, torch.Tensor]:
        rows, w, bias = self.rows, self.head.weight, self.bias
        final_top = rows[max(rows)]["top_id"]  # [T] the model's own prediction
        for layer, h in self.kept.items():
            z = torch.linalg.vecdot(h.float(), w[final_top].float())  # [T] logit of the final prediction
            if bias is not None:
                z = z + bias[final_top].float()
            z = z * self.scale
            if self.softcap is not None:
                z = torch.tanh(z / self.softcap) * self.softcap
            rows[layer]["final_prob"] = torch.exp(z - rows[layer]["lse"])
        self.kept.clear()
        return {f: torch.stack([rows[i][f].cpu() for i in sorted(rows)]) for f in LENS_FIELDS}


def next_token_entropy(model: torch.nn.Module, hidden: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Entropy (nats) of the model's next-token distribution at each row of the final hidden states [T, d] (after
    the final norm), by the lens' own reduction: the logits are never held at once."""
    head = model.get_output_embeddings()
    target = torch.full(hidden.shape[:1], -1, dtype=torch.long, device=hidden.device)
    scale, softcap = logit_transform(model)
    bias = getattr(head, "bias", None)
    return vocab_stats(hidden, head.weight, target, bias, impl, scale=scale, softcap=softcap)["entropy"]


def logit_lens(
    model: torch.nn.Module,
    batch: dict,
    impl: str = "auto",
) -> tuple[object, dict[str, torch.Tensor]]:
    """Run ``model(**batch)`` once and return ``(output, lens)``.

    ``lens[name]`` is [layers, T] over the real tokens of the batch in row-major order, for each name of
    ``LENS_FIELDS`` (``top_id`` and ``target_rank`` int64, -1 rank where no next token is known).
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    lens = LensCollector(model, ids, torch.ones_like(ids) if mask is None else mask, impl)
    with torch.no_grad(), residual_hooks(model, lens.on_layer):
        output = model(**batch)
        return output, lens.finish()
