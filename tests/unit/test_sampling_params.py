import pytest

from glm_ray.engine.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens) == (None, 16, 0)
    assert (p.stop, p.stop_token_ids, p.ignore_eos) == ([], [], False)
    assert (p.logprobs, p.prompt_logprobs, p.skip_special_tokens) == (None, None, True)
    assert not p.is_greedy


def test_single_stop_string_is_wrapped_and_lists_are_copied():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    mine = ["END"]
    p = SamplingParams(stop=mine)
    mine.append("later")
    assert p.stop == ["END"]


@pytest.mark.parametrize("temperature, greedy", [(0.0, True), (1e-6, True), (1e-4, False)])
def test_tiny_temperature_means_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_accepts_boundary_values():
    SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2,
                   frequency_penalty=2, max_tokens=1, min_tokens=1, logprobs=0, seed=0)


@pytest.mark.parametrize("field, value, allowed", [
    ("temperature", -0.1, "[0.0, inf)"),
    ("temperature", "0.7", "[0.0, inf)"),
    ("temperature", float("nan"), "[0.0, inf)"),
    ("top_p", 0.0, "(0.0, 1.0]"),
    ("top_p", 1.5, "(0.0, 1.0]"),
    ("top_k", -2, ">= 1"),
    ("top_k", 2.5, ">= 1"),
    ("min_p", 1.1, "[0.0, 1.0]"),
    ("min_p", -0.1, "[0.0, 1.0]"),
    ("repetition_penalty", 0.0, "(0.0, inf)"),
    ("presence_penalty", 2.5, "[-2.0, 2.0]"),
    ("frequency_penalty", -3, "[-2.0, 2.0]"),
    ("max_tokens", 0, ">= 1"),
    ("max_tokens", True, ">= 1"),
    ("min_tokens", -1, ">= 0"),
    ("logprobs", -1, ">= 0"),
    ("prompt_logprobs", -1, ">= 0"),
    ("seed", "42", "integer"),
    ("stop", [""], "empty"),
    ("stop", [1], "string"),
    ("stop_token_ids", [-1], ">= 0"),
    ("ignore_eos", "yes", "True or False"),
])
def test_invalid_values_name_field_value_and_range(field, value, allowed):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    message = str(err.value)
    assert message.startswith(field)
    assert repr(value) in message
    assert allowed in message


def test_temperature_error_reads_well():
    # "0.7" from a JSON body that quoted a number: the user sees the field, value and range.
    with pytest.raises(ValueError, match=r"temperature must be a number in \[0.0, inf\), got '0.7'"):
        SamplingParams(temperature="0.7")


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
