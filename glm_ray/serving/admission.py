"""The in-flight limit one ingress replica enforces on HTTP and gRPC together."""

from __future__ import annotations

from glm_ray.serving.openai.errors import OpenAIError


class Admission:
    """Generation requests in flight at one ingress replica, HTTP and gRPC together; beyond the
    limit new ones are turned away (429 / RESOURCE_EXHAUSTED) instead of queueing without bound."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    def busy_error(self) -> OpenAIError | None:
        if self.in_flight < self.limit:
            return None
        return OpenAIError(429, f"the server has {self.in_flight} requests in flight (limit {self.limit}); "
                                "retry shortly", headers={"Retry-After": "1"})
