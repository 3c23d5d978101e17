"""A `Backend` that replays canned GLM output, for front-end tests (HTTP and gRPC) that need
thinking, tool calls, failures or a request that blocks, which a random tiny model cannot give."""

from __future__ import annotations

import asyncio
import threading


class FakeBackend:
    """Replays `script` (text pieces) as one delta each; `fail` raises, `gate` blocks until set."""

    model_name = "fake"
    max_model_len = 4096
    max_output_tokens = 1024

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.script: list[str] = ["hello"]
        self.finish_reason = "stop"
        self.fail: BaseException | None = None
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.requests: list[dict] = []

    async def generate(self, request: dict):
        self.requests.append(request)
        self.entered.set()
        if self.gate is not None:
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
        if self.fail is not None:
            raise self.fail
        for i, piece in enumerate(self.script):
            last = i == len(self.script) - 1
            yield {"request_id": request["request_id"], "token_ids": [7], "text": piece, "logprobs": None,
                   "finish_reason": self.finish_reason if last else None, "stop_reason": None,
                   "num_prompt_tokens": len(request["prompt_token_ids"]), "num_output_tokens": i + 1,
                   "prompt_logprobs": None}

    async def health(self):
        return self.fail is None, {"fake": True}

    async def experts(self):
        return {"replicas": {"0": ["r0"]}}

    async def stats(self):
        return {"running": 1, "waiting": 2, "kv_cache_usage": 0.25, "replicas": {"0": 2, "1": 1},
                "routed_tokens": {"0": 100, "1": 50},
                "groups": {"0": {"busy_fraction": 0.5, "tokens_per_s": 1200.0},
                           "1": {"busy_fraction": 0.125, "tokens_per_s": 300.0}},
                "deployments": {"ExpertGroup_0": {"running": 2, "starting": 1, "draining": 0},
                                "AttentionReplica": {"running": 1, "starting": 0, "draining": 1}},
                "attention": {"r1": {"sequences": 3.0, "kv_usage": 0.25}}}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer"},
                                                "units": {"type": "array"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
             "zone": {"type": "string"}}}}}]
GLM_OUTPUT = ("<think>\nThe user wants weather.\n</think>\nLet me check.\n"
              "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Bei\"jing</arg_value>\n"
              "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>units</arg_key>\n"
              "<arg_value>[\"C\", \"F\"]</arg_value>\n</tool_call>\n"
              "<tool_call>get_time\n<arg_key>zone</arg_key>\n<arg_value>0800</arg_value>\n</tool_call>")
WEATHER_ARGS = {"city": 'Bei"jing', "days": 3, "units": ["C", "F"]}


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]
