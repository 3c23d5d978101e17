"""One offline throughput harness for glm-ray's `LLM` and a peer's (vLLM's), so the two engines
are timed the same way on the same requests.

Runs with any Python that has the chosen system installed and this repository on its path (the
workloads module imports nothing beyond the standard library), e.g. beside vLLM's CPU build:

    PYTHONPATH=. /tmp/vllm/bin/python -m glm_ray.bench.offline_peer --system vllm --model DIR --workload C D
    python -m glm_ray.bench.offline_peer --system glm-ray --model DIR --workload C D [--option decode_attention=cpu-kernel]

Per workload: two warmup requests, then `--passes` whole passes through one `generate` call each
(greedy, EOS ignored, fp32, at most 64 sequences running unless an option says otherwise), each
pass's output tokens/s printed as one JSON line. Pass i draws its requests with seed `--seed` + i,
and the warmup requests with the seed after the last pass: both systems cache prompt prefixes, so
a pass that repeated an earlier pass's prompts would skip most of its prefill (on workload C that
made a second pass ~1.5x faster than the first).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from glm_ray.bench.workloads import MAX_NUM_SEQS, SPECS, make_workload


def _option(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"an engine option is NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _glm_ray(model: str, options: dict):
    from glm_ray import LLM, SamplingParams

    llm = LLM(model, **{"dtype": "float32", "max_num_seqs": MAX_NUM_SEQS, **options})
    return llm, SamplingParams


def _vllm(model: str, options: dict):
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **{"dtype": "float32", "max_model_len": 2048, "max_num_seqs": MAX_NUM_SEQS, **options})
    return llm, SamplingParams


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m glm_ray.bench.offline_peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--system", choices=["glm-ray", "vllm"], required=True)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--workload", nargs="+", choices=sorted(SPECS), default=["C", "D"])
    p.add_argument("--passes", type=int, default=2, help="timed passes of each workload (default 2)")
    p.add_argument("--seed", type=int, default=0, help="the workloads' seed (default 0)")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="NAME=VALUE",
                   help="an engine option of the system, e.g. decode_attention=cpu-kernel (JSON values)")
    args = p.parse_args(argv)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    llm, sampling = (_glm_ray if args.system == "glm-ray" else _vllm)(args.model, dict(args.option))

    def requests(name: str, seed: int):
        workload = make_workload(name, vocab, seed=seed)
        prompts = [{"prompt_token_ids": list(ids)} for ids in workload.prompts]
        params = [sampling(max_tokens=n, temperature=0, ignore_eos=True) for n in workload.output_lens]
        return prompts, params

    for name in args.workload:
        prompts, params = requests(name, args.seed + args.passes)
        llm.generate(prompts[:2], params[:2])
        for i in range(args.passes):
            prompts, params = requests(name, args.seed + i)
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            print(json.dumps({"system": args.system, "options": dict(args.option), "workload": name,
                              "seed": args.seed + i, "pass": i + 1, "output_tokens": tokens,
                              "tok_s": round(tokens / seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
