import math

import pytest
import torch

from glm_ray.engine.sampler import (
    Logprob, Sampler, SamplingState, apply_min_p, make_generator, process_logits, prompt_logprobs)
from glm_ray.engine.sampling_params import SamplingParams

V = 50
EOS = 7


def row(seed=None, prompt=(), output=(), **kw):
    return SamplingState(SamplingParams(seed=seed, **kw), list(prompt), list(output),
                         make_generator(seed))


def test_greedy_rows_are_exact_argmax_next_to_sampled_rows():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    rows = [row(temperature=0.0), row(), row(temperature=1e-6, seed=3), row(top_k=5),
            row(temperature=0.0, top_p=0.5, min_p=0.3), row(temperature=0.9)]
    ids = Sampler(generator=torch.Generator().manual_seed(1))(logits, rows).sampled_token_ids
    argmax = logits.argmax(dim=-1)
    for i in (0, 2, 4):
        assert ids[i] == argmax[i]
    assert ids.dtype == torch.int64 and ids.shape == (6,)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_filters_that_keep_one_token_behave_like_greedy(kw):
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(generator=gen)
    for _ in range(20):
        logits = torch.randn(4, V, generator=gen) * 3
        ids = sampler(logits, [row(temperature=1.5, **kw) for _ in range(4)]).sampled_token_ids
        assert torch.equal(ids, logits.argmax(dim=-1))


def test_top_k_draws_only_from_the_k_best():
    logits = torch.zeros(1, V)
    logits[0, [3, 11]] = 0.1  # two best, barely ahead of 48 equally likely others
    sampler = Sampler(generator=torch.Generator().manual_seed(0))
    drawn = {int(sampler(logits, [row(top_k=2)]).sampled_token_ids) for _ in range(200)}
    assert drawn == {3, 11}


def test_min_p_drops_tokens_below_fraction_of_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    apply_min_p(logits, torch.tensor([0.25]))  # threshold 0.125
    assert torch.isfinite(logits[0, :3]).all() and logits[0, 3] == -math.inf
    sampler = Sampler(generator=torch.Generator().manual_seed(0))
    drawn = {int(sampler(probs.log(), [row(min_p=0.5)]).sampled_token_ids) for _ in range(300)}
    assert drawn == {0, 1}  # 0.15 and 0.05 fall below 0.5 * 0.5


def test_draws_follow_softmax_of_scaled_logits():
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0])
    expected = torch.softmax(logits / 0.7, dim=-1)
    n = 20000
    sampler = Sampler(generator=torch.Generator().manual_seed(0))
    ids = sampler(logits.expand(n, 4), [row(temperature=0.7)] * n).sampled_token_ids
    freq = torch.bincount(ids, minlength=4).float() / n
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    # The per-request generator path draws from the same distribution, position by position.
    state = row(seed=5, temperature=0.7)
    seeded = []
    for _ in range(2000):
        seeded.append(int(sampler(logits[None], [state]).sampled_token_ids))
        state.output_token_ids.append(seeded[-1])
    freq = torch.bincount(torch.tensor(seeded), minlength=4).float() / 2000
    torch.testing.assert_close(freq, expected, atol=0.04, rtol=0)


def _draws(seed, position, batch_size, steps=12):
    """Tokens drawn for a seeded request placed at `position` among other requests."""
    data = torch.Generator().manual_seed(123)
    request_logits = [torch.randn(V, generator=data) * 0.5 for _ in range(steps)]
    me = row(seed=seed, temperature=0.8, top_p=0.95, top_k=40)
    others = [row(seed=100 + i) if i % 2 else row(temperature=1.3, min_p=0.05)
              for i in range(batch_size - 1)]
    sampler = Sampler(generator=torch.Generator().manual_seed(position * 7 + batch_size))
    drawn = []
    for step in range(steps):
        rows = others[:position] + [me] + others[position:]
        logits = torch.randn(batch_size, V, generator=data)
        logits[position] = request_logits[step]
        token = int(sampler(logits, rows).sampled_token_ids[position])
        me.output_token_ids.append(token)
        drawn.append(token)
    return drawn


def test_seeded_request_repeats_whatever_the_batch_around_it():
    alone = _draws(seed=42, position=0, batch_size=1)
    in_batch = _draws(seed=42, position=3, batch_size=8)
    assert alone == in_batch
    assert len(set(alone)) > 3  # a real draw, not a degenerate argmax
    assert _draws(seed=43, position=3, batch_size=8) != alone


def test_a_seeded_draw_depends_on_seed_and_position_only():
    """What lets another engine resume a seeded request: the draw at a position does not depend on
    how many draws this generator made before (the engine that started the request made them)."""
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(9))
    used = row(seed=42, temperature=1.0)
    for n in range(5):  # a generator that has drawn before, at other positions
        used.output_token_ids[:] = [7] * n
        Sampler()(logits, [used])
    used.output_token_ids[:] = [1, 2, 3]
    fresh = row(seed=42, temperature=1.0, output=[9, 9, 9])  # same position (3), a new generator
    a = [int(Sampler()(logits, [used]).sampled_token_ids) for _ in range(3)]
    b = [int(Sampler()(logits, [fresh]).sampled_token_ids) for _ in range(3)]
    assert a == b and len(set(a)) == 1
    positions = {int(Sampler()(logits, [row(seed=42, temperature=1.0, output=[0] * n)]).sampled_token_ids)
                 for n in range(40)}
    assert len(positions) > 5  # positions draw differently


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0, 1.0]])
    state = row(temperature=0.0, repetition_penalty=2.0, prompt=[0], output=[1, 1])
    out, _ = process_logits(logits, [state], eos_token_ids=[])
    # token 0 seen in the prompt, token 1 in the output; 2-4 unseen
    assert out.tolist() == [[1.0, -2.0, 3.0, -4.0, 1.0]]


def test_presence_and_frequency_penalties_use_output_counts_only():
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0, 1.0]])
    state = row(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25,
                prompt=[4, 4], output=[0, 2, 2, 2])
    out, _ = process_logits(logits, [state], eos_token_ids=[])
    # 0: 2 - 0.25 - 0.5; 2: 3 - 3 * 0.25 - 0.5; token 4 only in the prompt: untouched
    assert out.tolist() == [[1.25, -1.0, 1.75, -4.0, 1.0]]


def test_penalties_can_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    sampler = Sampler()
    assert int(sampler(logits, [row(temperature=0.0, output=[0])]).sampled_token_ids) == 0
    penalised = row(temperature=0.0, output=[0], repetition_penalty=2.0)
    assert int(sampler(logits, [penalised]).sampled_token_ids) == 1


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, V)
    logits[0, EOS] = logits[0, 9] = 100.0  # the model badly wants to stop
    sampler = Sampler(eos_token_ids=[EOS])
    early = row(temperature=0.0, min_tokens=3, stop_token_ids=[9], output=[1, 2])
    token = int(sampler(logits, [early]).sampled_token_ids)
    assert token not in (EOS, 9)
    done = row(temperature=0.0, min_tokens=3, stop_token_ids=[9], output=[1, 2, 3])
    assert int(sampler(logits, [done]).sampled_token_ids) in (EOS, 9)
    # With ignore_eos, EOS is an ordinary token; stop ids stay blocked.
    logits[0, 9] = 200.0
    ignoring = row(temperature=0.0, min_tokens=3, stop_token_ids=[9], ignore_eos=True)
    assert int(sampler(logits, [ignoring]).sampled_token_ids) == EOS


def test_logprobs_are_raw_log_softmax_with_sampled_token_and_ranks():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 2
    rows = [row(seed=1, logprobs=5, temperature=2.0, repetition_penalty=1.5, prompt=[0, 1]),
            row(), row(temperature=0.0, logprobs=0)]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    first = out.logprobs[0]
    sampled = int(out.sampled_token_ids[0])
    assert sampled in first and len(first) in (5, 6)
    order = raw[0].argsort(descending=True).tolist()
    assert set(order[:5]) <= set(first)
    for token, lp in first.items():
        assert abs(lp.logprob - raw[0, token].item()) < 1e-6  # ignores temperature/penalty
        assert lp.rank == order.index(token) + 1
    greedy = out.logprobs[2]  # logprobs=0: the sampled token alone
    assert list(greedy) == [int(raw[2].argmax())] and greedy[int(raw[2].argmax())].rank == 1


def test_logprobs_include_sampled_token_outside_the_top_n():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    # The penalty moves greedy off token 0; logprobs still describe the raw model.
    state = row(temperature=0.0, output=[0], repetition_penalty=4.0, logprobs=1)
    out = Sampler()(logits, [state])
    assert int(out.sampled_token_ids) == 1
    raw = torch.log_softmax(logits[0], dim=-1)
    assert out.logprobs[0] == {1: Logprob(raw[1].item(), 2), 0: Logprob(raw[0].item(), 1)}


def test_prompt_logprobs_score_each_token_from_the_previous_position():
    prompt = [4, 8, 15, 16]
    logits = torch.randn(len(prompt), V, generator=torch.Generator().manual_seed(0))
    result = prompt_logprobs(logits, prompt, 2)
    assert len(result) == 4 and result[0] is None
    raw = torch.log_softmax(logits, dim=-1)
    for i in range(1, 4):
        entry = result[i]
        assert abs(entry[prompt[i]].logprob - raw[i - 1, prompt[i]].item()) < 1e-6
        top2 = raw[i - 1].topk(2).indices.tolist()
        assert set(top2) <= set(entry) and entry[top2[0]].rank == 1 and entry[top2[1]].rank == 2
    assert prompt_logprobs(logits[:1], [4], 2) == [None]


def _reference_row(x, p, prompt, output, eos):
    """Plain per-row, per-token version of process_logits, the spec the batched code meets."""
    x = x.clone()
    if len(output) < p.min_tokens:
        for t in p.stop_token_ids + ([] if p.ignore_eos else eos):
            x[t] = -math.inf
    for t in set(prompt + output):
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    if p.is_greedy:
        return x
    x = x / p.temperature
    if p.top_k > 0:
        x[x < x.sort(descending=True).values[p.top_k - 1]] = -math.inf
    if p.top_p < 1.0:
        probs, mass = torch.softmax(x, -1), 0.0
        for t in x.argsort(descending=True).tolist():
            if mass >= p.top_p:
                x[t] = -math.inf
            mass += probs[t].item()
    if p.min_p > 0:
        probs = torch.softmax(x, -1)
        x[probs < p.min_p * probs.max()] = -math.inf
    return x


def test_batched_processing_matches_per_row_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V, generator=gen) * 2
    rows = [row(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3,
                prompt=[1, 2, 3], output=[3, 4, 4]),
            row(temperature=0.0, presence_penalty=1.0, frequency_penalty=-0.5, output=[5, 5]),
            row(min_p=0.1, min_tokens=4, stop_token_ids=[11], output=[0]),
            row(temperature=1.3, top_p=0.6),
            row(top_k=3, presence_penalty=-2.0, output=[6], ignore_eos=True, min_tokens=2),
            row()]
    out, greedy_ids = process_logits(logits, rows, eos_token_ids=[EOS])
    for i, r in enumerate(rows):
        ref = _reference_row(logits[i], r.sampling_params, r.prompt_token_ids,
                             r.output_token_ids, [EOS])
        assert torch.equal(torch.isinf(out[i]), torch.isinf(ref)), f"row {i}"
        finite = torch.isfinite(ref)
        torch.testing.assert_close(out[i][finite], ref[finite], rtol=1e-6, atol=1e-6)
    assert int(greedy_ids[1]) == int(out[1].argmax())


def test_wrong_logits_shape_is_rejected():
    with pytest.raises(ValueError, match="logits must be"):
        Sampler()(torch.zeros(2, V), [row()])
