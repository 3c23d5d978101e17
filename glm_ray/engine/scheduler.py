"""Continuous batching with chunked prefill over a paged KV cache.

Each step: running decodes first (one token each), then the remaining token budget goes to
prefills in arrival order (a long prompt is split across steps), then new sequences are admitted
from the waiting queue. When a block is needed and none is free, the most recently arrived
running sequence that is not yet scheduled this step is preempted by recompute: its blocks are
freed and it goes back to the waiting queue with its generated tokens kept.

Protocol, strictly alternating: `schedule()`, run the model on the chunks, `finish_step(output)`,
then `append_token` for every chunk with `sample` set, and `finish` on EOS/stop.
"""
from __future__ import annotations

import bisect
from collections.abc import Hashable
from dataclasses import dataclass, field

from glm_ray.engine.block_manager import BlockManager
from glm_ray.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # most sequences RUNNING at once
    max_num_batched_tokens: int  # most tokens computed in one step, over all sequences
    block_size: int  # positions per KV block
    num_blocks: int  # KV blocks in the whole cache
    enable_prefix_caching: bool = True  # share full blocks of equal prompt prefixes
    long_prefill_token_threshold: int | None = None  # most prefill tokens per seq per step

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an integer >= 1, got {value!r}")
        t = self.long_prefill_token_threshold
        if t is not None and (not isinstance(t, int) or t < 1):
            raise ValueError("SchedulerConfig.long_prefill_token_threshold must be None or "
                             f"an integer >= 1, got {t!r}")


@dataclass
class ScheduledChunk:
    """Compute KV for positions [start, start + num_tokens) of seq.token_ids.

    `sample` is fixed at scheduling time: the chunk reaches the last token, so the engine
    samples the next token from its last logits.
    """
    seq: Sequence
    start: int
    num_tokens: int
    sample: bool = field(init=False)

    def __post_init__(self) -> None:
        self.sample = self.start + self.num_tokens == len(self.seq.token_ids)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start:self.end]


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted_seq_ids: list[Hashable] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_free_blocks: int  # including cached blocks nobody references
    num_cached_blocks: int  # registered in the prefix cache, referenced or not
    num_computed_tokens: int  # total over all steps (prefill and decode)
    num_prefix_hit_tokens: int  # total tokens taken from the prefix cache on admission
    num_preemptions: int


def _by_arrival(seq: Sequence) -> int:
    return seq.arrival


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.seqs: dict[Hashable, Sequence] = {}  # every unfinished sequence
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # sorted by arrival
        self._next_arrival = 0
        self._num_computed_tokens = 0
        self._num_prefix_hit_tokens = 0
        self._num_preemptions = 0

    # --- requests -----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence.

        Raises ValueError if its id is taken, or if prompt + max_tokens - 1 positions (the most
        KV it can ever hold: the last sampled token is never computed) need more blocks than
        the whole cache has; such a sequence could never finish.
        """
        if seq.seq_id in self.seqs:
            raise ValueError(f"sequence id {seq.seq_id!r} is already in the scheduler")
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"add() takes a fresh sequence, got {seq!r}")
        max_positions = seq.num_prompt_tokens + seq.max_tokens - 1
        need = self.block_manager.num_blocks_for(max_positions)
        if need > self.config.num_blocks:
            raise ValueError(
                f"sequence {seq.seq_id!r} needs {need} KV blocks for {seq.num_prompt_tokens} "
                f"prompt tokens + max_tokens={seq.max_tokens}, but the cache has only "
                f"{self.config.num_blocks} blocks of {self.config.block_size}; "
                "shorten the prompt, lower max_tokens, or give the KV cache more memory")
        seq.arrival = self._next_arrival
        self._next_arrival += 1
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def finish(self, seq_id: Hashable, reason: str) -> Sequence:
        """Mark a waiting or running sequence finished and free all its blocks."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"no unfinished sequence with id {seq_id!r}")
        (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        return seq

    def abort(self, seq_id: Hashable) -> bool:
        """Finish with reason "abort"; False if the id is unknown or already finished."""
        if seq_id not in self.seqs:
            return False
        self.finish(seq_id, "abort")
        return True

    def append_token(self, seq: Sequence, token_id: int) -> bool:
        """Add a sampled token; finishes the sequence ("length") at max_tokens and returns True.

        A sequence finished or aborted since schedule() is left alone (returns True)."""
        if seq.status is SequenceStatus.FINISHED:
            return True
        seq.token_ids.append(token_id)
        if seq.num_completion_tokens >= seq.max_tokens:
            self.finish(seq.seq_id, "length")
            return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(len(self.running), len(self.waiting), bm.num_used_blocks,
                              bm.num_free_blocks, bm.num_cached_blocks, self._num_computed_tokens,
                              self._num_prefix_hit_tokens, self._num_preemptions)

    # --- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[Hashable] = set()
        # Decodes first so a long prefill never stalls them; then unfinished prefills.
        for decode_pass in (True, False):
            for seq in list(self.running):
                if budget == 0:
                    break
                remaining = seq.num_uncomputed_tokens
                if seq.status is not SequenceStatus.RUNNING or remaining == 0 or \
                        (remaining == 1) != decode_pass:
                    continue
                n = self._fit_running(seq, self._chunk_size(remaining, budget), scheduled, out)
                if n:
                    out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
                    scheduled.add(seq.seq_id)
                    budget -= n
        # Admitting right after preempting would only thrash.
        if not out.preempted_seq_ids:
            while self.waiting and budget and len(self.running) < self.config.max_num_seqs:
                n = self._admit(self.waiting[0], budget)
                if n == 0:
                    break  # FCFS: later arrivals do not jump the head of the queue
                seq = self.waiting.pop(0)
                out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
                budget -= n
        return out

    def finish_step(self, output: SchedulerOutput) -> None:
        """The chunks' KV is computed: advance the sequences and cache their full blocks."""
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # finished or aborted since schedule()
            assert seq.num_computed_tokens == chunk.start, (chunk, seq)
            seq.num_computed_tokens = chunk.end
            self._num_computed_tokens += chunk.num_tokens
            self.block_manager.register(seq, chunk.start)

    # --- helpers ------------------------------------------------------------------------------

    def _chunk_size(self, remaining: int, budget: int) -> int:
        n = min(remaining, budget)
        if self.config.long_prefill_token_threshold is not None:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def _fit_running(self, seq: Sequence, n: int, scheduled: set, out: SchedulerOutput) -> int:
        """Allocate blocks for up to n more tokens of seq, preempting others if none are free.

        Prefill chunks shrink to the blocks there are rather than preempting. Returns the
        tokens to compute, or 0 if seq itself was the one preempted.
        """
        bm = self.block_manager
        while True:
            n_fit = min(n, bm.num_fitting_tokens(seq))
            if n_fit > 0:
                allocated = bm.allocate(seq, seq.num_computed_tokens + n_fit)
                assert allocated
                return n_fit
            victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
            self._preempt(victim)
            out.preempted_seq_ids.append(victim.seq_id)
            if victim is seq:
                return 0

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Move seq to RUNNING with cached prefix blocks plus blocks for its first chunk.

        Uses free blocks only, never preempts. Returns the chunk size, 0 if nothing fits.
        """
        bm = self.block_manager
        prefix = bm.match_prefix(seq) if seq.cache_prefix else []
        num_cached = len(prefix) * self.config.block_size
        n = self._chunk_size(len(seq.token_ids) - num_cached, budget)
        # The prefix's unreferenced blocks stop being free once taken.
        fit = (len(prefix) + bm.num_free_blocks - bm.num_evictable_in(prefix)) \
            * self.config.block_size - num_cached
        n = min(n, fit)
        if n <= 0:
            return 0
        bm.take_prefix(seq, prefix)
        allocated = bm.allocate(seq, num_cached + n)
        assert allocated
        self._num_prefix_hit_tokens += num_cached
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=_by_arrival)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        bisect.insort(self.waiting, seq, key=_by_arrival)
        self._num_preemptions += 1
