"""One request as the scheduler sees it: its tokens and its place in the paged KV cache.

Plain Python on purpose (no torch): the scheduler and block manager are tested on their own.
"""
from __future__ import annotations

from enum import Enum, auto
from typing import Any


class SequenceStatus(Enum):
    WAITING = auto()  # queued, or preempted; holds no KV blocks
    RUNNING = auto()  # admitted; holds blocks for its computed (and scheduled) positions
    FINISHED = auto()  # done or aborted; holds nothing


class Sequence:
    """Prompt plus generated tokens of one request, and how much of its KV is computed.

    `token_ids[:num_computed_tokens]` have KV in the slots named by `block_table`. Generated
    tokens are kept on preemption, so recomputing them yields the same cache.
    """

    def __init__(self, seq_id: Any, prompt_token_ids: list[int], max_tokens: int,
                 sampling_params: Any = None):
        if len(prompt_token_ids) == 0:
            raise ValueError(f"sequence {seq_id!r}: prompt_token_ids is empty; "
                             "pass at least one token")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"sequence {seq_id!r}: max_tokens must be an integer >= 1, "
                             f"got {max_tokens!r}")
        self.seq_id = seq_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.max_tokens = max_tokens
        self.sampling_params = sampling_params  # opaque to the scheduler; for the engine
        self.cache_prefix = True  # False: never reuse cached blocks (every position is computed)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit on the latest admission
        self.block_table: list[int] = []  # physical block ids, one per block_size positions
        self.block_hashes: list[int] = []  # hash chain of this sequence's full blocks
        self.status = SequenceStatus.WAITING
        self.arrival = -1  # set by Scheduler.add; lower is older
        self.finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, {self.status.name}, tokens={len(self.token_ids)}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
