"""A learned prompt encoder over the small fixed vocabulary of the digits world.

Plays the role of SD3's text encoders: it turns a prompt into a short sequence of token embeddings
(the transformer's `encoder_hidden_states`) and a pooled embedding (`pooled_projections`). The empty
prompt "" is the null prompt of classifier-free guidance; it encodes to a dedicated [null] token.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pec.data.prompts import VOCABULARY
from pec.models.base import PromptBatch

PAD, NULL = "[pad]", "[null]"


class PromptEncoder(nn.Module):
    """Token + position embeddings and a small MLP for the pooled embedding.

    Args:
        dim: width of the token and pooled embeddings.
        max_tokens: sequence length L (prompts are padded to it; longer prompts are an error).
        vocabulary: the known words; anything else raises a ValueError naming it.
    """

    def __init__(self, dim: int = 64, max_tokens: int = 4, vocabulary: Sequence[str] = VOCABULARY) -> None:
        super().__init__()
        self.dim, self.max_tokens = dim, max_tokens
        self.vocabulary = tuple(vocabulary)
        self._ids = {w: i for i, w in enumerate((PAD, NULL) + self.vocabulary)}
        self.tokens = nn.Embedding(len(self._ids), dim)
        self.positions = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        self.pool = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (B, L) int64, padded with [pad]; "" becomes [null]."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of strings, got a single str")
        rows = []
        for prompt in prompts:
            words = prompt.lower().split() or [NULL]
            unknown = [w for w in words if w != NULL and w not in self.vocabulary]
            if unknown:
                raise ValueError(f"prompt {prompt!r} has unknown words {unknown}; "
                                 f"the vocabulary is {list(self.vocabulary)}")
            if len(words) > self.max_tokens:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {self.max_tokens} fit")
            rows.append([self._ids[w] for w in words] + [self._ids[PAD]] * (self.max_tokens - len(words)))
        ids = torch.tensor(rows, dtype=torch.int64).reshape(-1, self.max_tokens)
        return ids.to(self.positions.device, non_blocking=True)  # no host sync in a training step

    def detokenize(self, ids: torch.Tensor) -> list[str]:
        """Inverse of `tokenize` (pads dropped, [null] back to "")."""
        words = list(self._ids)
        return [" ".join(words[i] for i in row if words[i] not in (PAD, NULL)) for row in ids.tolist()]

    def forward(self, prompts: Sequence[str]) -> PromptBatch:
        """Encode prompts into token embeddings (B, L, dim) and pooled embeddings (B, dim)."""
        ids = self.tokenize(prompts)
        mask = (ids != self._ids[PAD]).unsqueeze(-1).to(self.positions.dtype)
        embeds = self.tokens(ids) + self.positions
        pooled = self.pool((embeds * mask).sum(1) / mask.sum(1))
        return PromptBatch(embeds, pooled)
