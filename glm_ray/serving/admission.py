"""The in-flight limit one ingress replica enforces on HTTP and gRPC together, counted in prompts."""

from __future__ import annotations

from glm_ray.serving.openai.errors import OpenAIError


class Admission:
    """Generations in flight at one ingress replica, HTTP (every generating route) and gRPC
    together, each prompt of a multi-prompt completion counted; beyond the limit new ones are
    turned away (429 / RESOURCE_EXHAUSTED) instead of queueing without bound. A request may carry at
    most `max_prompts` prompts (400 beyond: retrying would not help)."""

    def __init__(self, limit: int, max_prompts: int | None = None):
        max_prompts = min(32, limit) if max_prompts is None else max_prompts
        if not 1 <= max_prompts <= limit:
            raise ValueError(f"max_prompts_per_request ({max_prompts}) must be between 1 and the in-flight limit "
                             f"max_pending_requests ({limit}): a larger request could never be admitted")
        self.limit, self.max_prompts = limit, max_prompts
        self.in_flight = 0

    def busy_error(self, prompts: int = 1, held: int = 0) -> OpenAIError | None:
        """None if a request of `prompts` generations, `held` of which it already counts, fits under
        the limit; else the 429 to answer."""
        others = self.in_flight - held
        if others + prompts <= self.limit:
            return None
        what = f"its {prompts} prompts would exceed" if prompts > 1 else "that is"
        return OpenAIError(429, f"the server has {others} generations in flight and {what} its limit of "
                                f"{self.limit}; retry shortly", headers={"Retry-After": "1"})

    def too_many_prompts(self, prompts: int) -> OpenAIError | None:
        if prompts <= self.max_prompts:
            return None
        return OpenAIError(400, f"the request has {prompts} prompts; at most {self.max_prompts} per request: send "
                                "them in several requests", param="prompt")
