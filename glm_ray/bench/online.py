"""A running server under test: the workload sent to its OpenAI `/v1/completions` over HTTP, streamed.

At most `concurrency` (default `workload.max_num_seqs`) requests are in flight at once (a new one starts when one ends),
each with the prompt as token ids, greedy, `ignore_eos`, and `return_token_ids` so every streamed
chunk says exactly which tokens it carries. TTFT is measured from each request's own send time;
token times from the start of the run, as the offline runners do.
"""

from __future__ import annotations

import json
import queue
import threading
import time

import requests

from glm_ray.bench.workloads import Workload
from glm_ray.client import auth_headers


class ServerError(RuntimeError):
    pass


def served_model(url: str, api_key: str | None = None) -> dict:
    """The first entry of the server's /v1/models (id, max_model_len, vocab_size)."""
    try:
        r = requests.get(f"{url}/v1/models", timeout=30, headers=auth_headers(api_key))
    except requests.RequestException as e:
        raise ServerError(f"cannot reach {url}: {e}") from None
    if r.status_code != 200:
        raise ServerError(f"{url}/v1/models answered {r.status_code}: {r.text[:200]}")
    return r.json()["data"][0]


def _stream_one(session: requests.Session, url: str, model: str, prompt: list[int], max_tokens: int,
                t0: float) -> tuple[float, list[float], list[int]]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    sent = time.monotonic()
    ttft, times, ids = None, [], []
    with session.post(f"{url}/v1/completions", json=body, stream=True, timeout=3600) as r:
        if r.status_code != 200:
            raise ServerError(f"a request failed with {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise ServerError(f"a request failed mid-stream: {chunk['error']['message']}")
            new = chunk["choices"][0].get("token_ids") or []
            if new:
                now = time.monotonic()
                ttft = now - sent if ttft is None else ttft
                times += [now - t0] * len(new)
                ids += new
    return ttft, times, ids


def run_online(url: str, workload: Workload, progress: bool = False, concurrency: int | None = None,
               api_key: str | None = None) -> dict:
    url = url.rstrip("/")
    model = served_model(url, api_key)["id"]
    jobs: queue.Queue = queue.Queue()
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens)):
        jobs.put((i, list(prompt), n))
    results: list = [None] * workload.num_requests
    errors: list[BaseException] = []
    done = [0]
    lock = threading.Lock()
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
                results[i] = _stream_one(session, url, model, prompt, n, t0)
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
    token_ids = [ids for _, _, ids in results]
    for ids, want in zip(token_ids, workload.output_lens):
        if len(ids) != want:
            raise ServerError(f"the server returned {len(ids)} tokens for a request asking {want} with ignore_eos")
    return {
        "system": f"server at {url} (model {model})",
        "wall_time_s": wall,
        "num_requests": len(results),
        "num_output_tokens": sum(map(len, token_ids)),
        "num_generated_tokens": sum(map(len, token_ids)),
        "ttft_s": [ttft for ttft, _, _ in results],
        "token_times_s": [times for _, times, _ in results],
        "token_ids": token_ids,
    }
