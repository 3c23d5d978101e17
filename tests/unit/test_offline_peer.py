"""The offline peer harness (glm_ray/bench/offline_peer.py) on glm-ray's own engine: the line
per pass a user compares with vLLM's, and its option parsing."""

import argparse
import json

import pytest

from glm_ray.bench import offline_peer


def test_a_pass_per_line_with_the_workloads_tokens(tiny_model_dir, capsys):
    offline_peer.main(["--system", "glm-ray", "--model", str(tiny_model_dir), "--workload", "A", "--passes", "1",
                       "--option", "decode_attention=torch", "--option", "max_num_batched_tokens=512"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["system"] == "glm-ray" and line["workload"] == "A" and line["pass"] == 1
    assert line["options"] == {"decode_attention": "torch", "max_num_batched_tokens": 512}
    assert line["output_tokens"] == 64 * 128 and line["tok_s"] > 0


def test_options_are_name_equals_value():
    assert offline_peer._option("max_num_seqs=8") == ("max_num_seqs", 8)
    assert offline_peer._option("decode_attention=cpu-kernel") == ("decode_attention", "cpu-kernel")
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE, got 'oops'"):
        offline_peer._option("oops")


def test_no_pass_repeats_a_prompt_the_engine_has_seen(tiny_model_dir, capsys, monkeypatch):
    """Both systems cache prompt prefixes: a pass that repeated the warmup's or an earlier pass's
    prompts would skip their prefill and time a different workload."""
    seen: list[list[tuple[int, ...]]] = []
    make = offline_peer._glm_ray

    def recording(model, options):
        llm, sampling = make(model, options)
        generate = llm.generate

        def record(prompts, params):
            seen.append([tuple(p["prompt_token_ids"]) for p in prompts])
            return generate(prompts, params)

        llm.generate = record
        return llm, sampling

    monkeypatch.setattr(offline_peer, "_glm_ray", recording)
    offline_peer.main(["--system", "glm-ray", "--model", str(tiny_model_dir), "--workload", "A", "--passes", "2",
                       "--seed", "5"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["pass"], line["seed"]) for line in lines] == [(1, 5), (2, 6)]
    warmup, first, second = (set(call) for call in seen)
    assert len(warmup) == 2 and len(first) == len(second) == 64
    assert not warmup & first and not warmup & second and not first & second
