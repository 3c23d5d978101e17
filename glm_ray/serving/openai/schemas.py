"""Request bodies of the OpenAI endpoints, as pydantic models (strict: no silent type coercion).

Unknown fields are ignored, as vLLM does, so clients that send newer OpenAI options keep working.
Checks that need the backend (model name, token limits) or several fields are made in the handlers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` and no choices.")
    continuous_usage_stats: bool = Field(False, description="Accepted for vLLM compatibility; ignored.")


class SamplingFields(_Body):
    """Sampling options shared by completions and chat; extensions follow vLLM's names."""

    model: str = Field(description="Must be the served model's name (see /v1/models).")
    n: int = Field(1, description="Number of choices per prompt; only 1 is supported.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass, in (0, 1].")
    top_k: int | None = Field(None, description="Keep the k most likely tokens; 0 or -1 keeps all.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Drop tokens below min_p * p(max).")
    repetition_penalty: float | None = Field(None, gt=0.0, description="HF repetition penalty (> 1 discourages).")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="OpenAI presence penalty.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="OpenAI frequency penalty.")
    seed: int | None = Field(None, description="Per-request sampling seed.")
    stop: str | list[str] | None = Field(None, description="Stop strings; not included in the output.")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end the output.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens.")
    min_tokens: int | None = Field(None, ge=0, description="Stops cannot end the output before this many tokens.")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text.")
    stream: bool = Field(False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported; must be empty.")
    user: str | None = Field(None, description="End-user id; ignored.")


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists.")
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=1, description="Most tokens to generate per prompt.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Top logprobs per token (plus the "
                                 "sampled one).")
    echo: bool = Field(False, description="Prepend the prompt to the completion.")
    return_token_ids: bool = Field(False, description="vLLM extension: each choice (or streamed chunk) also "
                                   "carries its new `token_ids`, and `prompt_token_ids`.")
    best_of: int | None = Field(None, description="Only 1 is supported.")
    suffix: str | None = Field(None, description="Not supported.")


class TextPart(_Body):
    type: Literal["text"] = Field(description='Only "text" parts are supported.')
    text: str = Field(description="The text.")


class FunctionCall(_Body):
    name: str = Field(description="Function name.")
    arguments: str | dict[str, Any] = Field(description="Arguments as a JSON object (string or object).")


class ToolCall(_Body):
    id: str | None = Field(None, description="Tool call id, echoed by the tool message.")
    type: Literal["function"] = Field("function", description='Always "function".')
    function: FunctionCall


class ChatMessage(_Body):
    role: str = Field(description="system, developer, user, assistant or tool.")
    content: str | list[TextPart] | None = Field(None, description="Text, or a list of text parts.")
    name: str | None = Field(None, description="Participant name; ignored by the GLM template.")
    tool_calls: list[ToolCall] | None = Field(None, description="Calls an assistant turn made.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")
    reasoning_content: str | None = Field(None, description="An assistant turn's thinking.")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, oldest first.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (reasoning "
                                              "included); preferred over max_tokens.")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    logprobs: bool = Field(False, description="Return logprobs of the output tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token; "
                                     "needs logprobs.")
    tools: list[dict[str, Any]] | None = Field(None, description="OpenAI function tools.")
    tool_choice: str | dict[str, Any] | None = Field(None, description='"none", "auto", "required" or '
                                                     '{"type": "function", "function": {"name": ...}}.')
    parallel_tool_calls: bool = Field(True, description="When false, only the first call is returned.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Extra template variables, e.g. "
                                                        "enable_thinking.")
