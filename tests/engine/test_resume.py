"""A request resumed on a second engine from the tokens a first one produced (engine/request.py,
`Resume`) goes on exactly as the undisturbed request: greedy and seeded sampling, stop strings
held back across the cut, text that continues where the client's ends, usage counted once."""

import pytest

from glm_ray import LLM, SamplingParams
from glm_ray.engine.request import Resume
from glm_ray.engine.sampler import position_seed

PROMPT = [5, 900, 13, 77, 2, 41, 300, 8]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="float32", max_model_len=256)


def run(llm, request_id, params, resume=None):
    """Every delta of one request on llm's engine."""
    engine = llm.engine
    engine.add_request(request_id, PROMPT, params, resume=resume)
    deltas = []
    while engine.has_unfinished():
        deltas += [d for d in engine.step() if d.request_id == request_id]
    return deltas


def undisturbed_then_resumed(llm, params, cut):
    """(deltas of the whole request, deltas of the part before `cut` tokens as sent, the resumed rest)."""
    whole = run(llm, f"whole-{cut}", params)
    before, sent_ids, sent_chars = [], [], 0
    for d in whole:
        if len(sent_ids) + len(d.new_token_ids) > cut:
            break
        before.append(d)
        sent_ids += d.new_token_ids
        sent_chars += len(d.new_text)
    rest = run(llm, f"rest-{cut}", params, Resume(tuple(sent_ids), sent_chars))
    return whole, before, rest


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1),
    SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=7, max_tokens=40, min_tokens=30, repetition_penalty=1.2,
                   presence_penalty=0.5),
], ids=["greedy", "seeded", "seeded-penalties"])
@pytest.mark.parametrize("cut", [1, 17, 39])
def test_a_resumed_request_continues_the_undisturbed_one(llm, params, cut):
    whole, before, rest = undisturbed_then_resumed(llm, params, cut)
    tokens = lambda ds: [t for d in ds for t in d.new_token_ids]  # noqa: E731
    assert tokens(before) + tokens(rest) == tokens(whole)
    assert "".join(d.new_text for d in before + rest) == "".join(d.new_text for d in whole)
    last = rest[-1]
    assert last.finish_reason == whole[-1].finish_reason == "length"
    assert last.num_output_tokens == 40 and last.num_prompt_tokens == len(PROMPT)  # counted once, in full
    if params.logprobs is not None:
        lp = lambda ds: [e for d in ds for e in d.new_logprobs]  # noqa: E731
        for a, b in zip(lp(before) + lp(rest), lp(whole)):
            tok = next(iter(b))
            assert abs(a[tok].logprob - b[tok].logprob) < 1e-4


def test_a_stop_string_held_back_at_the_cut_still_stops_after_it(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    text = "".join(d.new_text for d in run(llm, "probe", greedy))
    stop = text[12:16]  # a stop string the run will meet: its start is held back until it completes
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop])
    num_tokens = sum(len(d.new_token_ids) for d in run(llm, "stopped", params))
    for cut in range(1, num_tokens):  # a finished request is never resumed
        whole, before, rest = undisturbed_then_resumed(llm, params, cut)
        assert "".join(d.new_text for d in before + rest) == "".join(d.new_text for d in whole) == text[:12]
        assert rest[-1].finish_reason == "stop" and rest[-1].stop_reason == stop


def test_prompt_logprobs_are_not_sent_again(llm):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)
    whole, before, rest = undisturbed_then_resumed(llm, params, 3)
    assert whole[0].prompt_logprobs is not None
    assert all(d.prompt_logprobs is None for d in rest)


def test_resume_is_checked(llm):
    params = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(ValueError, match="leave none of max_tokens 4"):
        llm.engine.add_request("r1", PROMPT, params, resume=Resume((1, 2, 3, 4), 0))
    with pytest.raises(ValueError, match="resume token id 5000 is outside the vocabulary"):
        llm.engine.add_request("r2", PROMPT, params, resume=Resume((5000,), 0))
    with pytest.raises(ValueError, match="resume.token_ids must be a list of integers"):
        Resume.from_dict({"token_ids": "12", "num_sent_chars": 0})
    with pytest.raises(ValueError, match="resume.num_sent_chars must be an integer >= 0"):
        Resume.from_dict({"token_ids": [1], "num_sent_chars": -1})
    assert not llm.engine.has_unfinished()


def test_position_seeds_differ_by_seed_and_position():
    seeds = {position_seed(s, p) for s in range(50) for p in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)
    assert position_seed(-3, 0) >= 0 and position_seed(2**70, 5) >= 0
