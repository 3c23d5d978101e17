"""What a user of LLM / AsyncLLMEngine notices: stops, limits, errors, text, streaming, abort."""

import asyncio
import time

import pytest
import torch

from glm_ray import LLM, SamplingParams
from glm_ray.engine.async_engine import AsyncLLMEngine
from glm_ray.engine.config import EngineOptions
from glm_ray.experts import swiglu_kernel


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="float32")


def prompt(n=10, seed=0):
    return {"prompt_token_ids": torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()}


def greedy(**kw):
    return SamplingParams(temperature=0.0, **kw)


def test_max_tokens_finishes_with_length(llm):
    out = llm.generate(prompt(), greedy(max_tokens=7, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stop_token_ids_and_eos(llm):
    full = llm.generate(prompt(), greedy(max_tokens=20, ignore_eos=True))[0].outputs[0].token_ids
    stop_at = full[5]
    first = full.index(stop_at)
    out = llm.generate(prompt(), greedy(max_tokens=20, stop_token_ids=[stop_at], ignore_eos=True))[0].outputs[0]
    assert out.token_ids == full[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.text == llm.tokenizer.decode(full[:first])  # the stop token's text is not output


def test_eos_from_generation_config(llm, tiny_model_dir, tmp_path):
    """A checkpoint whose generation_config.json lists an EOS id the model produces stops there."""
    import json
    import shutil

    full = llm.generate(prompt(), greedy(max_tokens=20, ignore_eos=True))[0].outputs[0].token_ids
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = gen["eos_token_id"] + [full[4]]
    (d / "generation_config.json").write_text(json.dumps(gen))
    eos_llm = LLM(d, dtype="float32")
    out = eos_llm.generate(prompt(), greedy(max_tokens=20))[0].outputs[0]
    first = full.index(full[4])
    assert out.token_ids == full[:first + 1] and out.finish_reason == "stop" and out.stop_reason is None
    ignoring = eos_llm.generate(prompt(), greedy(max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert ignoring.token_ids == full and ignoring.finish_reason == "length"


def test_min_tokens_holds_off_a_stop_token(llm):
    full = llm.generate(prompt(), greedy(max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    out = llm.generate(prompt(), greedy(max_tokens=12, min_tokens=12, stop_token_ids=[full[0]],
                                        ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 12


def test_stop_string_across_tokens_cuts_the_text(llm):
    full = llm.generate(prompt(seed=3), greedy(max_tokens=30, ignore_eos=True))[0].outputs[0]
    text = full.text
    # a stop string spanning the boundary between two tokens' texts
    pieces = [llm.tokenizer.decode(full.token_ids[:i]) for i in range(1, len(full.token_ids))]
    boundary = next(len(p) for p in pieces[3:] if 0 < len(p) < len(text) - 2 and p == text[:len(p)])
    stop = text[boundary - 1:boundary + 2]
    assert "\ufffd" not in stop
    out = llm.generate(prompt(seed=3), greedy(max_tokens=30, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]


def test_limits_are_errors_naming_both_numbers(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32", max_model_len=64, max_output_tokens=40)
    with pytest.raises(ValueError, match=r"prompt \(30 tokens\) \+ max_tokens \(35\) = 65 exceeds max_model_len 64"):
        llm.generate(prompt(30), greedy(max_tokens=35))
    with pytest.raises(ValueError, match="max_tokens 41 exceeds the output limit 40"):
        llm.generate(prompt(3), greedy(max_tokens=41))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [5, 1024]}, greedy(max_tokens=1))
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate({"prompt_token_ids": []}, greedy(max_tokens=1))
    assert not llm.engine.has_unfinished()  # nothing half-started
    assert len(llm.generate(prompt(3), greedy(max_tokens=2))[0].outputs[0].token_ids) <= 2


def test_model_limits_default_to_glm46_values(llm):
    assert llm.engine.limits.max_model_len == 202752
    assert llm.engine.limits.max_output_tokens == 131072


def test_unknown_or_bad_engine_options(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown engine option.*max_num_seq\\b"):
        LLM(tiny_model_dir, max_num_seq=4)
    with pytest.raises(ValueError, match="max_num_seqs must be an integer >= 1, got 0"):
        EngineOptions(max_num_seqs=0)
    with pytest.raises(ValueError, match="dtype"):
        EngineOptions(dtype="float64")


def test_prompts_as_strings_and_chat(llm):
    outs = llm.generate(["Hello world", "The weather"], greedy(max_tokens=4, ignore_eos=True))
    assert [o.prompt for o in outs] == ["Hello world", "The weather"]
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("Hello world")
    chat = llm.chat([{"role": "user", "content": "Hi"}], greedy(max_tokens=3, ignore_eos=True),
                    chat_template_kwargs={"enable_thinking": False})[0]
    expected = llm.tokenizer.encode("[gMASK]<sop><|user|>\nHi/nothink<|assistant|>\n<think></think>")
    assert chat.prompt_token_ids == expected


def test_bf16_engine_runs(tiny_model_dir):
    out = LLM(tiny_model_dir, dtype="bfloat16").generate(prompt(), greedy(max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5


def _upcast_copy(src, dst):
    """The checkpoint at `src` with every tensor upcast to fp32 (the same values): its twin."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    save_file({n: t.float() for n, t in load_file(dst / "model.safetensors").items()}, dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    return dst


@pytest.mark.skipif(swiglu_kernel.unavailable_reason() is not None, reason="the routed-expert C kernel is unavailable")
def test_bf16_checkpoint_keeps_its_experts_in_bf16_with_the_results_of_upcasting_them(tmp_path, monkeypatch):
    """A bf16 checkpoint served in fp32 on CPU holds its routed experts in bf16 (half the memory,
    and of a decode step's weight reads), with the same tokens and bit-identical logprobs as its
    fp32 twin: decode steps through the C kernel, and a 300-token prompt whose prefill gives the
    experts more rows than the kernel takes (torch's matmuls on a widened copy)."""
    from glm_ray.experts import local
    from glm_ray.model.synthetic import make_model

    widened = []
    real = local._widened_experts
    monkeypatch.setattr(local, "_widened_experts", lambda *a: widened.append(a[1].shape[0]) or real(*a))
    bf16 = make_model(tmp_path / "bf16", "tiny", dtype="bfloat16", seed=4)
    twin = _upcast_copy(bf16, tmp_path / "f32")
    prompts = [prompt(n, seed=n) for n in (300, 5, 17, 40)]
    params = greedy(max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    compact, upcast = LLM(bf16, dtype="float32"), LLM(twin, dtype="float32")
    held = compact.engine.experts.layers
    assert all(w.w13.dtype == w.w2.dtype == torch.bfloat16 and w.compute_dtype == torch.float32
               for w in held.values())
    assert all(w.w13.dtype == torch.float32 for w in upcast.engine.experts.layers.values())
    assert compact.engine.experts.numel() == upcast.engine.experts.numel()
    for g, w in zip(compact.generate(prompts, params), upcast.generate(prompts, params)):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].logprobs == w.outputs[0].logprobs and g.prompt_logprobs == w.prompt_logprobs
    assert widened  # the prefill did reach torch's matmuls on widened weights
    # the torch backend (no C kernel to widen them) holds them upcast
    assert all(w.w13.dtype == torch.float32
               for w in LLM(bf16, dtype="float32", expert_backend="torch").engine.experts.layers.values())


def test_async_streams_concurrently_and_aborts(tiny_model_dir, llm):
    engine = AsyncLLMEngine(tiny_model_dir, EngineOptions(dtype="float32"))
    prompts = [prompt(n, seed=n)["prompt_token_ids"] for n in (4, 9, 30, 2)]
    want = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                               greedy(max_tokens=16, ignore_eos=True))]

    async def collect(i, p):
        ids, text, last = [], "", None
        async for d in engine.generate(f"s{i}", p, greedy(max_tokens=16, ignore_eos=True)):
            ids += d.new_token_ids
            text += d.new_text
            last = d
        return ids, text, last

    async def abort_early():
        n = 0
        async for _ in engine.generate("gone", prompts[0], greedy(max_tokens=500, ignore_eos=True)):
            n += 1
            if n == 3:
                break  # leaving the stream aborts the request
        return n

    async def main():
        return await asyncio.gather(abort_early(), *(collect(i, p) for i, p in enumerate(prompts)))

    try:
        aborted, *results = asyncio.run(main())
        assert aborted == 3
        for (ids, text, last), w in zip(results, want):
            assert ids == w.token_ids and text == w.text
            assert last.finish_reason == "length" and last.num_output_tokens == 16
        with pytest.raises(ValueError, match="max_tokens"):
            asyncio.run(anext(engine.generate("bad", [1, 2], greedy(max_tokens=10**6))))
        deadline = 50
        while engine.engine.has_unfinished() and deadline:
            asyncio.run(asyncio.sleep(0.05))
            deadline -= 1
        assert not engine.engine.has_unfinished()
        assert engine.engine.scheduler.block_manager.num_used_blocks == 0
    finally:
        engine.shutdown()


def test_a_slow_consumer_gets_the_piled_up_deltas_merged(tiny_model_dir, llm):
    """A stream read late receives fewer, merged deltas: the same tokens, text and logprobs."""
    engine = AsyncLLMEngine(tiny_model_dir, EngineOptions(dtype="float32"))
    p = prompt(7, seed=3)["prompt_token_ids"]
    params = greedy(max_tokens=24, ignore_eos=True, logprobs=1)
    want = llm.generate({"prompt_token_ids": p}, params)[0].outputs[0]

    async def slow_reader():
        deltas = []
        async for d in engine.generate("slow", p, params):
            deltas.append(d)
            await asyncio.sleep(0.2)  # the engine runs ahead meanwhile
        return deltas

    try:
        deltas = asyncio.run(slow_reader())
        assert len(deltas) < 24 and any(len(d.new_token_ids) > 1 for d in deltas)
        assert [t for d in deltas for t in d.new_token_ids] == list(want.token_ids)
        assert "".join(d.new_text for d in deltas) == want.text
        logprobs = [lp for d in deltas for lp in d.new_logprobs]
        assert [sorted(lp) for lp in logprobs] == [sorted(lp) for lp in want.logprobs]
        assert deltas[-1].finish_reason == "length" and deltas[-1].num_output_tokens == 24
    finally:
        engine.shutdown()


def test_a_whole_request_comes_as_one_delta(tiny_model_dir, llm):
    """whole=True: one delta, the finished request, with the tokens, text and logprobs of LLM's
    output and the engine's token times (for clients that do not stream)."""
    engine = AsyncLLMEngine(tiny_model_dir, EngineOptions(dtype="float32"))
    p = prompt(9, seed=4)["prompt_token_ids"]
    params = greedy(max_tokens=20, ignore_eos=True, logprobs=2)
    want = llm.generate({"prompt_token_ids": p}, params)[0].outputs[0]

    async def both():
        whole = [d async for d in engine.generate("whole", p, params, whole=True)]
        streamed = [d async for d in engine.generate("streamed", p, params)]
        return whole, streamed

    try:
        whole, streamed = asyncio.run(both())
        assert len(whole) == 1 and len(streamed) > 1
        d = whole[0]
        assert d.new_token_ids == list(want.token_ids) and d.new_text == want.text
        assert [sorted(lp) for lp in d.new_logprobs] == [sorted(lp) for lp in want.logprobs]
        assert d.finish_reason == "length" and d.num_output_tokens == 20
        times = d.metrics.token_times
        assert len(times) == 20 and times == sorted(times) and d.metrics.arrival_time <= times[0]
        assert streamed[-1].metrics is not None and all(x.metrics is None for x in streamed[:-1])
    finally:
        engine.shutdown()


def test_interleaved_microbatches_give_the_same_outputs(tiny_model_dir, llm):
    """A step split into 2 or 3 micro-batches run layer by layer in turn: same tokens, same
    prompt logprobs as the whole step, prefills and decodes mixed."""
    prompts = [{"prompt_token_ids": prompt(n, seed=n)["prompt_token_ids"]} for n in (1, 5, 17, 40, 3, 64, 9)]
    params = greedy(max_tokens=10, ignore_eos=True, prompt_logprobs=1)
    want = llm.generate(prompts, params)
    for parts in (2, 3):
        got = LLM(tiny_model_dir, dtype="float32", microbatches=parts, max_num_batched_tokens=48).generate(prompts,
                                                                                                     params)
        for g, w in zip(got, want):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
                for t in b:
                    assert abs(a[t].logprob - b[t].logprob) < 1e-4


def test_attention_workers_give_the_same_outputs(tiny_model_dir, llm):
    """36 sequences (two decode buckets once they all decode, prefills mixed in at first) with
    each layer's attention calls shared among 2 threads: the same tokens and bit-identical
    logprobs as one thread."""
    prompts = [{"prompt_token_ids": prompt(n, seed=n)["prompt_token_ids"]} for n in range(3, 39)]
    params = greedy(max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    want = llm.generate(prompts, params)
    got = LLM(tiny_model_dir, dtype="float32", attention_workers=2).generate(prompts, params)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].logprobs == w.outputs[0].logprobs and g.prompt_logprobs == w.prompt_logprobs


def test_decode_attention_kernel_gives_the_same_tokens(tiny_model_dir, llm):
    """The opt-in C decode-attention kernel, alone and shared among attention workers: 36
    sequences give the tokens of torch's attention, and logprobs equal to fp32 rounding."""
    from glm_ray import native

    if native.unavailable_reason():
        pytest.skip(f"C kernels unavailable: {native.unavailable_reason()}")
    prompts = [{"prompt_token_ids": prompt(n, seed=n)["prompt_token_ids"]} for n in range(3, 39)]
    params = greedy(max_tokens=8, ignore_eos=True, logprobs=2)
    want = llm.generate(prompts, params)
    for workers in (1, 2):
        got = LLM(tiny_model_dir, dtype="float32", decode_attention="cpu-kernel",
                  attention_workers=workers).generate(prompts, params)
        for g, w in zip(got, want):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
                for t in b:
                    assert abs(a[t].logprob - b[t].logprob) < 1e-4


def test_decode_attention_kernel_is_refused_where_it_cannot_run(tiny_model_dir):
    with pytest.raises(ValueError, match="decode_attention must be one of torch, cpu-kernel, got 'flash'"):
        EngineOptions(decode_attention="flash")
    with pytest.raises(ValueError, match="decode_attention cpu-kernel cannot run here: .*fp32 on the CPU.*bfloat16"):
        LLM(tiny_model_dir, dtype="bfloat16", decode_attention="cpu-kernel")


def test_attention_workers_must_be_positive(tiny_model_dir):
    with pytest.raises(ValueError, match="attention_workers must be an integer >= 1, got 0"):
        LLM(tiny_model_dir, attention_workers=0)


def test_kernel_threads_reach_the_kernels_and_change_no_bit(tiny_model_dir, monkeypatch):
    """kernel_threads=3 whatever torch's count (what a colocated replica does): the routed-expert
    kernel and the opt-in decode-attention kernel are called with 3 threads, and tokens and
    logprobs equal, bit for bit, those of a fresh engine without it (a used one's prefix cache would
    change its prefill shapes); a count below 1 is refused."""
    from glm_ray import native
    from glm_ray.engine.decode_attention import DecodeBatch
    from glm_ray.experts import swiglu_kernel

    if native.unavailable_reason():
        pytest.skip(f"C kernels unavailable: {native.unavailable_reason()}")
    seen = []
    moe, attend = swiglu_kernel.moe, DecodeBatch.attend

    def moe_seen(*args, threads=None, **kwargs):
        seen.append(("experts", threads))
        return moe(*args, threads=threads, **kwargs)

    def attend_seen(self, q, k_cache, v_cache, scale, out, threads):
        seen.append(("attention", threads))
        return attend(self, q, k_cache, v_cache, scale, out, threads)

    monkeypatch.setattr(swiglu_kernel, "moe", moe_seen)
    monkeypatch.setattr(DecodeBatch, "attend", attend_seen)
    prompts = [{"prompt_token_ids": prompt(n, seed=n)["prompt_token_ids"]} for n in range(3, 23)]
    params = greedy(max_tokens=6, ignore_eos=True, logprobs=2)
    for attention in ("torch", "cpu-kernel"):
        want = LLM(tiny_model_dir, dtype="float32", decode_attention=attention).generate(prompts, params)
        seen.clear()
        got = LLM(tiny_model_dir, dtype="float32", decode_attention=attention, kernel_threads=3).generate(prompts,
                                                                                                         params)
        kernels = {"experts", "attention"} if attention == "cpu-kernel" else {"experts"}
        assert {kernel for kernel, _ in seen} == kernels and {threads for _, threads in seen} == {3}
        for g, w in zip(got, want):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            assert g.outputs[0].logprobs == w.outputs[0].logprobs
    with pytest.raises(ValueError, match="kernel_threads must be None or an integer >= 1, got 0"):
        EngineOptions(kernel_threads=0)


def test_wide_steps_run_on_their_own_threads_and_change_no_bit(tiny_model_dir):
    """wide_step_threads: a step of at least WIDE_STEP_TOKENS tokens (here the first, three prompts
    of 300 tokens in all) runs torch on 2 threads, the decode steps after it on torch's one; tokens,
    logprobs and prompt logprobs equal those of an engine without the option bit for bit, in fp32
    and bf16 (torch's CPU ops gave the same bits on 1 and 2 threads). With attention workers, which
    share wide steps already, it is refused."""
    from glm_ray.engine.llm_engine import WIDE_STEP_TOKENS, LLMEngine
    from glm_ray.engine.outputs import RequestDelta
    from glm_ray.experts.backend import ExpertBackend
    from glm_ray.experts.local import LocalExperts
    from glm_ray.model.loader import load_weights

    class ThreadsSeen(ExpertBackend):
        def __init__(self, inner):
            self.inner, self.seen = inner, set()

        def forward(self, layer, hidden_states, topk_ids, topk_weights):
            self.seen.add((hidden_states.shape[0] >= WIDE_STEP_TOKENS, torch.get_num_threads()))
            return self.inner.forward(layer, hidden_states, topk_ids, topk_weights)

    lengths = (200, 60, 40)
    assert sum(lengths) >= WIDE_STEP_TOKENS
    params = greedy(max_tokens=5, ignore_eos=True, logprobs=2, prompt_logprobs=1)

    def run(dtype, **options):
        experts = ThreadsSeen(LocalExperts(load_weights(tiny_model_dir, dtype=dtype, dense=False).experts))
        engine = LLMEngine(tiny_model_dir, EngineOptions(dtype=dtype, **options), experts=experts)
        for i, n in enumerate(lengths):
            engine.add_request(f"r{i}", prompt(n, seed=n)["prompt_token_ids"], params)
        deltas = {f"r{i}": [] for i in range(len(lengths))}
        while engine.has_unfinished():
            for d in engine.step():
                deltas[d.request_id].append(d)
        return {rid: RequestDelta.concat(ds) for rid, ds in deltas.items()}, experts.seen

    caller = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in ("float32", "bfloat16"):
            want, seen = run(dtype)
            assert seen == {(True, 1), (False, 1)}
            got, seen = run(dtype, wide_step_threads=2)
            assert seen == {(True, 2), (False, 1)}
            assert torch.get_num_threads() == 1
            for rid in want:
                assert got[rid].new_token_ids == want[rid].new_token_ids
                assert got[rid].new_logprobs == want[rid].new_logprobs
                assert got[rid].prompt_logprobs == want[rid].prompt_logprobs
    finally:
        torch.set_num_threads(caller)
    with pytest.raises(ValueError, match="wide_step_threads must be None or an integer >= 1, got -1"):
        EngineOptions(wide_step_threads=-1)
    with pytest.raises(ValueError, match=r"wide_step_threads \(2\) cannot be combined with attention_workers > 1 \(2\)"):
        EngineOptions(wide_step_threads=2, attention_workers=2)


def test_submit_batches_a_sinks_deltas_per_step(tiny_model_dir):
    """`submit`: every step's deltas of a sink's requests arrive in one call, equal to `generate`'s."""
    import threading

    from glm_ray.engine.async_engine import AsyncLLMEngine
    from glm_ray.engine.config import EngineOptions
    from glm_ray.engine.outputs import RequestDelta

    class Sink:
        def __init__(self):
            self.calls, self.failed, self.done = [], [], threading.Event()

        def deliver(self, deltas):
            self.calls.append(deltas)
            if sum(d.finished for batch in self.calls for d in batch) == 4:
                self.done.set()

        def fail(self, request_id, error):
            self.failed.append((request_id, error))

    engine = AsyncLLMEngine(tiny_model_dir, EngineOptions(dtype="float32", max_model_len=256))
    try:
        sink = Sink()
        params = greedy(max_tokens=6, ignore_eos=True)
        prompts = [[5, 9, 11], [300, 2], [7] * 9, [40, 41, 42, 43]]
        for i, p in enumerate(prompts[:3]):
            engine.submit(f"r{i}", p, params, sink)
        engine.submit("whole", prompts[3], params, sink, whole=True)
        with pytest.raises(ValueError, match="already running"):
            engine.submit("r0", prompts[0], params, sink)
        with pytest.raises(ValueError):
            engine.submit("bad", [10 ** 9], params, sink)  # out of the vocabulary
        assert sink.done.wait(60) and not sink.failed
        per_request: dict[str, list] = {}
        for batch in sink.calls:
            assert len({d.request_id for d in batch}) == len(batch)  # one delta per request per call
            for d in batch:
                per_request.setdefault(d.request_id, []).append(d)
        assert len(per_request["whole"]) == 1  # held back until finished
        reference = LLM(tiny_model_dir, dtype="float32", max_model_len=256)
        for i, p in enumerate(prompts):
            rid = f"r{i}" if i < 3 else "whole"
            got = RequestDelta.concat(per_request[rid])
            assert got.new_token_ids == reference.generate([{"prompt_token_ids": p}], params)[0].outputs[0].token_ids
        assert len(sink.calls) < sum(len(v) for v in per_request.values())  # batched, not one call a delta
    finally:
        engine.shutdown()


def test_the_step_loop_runs_on_its_own_torch_threads(tiny_model_dir, llm):
    """`num_threads` is set on the engine thread, the one that computes (async_engine.py: a server
    loads with torch at one thread, and only the step loop's thread gets a team); the caller's
    setting stays as it was, and the output is the same."""
    from glm_ray.experts.backend import ExpertBackend
    from glm_ray.experts.local import LocalExperts
    from glm_ray.model.loader import load_weights

    class ThreadsSeen(ExpertBackend):
        def __init__(self, inner):
            self.inner, self.seen = inner, set()

        def forward(self, layer, hidden_states, topk_ids, topk_weights):
            self.seen.add(torch.get_num_threads())
            return self.inner.forward(layer, hidden_states, topk_ids, topk_weights)

    caller = torch.get_num_threads()
    ids = prompt(6, seed=3)["prompt_token_ids"]
    want = llm.generate([{"prompt_token_ids": ids}], greedy(max_tokens=6, ignore_eos=True))[0].outputs[0].token_ids
    for threads in (1, 2):
        experts = ThreadsSeen(LocalExperts(load_weights(tiny_model_dir, dtype="float32", dense=False).experts))
        engine = AsyncLLMEngine(tiny_model_dir, EngineOptions(dtype="float32"), experts=experts, num_threads=threads)

        async def run():
            return [t async for d in engine.generate("r", ids, greedy(max_tokens=6, ignore_eos=True))
                    for t in d.new_token_ids]

        try:
            assert asyncio.run(run()) == list(want)
        finally:
            engine.shutdown()
        assert experts.seen == {threads}
        assert torch.get_num_threads() == caller



def test_a_full_waiting_list_refuses_at_once_and_takes_again_once_drained(tiny_model_dir, llm):
    """max_waiting_requests bounds what queues behind the running batch: one more is refused with
    EngineFullError (nothing started, so another replica may take it); the rest finish exactly."""
    from glm_ray.engine.async_engine import EngineDeadError, EngineFullError
    from glm_ray.experts.backend import ExpertBackend
    from glm_ray.experts.local import LocalExperts
    from glm_ray.model.loader import load_weights

    class Slow(ExpertBackend):  # steps slow enough that the queue is seen as it is
        def __init__(self):
            self.inner = LocalExperts(load_weights(tiny_model_dir, dtype="float32", dense=False).experts)

        def forward(self, layer, *args):
            time.sleep(0.02)
            return self.inner.forward(layer, *args)

    engine = AsyncLLMEngine(tiny_model_dir, EngineOptions(dtype="float32", max_num_seqs=2, max_waiting_requests=3),
                            experts=Slow())
    params = greedy(max_tokens=12, ignore_eos=True)
    prompts = [prompt(6, seed=s)["prompt_token_ids"] for s in range(6)]
    want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]

    class Sink:
        def __init__(self):
            self.tokens, self.done, self.errors = {}, set(), []

        def deliver(self, deltas):
            for d in deltas:
                self.tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
                if d.finished:
                    self.done.add(d.request_id)

        def fail(self, request_id, error):
            self.errors.append((request_id, error))

    def wait_until(condition):
        deadline = time.monotonic() + 60
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert condition()

    sink = Sink()
    scheduler = engine.engine.scheduler
    try:
        for i in range(2):
            engine.submit(f"r{i}", prompts[i], params, sink)
        wait_until(lambda: len(scheduler.running) == 2)
        for i in range(2, 5):  # the batch is full: these wait
            engine.submit(f"r{i}", prompts[i], params, sink)
        with pytest.raises(EngineFullError, match="waiting list is full \\(3 requests"):
            engine.submit("r5", prompts[5], params, sink)
        assert issubclass(EngineFullError, EngineDeadError)  # so the channel lets another replica take it
        wait_until(lambda: "r0" in sink.done)
        wait_until(lambda: len(scheduler.waiting) < 3)
        engine.submit("r5", prompts[5], params, sink)  # room again
        wait_until(lambda: len(sink.done) == 6)
        assert not sink.errors and [sink.tokens[f"r{i}"] for i in range(6)] == want
    finally:
        engine.shutdown()
