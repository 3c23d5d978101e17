"""The benchmark's request sets, drawn deterministically from a seed.

A  fixed shape: 64 requests, 32-token prompts, 128 output tokens each.
B  mixed: 256 requests, prompt lengths uniform in 16..512, output lengths uniform in 16..256.
C  mixed-128: 128 requests, prompt lengths uniform in 16..384, output lengths uniform in 16..192.
D  decode-heavy: 128 requests, 32-token prompts, 128 output tokens each.

A and B are the issue-3 targets against transformers (`--workload all` runs those two); C and D were
added for serving comparisons (`glm-ray bench --url`, e.g. against vLLM) and are chosen by name.

Every request ignores EOS, so the number of output tokens is exactly what was asked for. Token ids
are uniform in [0, vocab_size - 32): the special tokens sit at the top of the vocabulary. Requests
are drawn one after another, so a workload cut to N requests is the first N of the full one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NUM_SPECIAL_TOKENS = 32  # ids at the top of the vocabulary that prompts avoid
MAX_NUM_SEQS = 64  # sequences running at once, and the baseline's batch size


@dataclass(frozen=True)
class WorkloadSpec:
    """The shape of a workload before any scaling."""

    name: str
    num_requests: int
    min_prompt_len: int
    max_prompt_len: int
    min_output_len: int
    max_output_len: int
    description: str


SPECS = {
    "A": WorkloadSpec("A", 64, 32, 32, 128, 128, "fixed shape: 32-token prompts, 128 output tokens"),
    "B": WorkloadSpec("B", 256, 16, 512, 16, 256, "mixed: prompts uniform in 16..512, outputs in 16..256"),
    "C": WorkloadSpec("C", 128, 16, 384, 16, 192, "mixed-128: prompts uniform in 16..384, outputs in 16..192"),
    "D": WorkloadSpec("D", 128, 32, 32, 128, 128, "decode-heavy: 32-token prompts, 128 output tokens"),
}


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    seed: int
    prompts: tuple[tuple[int, ...], ...]
    output_lens: tuple[int, ...]
    max_num_seqs: int = MAX_NUM_SEQS

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    def summary(self) -> dict:
        return {
            "name": self.name, "description": self.description, "seed": self.seed,
            "num_requests": self.num_requests, "num_prompt_tokens": self.num_prompt_tokens,
            "num_output_tokens": self.num_output_tokens, "max_num_seqs": self.max_num_seqs,
            "prompt_len_range": [min(map(len, self.prompts)), max(map(len, self.prompts))],
            "output_len_range": [min(self.output_lens), max(self.output_lens)],
        }


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def make_workload(name: str, vocab_size: int, seed: int = 0, num_requests: int | None = None,
                  scale: float = 1.0) -> Workload:
    """Workload `name` (a key of SPECS). `scale` in (0, 1] shrinks the request count and every length;
    `num_requests` then overrides the count (a quick smoke run)."""
    if name not in SPECS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(SPECS)}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if num_requests is not None and num_requests < 1:
        raise ValueError(f"num_requests must be at least 1, got {num_requests}")
    if vocab_size <= NUM_SPECIAL_TOKENS:
        raise ValueError(f"vocab_size {vocab_size} leaves no ordinary token below the {NUM_SPECIAL_TOKENS} "
                         "special ones")
    spec = SPECS[name]
    count = num_requests if num_requests is not None else _scaled(spec.num_requests, scale)
    rng = random.Random(f"glm-ray-bench/{name}/{seed}")  # str seeds hash the same on every platform
    prompts, output_lens = [], []
    for _ in range(count):
        prompt_len = rng.randint(_scaled(spec.min_prompt_len, scale), _scaled(spec.max_prompt_len, scale))
        output_lens.append(rng.randint(_scaled(spec.min_output_len, scale), _scaled(spec.max_output_len, scale)))
        prompts.append(tuple(rng.randrange(vocab_size - NUM_SPECIAL_TOKENS) for _ in range(prompt_len)))
    description = spec.description if (count, scale) == (spec.num_requests, 1.0) else \
        f"{spec.description} (cut to {count} requests, lengths x{scale:g})"
    return Workload(name, description, seed, tuple(prompts), tuple(output_lens))


def warmup_workload(vocab_size: int) -> Workload:
    """Two short requests run before the timed run, so one-time setup is not timed; a seed of its own
    keeps its prompts apart from the measured ones (no prefix-cache hits)."""
    rng = random.Random("glm-ray-bench/warmup")
    prompts = tuple(tuple(rng.randrange(vocab_size - NUM_SPECIAL_TOKENS) for _ in range(16)) for _ in range(2))
    return Workload("warmup", "warmup", -1, prompts, (4, 4))
