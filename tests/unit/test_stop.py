from glm_ray.engine.sampling_params import SamplingParams
from glm_ray.engine.stop import (
    check_stop, find_stop_string, num_held_back_chars, streamable_text)

EOS = {2}


def run(pieces, params, token_ids=None):
    """Feed token texts one by one, as the engine does; return (decision, step it stopped)."""
    token_ids = token_ids or [10 + i for i in range(len(pieces))]
    text = ""
    for step, (token, piece) in enumerate(zip(token_ids, pieces), start=1):
        text += piece
        decision = check_stop(token_ids[:step], text, params, EOS, num_new_chars=len(piece))
        if decision.finished:
            return decision, step
    return decision, None


def test_keeps_going_when_nothing_matches():
    decision, step = run(["Hel", "lo"], SamplingParams(stop=["xyz"]))
    assert step is None and decision.finish_reason is None and decision.output_text == "Hello"


def test_eos_stops_unless_ignored():
    decision, step = run(["a", "b", ""], SamplingParams(), token_ids=[5, 6, 2])
    assert (decision.finish_reason, step, decision.stop_reason) == ("stop", 3, None)
    _, step = run(["a", "b", ""], SamplingParams(ignore_eos=True), token_ids=[5, 6, 2])
    assert step is None


def test_stop_token_id_reports_itself():
    decision, step = run(["a", "b", "c"], SamplingParams(stop_token_ids=[6]), token_ids=[5, 6, 7])
    assert (decision.finish_reason, decision.stop_reason, step) == ("stop", 6, 2)


def test_max_tokens_gives_length():
    decision, step = run(["a"] * 5, SamplingParams(max_tokens=3))
    assert (decision.finish_reason, step, decision.output_text) == ("length", 3, "aaa")


def test_stop_on_the_last_allowed_token_reports_stop():
    decision, _ = run(["a", ""], SamplingParams(max_tokens=2), token_ids=[5, 2])
    assert decision.finish_reason == "stop"


def test_min_tokens_defers_eos_stop_ids_and_strings():
    params = SamplingParams(min_tokens=4, stop_token_ids=[6], stop=["!"])
    _, step = run(["a", "!", "", "b"], params, token_ids=[5, 6, 2, 7])
    assert step is None
    decision, step = run(["a", "b", "c", ""], SamplingParams(min_tokens=3), token_ids=[5, 6, 7, 2])
    assert (decision.finish_reason, step) == ("stop", 4)


def test_stop_string_split_across_tokens_is_cut_from_output():
    decision, step = run(["The answer", " is 4.", "\n\n", "Q", ": next"],
                         SamplingParams(stop=["\n\nQ:"]))
    assert (decision.finish_reason, step) == ("stop", 5)
    assert decision.output_text == "The answer is 4."
    assert decision.stop_reason == "\n\nQ:"


def test_stop_string_inside_one_token_with_text_after_it():
    decision, _ = run(["Hi", " there.END more"], SamplingParams(stop=["END"]))
    assert decision.output_text == "Hi there."


def test_earliest_of_several_stop_strings_wins():
    decision, _ = run(["x", "yz"], SamplingParams(stop=["z", "xy"]))
    assert decision.output_text == "" and decision.stop_reason == "xy"


def test_search_window_only_needs_the_tail():
    # "ab" ends in the new character, so it is found though it starts in older text.
    assert find_stop_string("xxab", ["ab"], num_new_chars=1) == (2, "ab")
    # A match wholly inside old text was already seen (or deferred by min_tokens).
    assert find_stop_string("abxx", ["ab"], num_new_chars=1) is None
    assert find_stop_string("abxx", ["ab"]) == (0, "ab")


def test_held_back_chars_are_a_possible_stop_string_start():
    assert num_held_back_chars("Hello\n", ["\n\nQ:"]) == 1
    assert num_held_back_chars("Hello\n\nQ", ["\n\nQ:"]) == 3
    assert num_held_back_chars("Hello", ["\n\nQ:"]) == 0
    assert num_held_back_chars("abc", ["bcd", "cx"]) == 2
    assert num_held_back_chars("anything", []) == 0


def test_streamed_text_never_shows_a_stop_string():
    params = SamplingParams(stop=["</answer>"])
    text, sent = "", ""
    for piece in ["42", "</", "ans", "wer", "> trailing"]:
        text += piece
        decision = check_stop([1] * 3, text, params, EOS, num_new_chars=len(piece))
        visible = streamable_text(decision.output_text, params.stop, decision.finished)
        assert visible.startswith(sent)  # streaming only appends
        sent = visible
    assert decision.finished and sent == "42"
    assert streamable_text("42</", params.stop, finished=True) == "42</"
