"""The baseline: transformers' `generate` on the same checkpoint, static batches in request order.

Batches of `max_num_seqs` requests, left-padded with an attention mask, greedy, EOS disabled; each
batch runs until its longest request, so shorter requests ride along as padding work that is not
counted: only requested tokens enter tokens/s. All requests count as arriving when the timed run
starts (as in the engine's offline mode), so a later batch's TTFT includes the batches before it.
Token times come from a streamer that notes the clock at every decoding step; `put` costs a few
microseconds per step. Meant to run in a child process (`isolate.run_in_child`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from glm_ray.bench.workloads import Workload, warmup_workload


class StepClock:
    """A transformers streamer that records when each decoding step's tokens appeared."""

    def __init__(self):
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:  # generate() first hands over the prompt itself
            self._seen_prompt = True
            return
        self.times.append(time.monotonic())

    def end(self) -> None:
        pass


def left_pad(prompts: list[tuple[int, ...]], pad_token_id: int):
    """-> input_ids, attention_mask [B, longest], prompts right-aligned."""
    import torch

    longest = max(map(len, prompts))
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, longest - len(p):] = 1
    return input_ids, attention_mask


def _generate_batch(model, prompts, output_lens, pad_token_id):
    """-> per request (its requested tokens, the times they appeared)."""
    import torch

    input_ids, attention_mask = left_pad(list(prompts), pad_token_id)
    clock = StepClock()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=max(output_lens), pad_token_id=pad_token_id, streamer=clock)
    new = out[:, input_ids.shape[1]:].tolist()
    if len(clock.times) != max(output_lens) or any(len(row) != max(output_lens) for row in new):
        raise RuntimeError(f"generate() made {len(clock.times)} steps for a batch that asked for {max(output_lens)}")
    return [(row[:n], clock.times[:n]) for row, n in zip(new, output_lens)], len(new) * max(output_lens)


def run_hf(model_dir: str | Path, workload: Workload, dtype: str = "float32", progress: bool = False) -> dict:
    """Generate the workload with transformers; the raw run that `stats.summarize_run` reads."""
    import torch
    import transformers
    from tqdm import tqdm

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.monotonic()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
    # generate() fills an unset eos_token_id from the generation config; clear it there
    model.generation_config.eos_token_id = None
    for key in ("temperature", "top_p", "top_k"):  # the checkpoint's sampling defaults; greedy ignores them
        setattr(model.generation_config, key, None)
    pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    load_time = time.monotonic() - start
    warmup = warmup_workload(model.config.vocab_size)
    _generate_batch(model, warmup.prompts, warmup.output_lens, pad_token_id)

    batch_size = workload.max_num_seqs
    token_ids, token_times, generated = [], [], 0
    starts = range(0, workload.num_requests, batch_size)
    cpu0, t0 = time.process_time(), time.monotonic()
    for s in tqdm(starts, desc="hf batches", disable=not (progress and sys.stderr.isatty())):
        rows, computed = _generate_batch(model, workload.prompts[s:s + batch_size],
                                         workload.output_lens[s:s + batch_size], pad_token_id)
        generated += computed
        for ids, times in rows:
            token_ids.append(ids)
            token_times.append([t - t0 for t in times])
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    return {
        "system": "hf",
        "options": {"dtype": dtype, "batch_size": batch_size, "transformers": transformers.__version__},
        "torch_num_threads": torch.get_num_threads(),
        "load_time_s": load_time,
        "wall_time_s": wall,
        "cpu_time_s": cpu,  # all threads; well under wall x threads means the process was starved
        "num_requests": len(token_ids),
        "num_output_tokens": sum(map(len, token_ids)),
        "num_generated_tokens": generated,  # including tokens past a request's length in its batch
        "ttft_s": [times[0] for times in token_times],  # arrival is t0 for every request
        "token_times_s": token_times,
        "token_ids": token_ids,
    }
