"""The command line as a user runs it: real subprocesses of the installed `glm-ray` entry point."""

import os
import subprocess
import sys

from glm_ray import LLM, SamplingParams
from glm_ray.model.loader import load_model
from glm_ray.model.reference import greedy_generate
from glm_ray.tokenizer import Tokenizer


def glm_ray(*args, env=None, stdin=None):
    return subprocess.run([sys.executable, "-m", "glm_ray.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, input=stdin)


def test_make_model_then_generate(tmp_path):
    out = tmp_path / "m"
    r = glm_ray("make-model", "--preset", "tiny", "--out", str(out), "--seed", "4")
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    r = glm_ray("generate", "Hello world", "--model", str(out), "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.from_pretrained(out)
    model, experts, config = load_model(out)
    want = greedy_generate(model, experts, [tok.encode("Hello world")], 8, config.eos_token_ids)[0]
    assert r.stdout == "Hello world" + tok.decode(want) + "\n"


def test_generate_default_model_uses_the_cache(tmp_path):
    r = glm_ray("generate", "The capital of France is", "--max-tokens", "4", env={"GLM_RAY_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is")
    assert list((tmp_path / "models").iterdir())


def test_bad_arguments_name_the_value(tmp_path):
    r = glm_ray("generate", "hi", "--max-tokens", "0")
    assert r.returncode == 2 and "0 must be at least 1" in r.stderr
    r = glm_ray("generate", "hi", "--model", str(tmp_path / "nope"))
    assert r.returncode != 0 and "nope" in r.stderr and "no config.json" in r.stderr
    r = glm_ray("make-model", "--preset", "huge", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "huge" in r.stderr
    r = glm_ray("chat", "--url", "http://127.0.0.1:9", "--model", str(tmp_path))
    assert r.returncode != 0 and "not both" in r.stderr
    r = glm_ray("status", "--url", "http://127.0.0.1:9")
    assert r.returncode != 0 and "cannot reach http://127.0.0.1:9" in r.stderr
    r = glm_ray("chat", "--temperature", "3")
    assert r.returncode == 2 and "3.0 must be in [0, 2]" in r.stderr


def test_chat_in_process_keeps_the_conversation(tiny_model_dir):
    """Two turns, greedy: each reply is what LLM.chat answers to the conversation so far."""
    script = "Hello there\n/bogus\nAnd then?\n/reset\n/exit\n"
    r = glm_ray("chat", "--model", str(tiny_model_dir), "--temperature", "0", "--max-tokens", "6",
                "--no-thinking", "--system", "Be brief.", stdin=script)
    assert r.returncode == 0, r.stderr
    llm = LLM(tiny_model_dir, dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=6)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first = llm.chat(conversation, greedy, chat_template_kwargs={"enable_thinking": False})[0].outputs[0].text
    conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = llm.chat(conversation, greedy, chat_template_kwargs={"enable_thinking": False})[0].outputs[0].text
    assert r.stdout.count("glm> ") == 2
    assert f"glm> {first}" in r.stdout and f"glm> {second}" in r.stdout
    assert "unknown command /bogus" in r.stdout and "conversation cleared" in r.stdout
