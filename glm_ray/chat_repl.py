"""`glm-ray chat`: an interactive conversation, with the model in this process or on a server.

Each turn streams as it is generated; thinking (GLM's `<think>` block) is shown apart from the
answer. Lines starting with "/" are commands: /reset (forget the conversation), /exit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Protocol, TextIO


class ChatSession(Protocol):
    def reply(self, messages: list[dict]) -> Iterator[tuple[str, str]]:
        """("reasoning" | "content", text) pieces of the assistant's turn, then ("finish", reason)."""
        ...


class LocalChat:
    """The engine in this process, stepped directly (no server)."""

    def __init__(self, model_dir, sampling: dict, enable_thinking: bool, dtype: str = "auto"):
        from glm_ray.engine.config import EngineOptions
        from glm_ray.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(model_dir, EngineOptions(dtype=dtype))
        self.sampling = sampling
        self.enable_thinking = enable_thinking
        self.turns = 0

    def reply(self, messages: list[dict]) -> Iterator[tuple[str, str]]:
        from glm_ray.engine.sampling_params import SamplingParams
        from glm_ray.serving.openai.reasoning import ReasoningStream, thinking_enabled

        tokenizer = self.engine.tokenizer
        prompt = tokenizer.apply_chat_template(messages, enable_thinking=self.enable_thinking)
        ids = tokenizer.encode(prompt)
        limits = self.engine.limits
        params = dict(self.sampling)
        params.setdefault("max_tokens", min(limits.max_output_tokens, limits.max_model_len - len(ids)))
        if params["max_tokens"] < 1:
            raise ValueError(f"the conversation ({len(ids)} tokens) fills the model's context of "
                             f"{limits.max_model_len}; /reset to start over")
        self.turns += 1
        self.engine.add_request(f"chat-{self.turns}", ids, SamplingParams(**params), prompt)
        parser = ReasoningStream(thinking_enabled(prompt))
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                yield from _pieces(*parser.feed(delta.new_text))
                if delta.finish_reason is not None:
                    yield from _pieces(*parser.finish())
                    yield "finish", delta.finish_reason


class RemoteChat:
    """A running server's OpenAI chat endpoint."""

    def __init__(self, url: str, sampling: dict, enable_thinking: bool, api_key: str | None = None):
        from glm_ray.client import ServerClient

        self.client = ServerClient(url, api_key=api_key)
        self.model = self.client.model()["id"]
        self.options = {("max_completion_tokens" if k == "max_tokens" else k): v for k, v in sampling.items()}
        self.options["chat_template_kwargs"] = {"enable_thinking": enable_thinking}

    def reply(self, messages: list[dict]) -> Iterator[tuple[str, str]]:
        yield from self.client.chat(self.model, messages, **self.options)


def _pieces(reasoning: str, content: str) -> Iterator[tuple[str, str]]:
    if reasoning:
        yield "reasoning", reasoning
    if content:
        yield "content", content


def run_chat(session: ChatSession, system: str | None = None, read: Callable[[str], str] = input,
             out: TextIO = sys.stdout) -> int:
    """The read-reply loop; returns at /exit or end of input."""
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = messages[:1] if system else []
            out.write("(conversation cleared)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; commands: /reset, /exit\n")
            continue
        messages.append({"role": "user", "content": text})
        answer, thinking, where = [], [], None
        try:
            for kind, piece in session.reply(messages):
                if kind == "finish":
                    if piece == "length":
                        out.write("\n(cut off: max tokens reached)")
                    continue
                if kind != where:
                    out.write("\n[thinking] " if kind == "reasoning" else ("\n" if where else "") + "glm> ")
                    where = kind
                out.write(piece)
                out.flush()
                (thinking if kind == "reasoning" else answer).append(piece)
        except (ValueError, RuntimeError) as e:  # a rejected turn: say why, keep the conversation going
            messages.pop()
            out.write(f"\nerror: {e}\n")
            continue
        out.write("\n")
        turn = {"role": "assistant", "content": "".join(answer)}
        if thinking:
            turn["reasoning_content"] = "".join(thinking)
        messages.append(turn)
