"""A running server under test: the workload sent to its OpenAI `/v1/completions` over HTTP, streamed.

Works against any OpenAI-compatible server that takes prompts as token ids (glm-ray's, vLLM's): the
model name comes from `/v1/models`. At most `concurrency` (default `workload.max_num_seqs`) requests are
in flight at once (a new one starts when one ends), each with the prompt as token ids, greedy,
`ignore_eos`, `return_token_ids` so every streamed chunk says exactly which tokens it carries, and
`stream_options.include_usage` so the server's own count of output tokens checks ours. Two short
untimed requests warm the server up first.

What is measured, per request (all clocks are this process's `time.monotonic()`):

- TTFT: from the request's own send time to the first streamed chunk that carries a token.
- ITL (inter-token latency), as vLLM's `benchmark_serving` defines it: the gap between the arrival
  of two successive token-carrying chunks of the same request. A chunk carrying k tokens is ONE
  sample (its whole gap to the chunk before it), not k samples and not gap/k; the first chunk's
  gap is TTFT, not ITL. A request with n token-carrying chunks gives n - 1 samples; the
  percentiles pool the samples of every request. A server that sends several tokens per chunk
  therefore shows fewer, larger ITL samples: `tokens_per_chunk` in the summary says whether that
  happened, and TPOT normalises for it.
- TPOT (time per output token, also vLLM's): (last chunk - first chunk) / (tokens - 1), one
  sample per request with at least 2 tokens.
- Throughput: requested output tokens over the wall time of the whole timed run.

Token times for the report's end-to-end latency are kept per token, from the start of the run, as
the offline runners give them (every token of a k-token chunk gets the chunk's arrival time).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from glm_ray.bench import stats
from glm_ray.bench.workloads import Workload, warmup_workload
from glm_ray.client import auth_headers

ITL_DEFINITION = ("ITL: per request, the gap between successive streamed chunks that carry tokens (a chunk "
                  "with k tokens is one sample, as in vLLM's benchmark_serving), pooled over requests; "
                  "TPOT: per request, (last chunk - first chunk) / (tokens - 1)")


class ServerError(RuntimeError):
    pass


def served_model(url: str, api_key: str | None = None) -> dict:
    """The first entry of the server's /v1/models (id, max_model_len; glm-ray's also vocab_size)."""
    try:
        r = requests.get(f"{url.rstrip('/')}/v1/models", timeout=30, headers=auth_headers(api_key))
    except requests.RequestException as e:
        raise ServerError(f"cannot reach {url}: {e}") from None
    if r.status_code != 200:
        raise ServerError(f"{url}/v1/models answered {r.status_code}: {r.text[:200]}")
    return r.json()["data"][0]


def served_vocab_size(info: dict, model_dir: str | None = None) -> int:
    """The vocabulary the prompts are drawn from: glm-ray's /v1/models says it; vLLM's does not, so
    then the config.json of `model_dir` (--model), or of the directory vLLM names as the model's
    `root` when it is on this machine."""
    if info.get("vocab_size"):
        return int(info["vocab_size"])
    for where in (model_dir, info.get("root")):
        if where and (Path(where) / "config.json").is_file():
            config = json.loads((Path(where) / "config.json").read_text())
            vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
            if vocab:
                return int(vocab)
    raise ServerError(f"the server's /v1/models does not say its vocab_size and {model_dir or info.get('root')!r} "
                      "has no config.json here: give the model's checkpoint directory with --model")


class StreamedRequest:
    """One request's stream as it arrived: times are seconds from the start of the run."""

    def __init__(self, sent_s: float):
        self.sent_s = sent_s
        self.chunk_times_s: list[float] = []  # one per chunk that carried tokens
        self.chunk_sizes: list[int] = []  # tokens in each of those chunks
        self.token_ids: list[int] = []
        self.usage_tokens: int | None = None  # completion_tokens of the final usage chunk

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] - self.sent_s if self.chunk_times_s else None

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_sizes)

    @property
    def token_times_s(self) -> list[float]:
        return [t for t, k in zip(self.chunk_times_s, self.chunk_sizes) for _ in range(k)]


def chunk_gaps(chunk_times: Sequence[Sequence[float]]) -> list[float]:
    """ITL samples: every gap between successive token-carrying chunks of one request, pooled."""
    return [b - a for times in chunk_times for a, b in zip(times, times[1:])]


def time_per_output_token(chunk_times: Sequence[Sequence[float]], num_tokens: Sequence[int]) -> list[float]:
    """TPOT samples: per request with >= 2 tokens, (last chunk - first chunk) / (tokens - 1)."""
    return [(times[-1] - times[0]) / (n - 1) for times, n in zip(chunk_times, num_tokens) if times and n > 1]


def _summary_ms(values: Sequence[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "mean": None, "max": None, "count": 0}
    return {"p50": 1e3 * stats.percentile(values, 50), "p99": 1e3 * stats.percentile(values, 99),
            "mean": 1e3 * sum(values) / len(values), "max": 1e3 * max(values), "count": len(values)}


def summarize_online(run: dict) -> dict:
    """`stats.summarize_run`, with ITL from chunk arrivals (see the module doc) instead of per-token
    times (which would make every extra token of a multi-token chunk a 0 ms sample), plus TPOT."""
    summary = stats.summarize_run(run)
    sizes = [k for request in run["chunk_sizes"] for k in request]
    summary["itl_ms"] = _summary_ms(chunk_gaps(run["chunk_times_s"]))
    summary["tpot_ms"] = _summary_ms(time_per_output_token(run["chunk_times_s"], list(map(sum, run["chunk_sizes"]))))
    summary["tokens_per_chunk"] = {"mean": sum(sizes) / len(sizes) if sizes else None,
                                   "max": max(sizes, default=None), "num_chunks": len(sizes)}
    summary["itl_definition"] = ITL_DEFINITION
    return summary


def _stream_one(session: requests.Session, url: str, model: str, prompt: list[int], max_tokens: int,
                t0: float) -> StreamedRequest:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    out = StreamedRequest(time.monotonic() - t0)
    with session.post(f"{url}/v1/completions", json=body, stream=True, timeout=3600) as r:
        if r.status_code != 200:
            raise ServerError(f"a request failed with {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            now = time.monotonic() - t0
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise ServerError(f"a request failed mid-stream: {chunk['error'].get('message', chunk['error'])}")
            if chunk.get("usage"):
                out.usage_tokens = chunk["usage"].get("completion_tokens")
            if not chunk.get("choices"):  # the usage chunk carries no choices
                continue
            choice = chunk["choices"][0]
            if "token_ids" not in choice and choice.get("text"):
                raise ServerError("the server streamed text without token_ids: it ignores return_token_ids "
                                  "(glm-ray and vLLM >= 0.10.2 honour it)")
            new = choice.get("token_ids") or []
            if new:
                out.chunk_times_s.append(now)
                out.chunk_sizes.append(len(new))
                out.token_ids += new
    return out


def _whole_one(session: requests.Session, url: str, model: str, prompt: list[int], max_tokens: int,
               t0: float) -> StreamedRequest:
    """One request answered whole (`stream: false`): all its tokens arrive at once, as one chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    out = StreamedRequest(time.monotonic() - t0)
    r = session.post(f"{url}/v1/completions", json=body, timeout=3600)
    if r.status_code != 200:
        raise ServerError(f"a request failed with {r.status_code}: {r.text[:300]}")
    answer = r.json()
    choice = answer["choices"][0]
    if "token_ids" not in choice:
        raise ServerError("the server answered without token_ids: it ignores return_token_ids "
                          "(glm-ray and vLLM >= 0.10.2 honour it)")
    out.token_ids = list(choice["token_ids"])
    out.chunk_times_s, out.chunk_sizes = [time.monotonic() - t0], [len(out.token_ids)]
    out.usage_tokens = (answer.get("usage") or {}).get("completion_tokens")
    return out


def run_online(url: str, workload: Workload, progress: bool = False, concurrency: int | None = None,
               api_key: str | None = None, vocab_size: int | None = None, stream: bool = True,
               warmup: bool = True) -> dict:
    """`stream=False`: every request answered whole (TTFT is then the whole request's latency);
    `warmup=False`: no untimed warmup requests first (the caller warmed the server)."""
    url = url.rstrip("/")
    send = _stream_one if stream else _whole_one
    info = served_model(url, api_key)
    model = info["id"]
    jobs: queue.Queue = queue.Queue()
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens)):
        jobs.put((i, list(prompt), n))
    results: list[StreamedRequest | None] = [None] * workload.num_requests
    errors: list[BaseException] = []
    done = [0]
    lock = threading.Lock()

    warm = warmup_workload(vocab_size or served_vocab_size(info)) if warmup else None
    with requests.Session() as session:
        session.headers.update(auth_headers(api_key))
        for prompt, n in zip(warm.prompts, warm.output_lens) if warm else ():
            _stream_one(session, url, model, list(prompt), n, time.monotonic())

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=workload.num_requests, desc="requests", unit="req")

    def worker():
        session = requests.Session()
        session.headers.update(auth_headers(api_key))
        while not errors:
            try:
                i, prompt, n = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = send(session, url, model, prompt, n, t0)
            except BaseException as e:  # noqa: BLE001 - reported after the run
                errors.append(e)
                return
            with lock:
                done[0] += 1
                if bar is not None:
                    bar.update(1)

    t0 = time.monotonic()
    in_flight = min(concurrency or workload.max_num_seqs, workload.num_requests)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if bar is not None:
        bar.close()
    if errors:
        raise errors[0]
    for r, want in zip(results, workload.output_lens):
        if r.num_tokens != want:
            raise ServerError(f"the server returned {r.num_tokens} tokens for a request asking {want} with ignore_eos")
        if r.usage_tokens is not None and r.usage_tokens != r.num_tokens:
            raise ServerError(f"the server's usage says {r.usage_tokens} output tokens but its chunks carried "
                              f"{r.num_tokens}")
    return {
        "system": f"server at {url} (model {model})",
        "wall_time_s": wall,
        "num_requests": len(results),
        "num_output_tokens": sum(r.num_tokens for r in results),
        "num_generated_tokens": sum(r.num_tokens for r in results),
        "ttft_s": [r.ttft_s for r in results],
        "token_times_s": [r.token_times_s for r in results],
        "chunk_times_s": [r.chunk_times_s for r in results],
        "chunk_sizes": [r.chunk_sizes for r in results],
        "token_ids": [r.token_ids for r in results],
    }
