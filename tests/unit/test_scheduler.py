"""Scheduler driven by a fake engine that keeps a fake paged KV cache. No torch.

The fake engine writes, for every computed position, a value determined by the token prefix up
to it, and before each chunk checks that every earlier position's slot holds the right value:
so paging, prefix sharing and preemption are checked for the KV they would really produce.
"""
import random
from collections import Counter

import pytest

from glm_ray.engine.block_manager import slot_mapping
from glm_ray.engine.scheduler import Scheduler, SchedulerConfig
from glm_ray.engine.sequence import Sequence, SequenceStatus

BS = 4


def next_token(token_ids) -> int:
    """Deterministic 'model': the next token is a function of all tokens so far."""
    return hash(tuple(token_ids)) % 97


class FakeEngine:
    def __init__(self, sched: Scheduler, eos: int | None = None):
        self.sched, self.eos, self.kv = sched, eos, {}
        self.steps = 0

    def step(self):
        sched, bs = self.sched, self.sched.config.block_size
        out = sched.schedule()
        check_invariants(sched, out)
        written = set()
        for c in out.chunks:
            seq = c.seq
            for p, slot in enumerate(slot_mapping(seq.block_table, bs, 0, c.start)):
                assert self.kv.get(slot) == hash(tuple(seq.token_ids[:p + 1])), (seq, p)
            for p, slot in zip(range(c.start, c.end), slot_mapping(seq.block_table, bs,
                                                                     c.start, c.end)):
                assert slot not in written and sched.block_manager.blocks[slot // bs].ref_count == 1
                written.add(slot)
                self.kv[slot] = hash(tuple(seq.token_ids[:p + 1]))
        sampled = [(c.seq, next_token(c.seq.token_ids)) for c in out.chunks if c.sample]
        sched.finish_step(out)
        for seq, token in sampled:
            if not sched.append_token(seq, token) and token == self.eos:
                sched.finish(seq.seq_id, "stop")
        check_invariants(sched)
        self.steps += 1
        return out

    def run(self, max_steps=10_000):
        outs = []
        while self.sched.has_unfinished():
            outs.append(self.step())
            assert self.steps < max_steps, "no progress"
        return outs


def check_invariants(sched: Scheduler, out=None):
    bm, cfg = sched.block_manager, sched.config
    refs = Counter()
    assert len(sched.running) <= cfg.max_num_seqs
    assert sched.running == sorted(sched.running, key=lambda s: s.arrival)
    assert sched.waiting == sorted(sched.waiting, key=lambda s: s.arrival)
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(set(seq.block_table)) == len(seq.block_table)
        assert len(seq.block_table) * BS >= seq.num_computed_tokens
        refs.update(seq.block_table)
        for i, block_id in enumerate(seq.block_table):  # cached blocks hold this seq's tokens
            tokens = bm.blocks[block_id].token_ids
            assert tokens is None or tokens == tuple(seq.token_ids[i * BS:(i + 1) * BS])
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert set(sched.seqs.values()) == set(sched.running) | set(sched.waiting)
    for block in bm.blocks:
        assert block.ref_count == refs[block.block_id]
        if block.ref_count > 1:
            assert block.hash is not None, "only cached full blocks may be shared"
        assert (block.hash is None) == (block.token_ids is None)
    free, evictable = set(bm.free_block_ids), set(bm.evictable)
    assert len(free) == len(bm.free_block_ids) and not free & evictable
    assert all(bm.blocks[b].ref_count == 0 and bm.blocks[b].hash is None for b in free)
    assert all(bm.blocks[b].ref_count == 0 and bm.blocks[b].hash is not None for b in evictable)
    assert len(free) + len(evictable) + len(refs) == cfg.num_blocks
    assert bm.num_free_blocks + bm.num_used_blocks == cfg.num_blocks
    assert {h: b for h, b in bm.hash_to_block.items()} == {
        blk.hash: blk.block_id for blk in bm.blocks if blk.hash is not None}
    if out is not None:
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len({c.seq.seq_id for c in out.chunks}) == len(out.chunks)
        for c in out.chunks:
            assert c.num_tokens >= 1 and len(c.seq.block_table) * BS >= c.end


def make(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, caching=True, **kw):
    return Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, BS, num_blocks,
                                     caching, **kw))


def assert_all_free(sched):
    assert not sched.running and not sched.waiting and not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.config.num_blocks
    assert all(b.ref_count == 0 for b in sched.block_manager.blocks)


def test_config_and_add_validation():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(0, 8, BS, 8)
    sched = make(num_blocks=4)
    sched.add(Sequence("ok", [1] * 10, 7))  # 16 positions = 4 blocks: fits exactly
    with pytest.raises(ValueError, match="needs 5 KV blocks"):
        sched.add(Sequence("big", [1] * 10, 8))
    with pytest.raises(ValueError, match="already"):
        sched.add(Sequence("ok", [1], 1))
    with pytest.raises(ValueError, match="empty"):
        Sequence("e", [], 1)


def test_run_to_completion_frees_every_block():
    sched = make()
    seqs = [Sequence(i, [i + 1] * (3 + 5 * i), 6) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    FakeEngine(sched).run()
    assert all(s.is_finished and s.finish_reason == "length" for s in seqs)
    assert [s.num_completion_tokens for s in seqs] == [6] * 5
    assert_all_free(sched)
    stats = sched.stats()
    assert stats.num_running == stats.num_waiting == stats.num_used_blocks == 0
    assert stats.num_computed_tokens == sum(s.num_prompt_tokens + 5 for s in seqs)


def test_abort_waiting_and_running():
    sched = make(max_num_seqs=1)
    a, b = Sequence("a", [1] * 9, 5), Sequence("b", [2] * 9, 5)
    sched.add(a)
    sched.add(b)
    engine = FakeEngine(sched)
    engine.step()
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    assert sched.abort("b") and b.finish_reason == "abort" and b.is_finished
    assert sched.abort("a") and a.block_table == []
    assert not sched.abort("a")  # already gone: no error
    assert_all_free(sched)
    # Aborting between schedule() and finish_step() is safe.
    c = Sequence("c", [3] * 9, 5)
    sched.add(c)
    out = sched.schedule()
    sched.abort("c")
    sched.finish_step(out)
    assert sched.append_token(c, 5) and c.num_completion_tokens == 0
    assert_all_free(sched)


def test_prefix_sharing_second_sequence_computes_less():
    sched = make()
    system = list(range(100, 108))  # a 2-block shared prefix
    a = Sequence("a", system + [1, 2, 3], 4)
    sched.add(a)
    engine = FakeEngine(sched)
    engine.step()  # a's prefill: its two full blocks are now cached
    b = Sequence("b", system + [7, 7, 7, 7, 7], 4)
    sched.add(b)
    out = engine.step()
    chunk_b = next(c for c in out.chunks if c.seq is b)
    assert b.num_cached_tokens == 8 and chunk_b.start == 8 and chunk_b.num_tokens == 5
    assert b.block_table[:2] == a.block_table[:2]
    assert [sched.block_manager.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    assert sched.stats().num_prefix_hit_tokens == 8
    engine.run()
    assert_all_free(sched)
    assert sched.stats().num_computed_tokens == (11 + 3) + (13 - 8 + 3)


def test_prefix_caching_off_never_shares():
    sched = make(caching=False)
    system = list(range(100, 108))
    a, b = Sequence("a", system + [1], 2), Sequence("b", system + [2], 2)
    sched.add(a)
    engine = FakeEngine(sched)
    engine.step()
    sched.add(b)
    engine.run()
    assert b.num_cached_tokens == 0 and sched.stats().num_prefix_hit_tokens == 0


def test_chunked_prefill_never_stalls_decodes():
    sched = make(max_num_batched_tokens=16)
    short, long = Sequence("short", [1, 2, 3], 12), Sequence("long", list(range(100)), 2)
    sched.add(short)
    engine = FakeEngine(sched)
    engine.step()  # short's prefill; it decodes from now on
    sched.add(long)
    long_chunks = []
    while not short.is_finished:
        out = engine.step()
        by_id = {c.seq.seq_id: c for c in out.chunks}
        assert by_id["short"].num_tokens == 1 and out.chunks[0].seq is short  # decode first
        if "long" in by_id:
            assert by_id["long"].num_tokens <= 15
            long_chunks.append(by_id["long"])
    prefill = [c for c in long_chunks if c.start < 100]
    assert [c.start for c in prefill] == [15 * i for i in range(7)]
    assert sum(c.num_tokens for c in prefill) == 100 and prefill[-1].sample
    engine.run()
    assert long.num_completion_tokens == 2
    assert_all_free(sched)


def test_long_prefill_token_threshold_splits_budget():
    sched = make(max_num_batched_tokens=64, long_prefill_token_threshold=16)
    for i in range(3):
        sched.add(Sequence(i, [i] * 40, 1))
    out = sched.schedule()
    assert [(c.seq.seq_id, c.num_tokens) for c in out.chunks] == [(0, 16), (1, 16), (2, 16)]


def test_max_num_seqs_respected():
    sched = make(max_num_seqs=3)
    for i in range(10):
        sched.add(Sequence(i, [i] * 5, 4))
    outs = FakeEngine(sched).run()  # check_invariants asserts len(running) <= 3 every step
    assert max(len(o.chunks) for o in outs) == 3
    assert_all_free(sched)


def prompts(rng, n):
    systems = [[rng.randrange(97) for _ in range(rng.choice([4, 8, 9]))] for _ in range(3)]
    return [rng.choice(systems + [[]]) + [rng.randrange(97) for _ in range(rng.randrange(1, 14))]
            for _ in range(n)]


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_under_tiny_cache_gives_same_tokens(caching):
    rng = random.Random(0)
    todo = [(p, rng.randrange(1, 12)) for p in prompts(rng, 24)]

    def run(num_blocks):
        sched = make(num_blocks=num_blocks, max_num_seqs=8, max_num_batched_tokens=32,
                     caching=caching)
        seqs = [Sequence(i, p, m) for i, (p, m) in enumerate(todo)]
        for seq in seqs:
            sched.add(seq)
        FakeEngine(sched).run()
        assert_all_free(sched)
        assert [s.num_completion_tokens for s in seqs] == [m for _, m in todo]
        return [s.completion_token_ids for s in seqs], sched.stats()

    roomy_tokens, roomy_stats = run(num_blocks=256)
    tight_tokens, tight_stats = run(num_blocks=8)
    assert roomy_stats.num_preemptions == 0 and tight_stats.num_preemptions > 0
    assert tight_tokens == roomy_tokens  # recompute keeps generated tokens


def test_preempted_sequence_reuses_its_cached_blocks():
    sched = make(num_blocks=6, max_num_seqs=2, max_num_batched_tokens=64)
    a, b = Sequence("a", [1] * 9, 12), Sequence("b", [2] * 9, 12)
    sched.add(a)
    sched.add(b)
    engine = FakeEngine(sched)
    preempted = []
    while sched.has_unfinished():
        preempted += engine.step().preempted_seq_ids
    assert preempted and set(preempted) == {"b"}  # the later arrival goes
    assert b.num_cached_tokens > 0  # b's computed blocks were still cached on re-admission
    assert_all_free(sched)


def simulate(seed):
    """Random arrivals, aborts and EOS under random limits; invariants checked every step."""
    rng = random.Random(seed)
    sched = make(num_blocks=rng.choice([6, 10, 24]), max_num_seqs=rng.choice([1, 3, 8]),
                 max_num_batched_tokens=rng.choice([5, 16, 64]), caching=rng.random() < 0.7,
                 long_prefill_token_threshold=rng.choice([None, 3, 8]))
    engine = FakeEngine(sched, eos=rng.randrange(97))
    pending = [Sequence(i, p, rng.randrange(1, 10)) for i, p in enumerate(prompts(rng, 40))]
    seqs, aborted = list(pending), set()
    while pending or sched.has_unfinished():
        for _ in range(rng.randrange(3)):
            if pending:
                seq = pending.pop(0)
                too_big = -(-(len(seq) + seq.max_tokens - 1) // BS) > sched.config.num_blocks
                try:
                    sched.add(seq)
                except ValueError:
                    assert too_big
                    seqs.remove(seq)
                    continue
                assert not too_big
        if sched.seqs and rng.random() < 0.05:
            seq_id = rng.choice(list(sched.seqs))
            assert sched.abort(seq_id)
            aborted.add(seq_id)
            check_invariants(sched)
        engine.step()
        assert engine.steps < 5000
    assert_all_free(sched)
    for seq in seqs:
        assert seq.is_finished
        if seq.seq_id not in aborted:
            assert seq.finish_reason in ("length", "stop")
            assert seq.num_completion_tokens == seq.max_tokens or \
                seq.token_ids[-1] == engine.eos
    return sched.stats()


@pytest.mark.parametrize("seed", range(6))
def test_random_simulation_keeps_invariants(seed):
    simulate(seed)


def test_random_simulation_exercises_preemption_and_sharing():
    stats = [simulate(seed) for seed in range(6)]
    assert sum(s.num_preemptions for s in stats) > 0
    assert sum(s.num_prefix_hit_tokens for s in stats) > 0
