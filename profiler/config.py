"""How to profile: ``ProfileConfig`` (every field with its default and its help, which the CLI reads) and the
error for a prompt that cannot be profiled."""

from __future__ import annotations

from dataclasses import dataclass, field

from attnscope.kernels.contract import AttnStatsSpec

__all__ = ["ProfileConfig", "PromptError"]


class PromptError(ValueError):
    """A prompt is empty, or longer than the model's positions."""


@dataclass(frozen=True)
class ProfileConfig:
    """How to profile. Every field has a default that suits a single long prompt."""

    spec: AttnStatsSpec = field(default_factory=AttnStatsSpec)  # histogram bins, log range, thumbnail size
    batch_size: int = 1  # prompts per forward pass (length-bucketed, padded to the longest); 0 = auto (_auto_batches)
    token_budget: int = 8192  # batch_size 0: padded tokens per forward pass
    shard_size: int = 256  # prompts per shard (the unit of commit, resume, and length bucketing)
    keep_vectors: bool = True  # the per-token per-head vectors and per-prompt thumbnails (the vectors tier)
    allow_long: bool = False  # allow prompts longer than the model's max_position_embeddings
    keep_full: tuple[tuple[int, int], ...] = ()  # (layer, head) pairs whose full L x L matrices are kept
    full_max_tokens: int = 4096  # refuse to keep a full matrix of a longer prompt (L^2 * 4 bytes each)
    top_k: int = 8  # down_proj neurons kept per token
    neuron_contexts: int = 8  # running top-k activating tokens kept per neuron (FFN memories); 0: none
    logit_lens: bool = False  # per layer and token: top-1 token, entropy, p and rank of the next token
    impl: str = "auto"  # "auto" (Triton on CUDA, torch on CPU), "torch" or "triton"
    block_q: int = 128  # query block of the torch path: memory O(heads * block_q * L) per layer
    threads: int | None = None  # CPU threads of torch and of the Numba statistics (None: torch's default)
    progress: bool = True  # one tqdm bar: prompts, tokens/s, ETA
    model_id: str | None = None  # recorded in the profile; default: the model's name_or_path

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
