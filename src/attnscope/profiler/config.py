"""How to profile: ``ProfileConfig`` (every field with its default and its help, which the CLI reads) and the
error for a prompt that cannot be profiled."""

from __future__ import annotations

from dataclasses import dataclass, field

from attnscope.kernels.contract import AttnStatsSpec

__all__ = ["ProfileConfig", "PromptError"]


class PromptError(ValueError):
    """A prompt is empty, or longer than the model's positions."""


def _option(default, help: str):
    """A field with its default and its help: ``attnscope profile --help`` shows both (see cli/profile.py)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ProfileConfig:
    """How to profile. Every field has a default that suits a single long prompt.

    Each field's ``metadata["help"]`` is its one description, worded for ``attnscope profile --help`` (which
    appends the default); fields whose option takes another form there (``--batch-size auto``, ``--keep``,
    ``--keep-head``, ``--no-progress``) or that have no option are described for the Python API.
    """

    spec: AttnStatsSpec = field(
        default_factory=AttnStatsSpec, metadata={"help": "histogram bins, log range, thumbnail size"}
    )
    batch_size: int = _option(
        1,
        "prompts per forward pass, length-bucketed within a shard and padded to the longest; 0: auto, batches of "
        "similar length, cut where padding would cost more than another forward pass, of at most token_budget "
        "padded tokens",
    )
    token_budget: int = _option(8192, "padded tokens per forward pass with --batch-size auto")
    shard_size: int = _option(256, "prompts per shard: the unit of commit and resume; a kill loses at most one shard")
    keep_vectors: bool = _option(
        True, "keep the per-token per-head vectors and per-prompt thumbnails (the vectors tier)"
    )
    allow_long: bool = _option(False, "allow prompts longer than the model's positions")
    keep_full: tuple[tuple[int, int], ...] = _option(
        (), "(layer, head) pairs whose full L x L matrices are kept (up to full_max_tokens)"
    )
    full_max_tokens: int = _option(
        4096, "longest prompt whose full matrices may be kept; each is L x L float32, 64 MB at 4096 tokens"
    )
    top_k: int = _option(8, "down_proj neurons kept per token")
    neuron_contexts: int = _option(
        8, "most-activating tokens kept per MLP neuron over the whole run, for `attnscope rules`; 0: none"
    )
    logit_lens: bool = _option(
        False,
        "also the logit lens: per layer and token the top-1 next token, its probability, the entropy, and the "
        "probability and rank of the true next token (Ly x 6 numbers a token)",
    )
    impl: str = _option("auto", "statistics implementation; auto: Triton on CUDA, torch on the CPU")
    block_q: int = _option(128, "query block of the torch path: memory O(heads * block_q * L) per layer")
    threads: int | None = _option(None, "CPU threads for torch and the statistics (default: torch's)")
    progress: bool = _option(True, "one tqdm bar: prompts, tokens/s, ETA")
    model_id: str | None = _option(None, "recorded in the profile (default: the model's name_or_path)")

    def __post_init__(self) -> None:
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 1, or 0 for auto, got {self.batch_size}")
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {self.token_budget}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.neuron_contexts < 0:
            raise ValueError(f"neuron_contexts must be >= 0, got {self.neuron_contexts}")
        if self.block_q < 1:
            raise ValueError(f"block_q must be >= 1, got {self.block_q}")
        if self.full_max_tokens < 1:
            raise ValueError(f"full_max_tokens must be >= 1, got {self.full_max_tokens}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        object.__setattr__(self, "keep_full", tuple((int(a), int(b)) for a, b in self.keep_full))

    def to_dict(self) -> dict:
        return {
            "spec": self.spec.to_dict(),
            "batch_size": self.batch_size,
            "token_budget": self.token_budget,
            "shard_size": self.shard_size,
            "keep_vectors": self.keep_vectors,
            "allow_long": self.allow_long,
            "keep_full": [list(x) for x in self.keep_full],
            "full_max_tokens": self.full_max_tokens,
            "top_k": self.top_k,
            "neuron_contexts": self.neuron_contexts,
            "logit_lens": self.logit_lens,
            "impl": self.impl,
            "block_q": self.block_q,
        }
