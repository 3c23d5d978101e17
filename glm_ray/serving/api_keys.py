"""Client API keys, shared by the HTTP and gRPC front ends.

When any key is configured, every request but `GET /health` must carry one: HTTP as
`Authorization: Bearer KEY` (401 in OpenAI's error shape otherwise), gRPC as `authorization`
metadata with the same value (UNAUTHENTICATED otherwise). Keys are compared in constant time and
never echoed back or logged.
"""

from __future__ import annotations

import hmac
import os

ENV_VAR = "GLM_RAY_API_KEY"
OPEN_PATHS = frozenset({"/health"})


def keys_from_env(environ=os.environ) -> list[str]:
    """GLM_RAY_API_KEY: one key, or several separated by commas."""
    return [k.strip() for k in environ.get(ENV_VAR, "").split(",") if k.strip()]


class ApiKeys:
    def __init__(self, keys: list[str] | tuple[str, ...] = ()):
        self._keys = tuple(k.encode() for k in keys if k)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} key(s))"

    def problem(self, authorization: str | None) -> str | None:
        """None when `authorization` (the header or metadata value) carries a valid key, else
        what is wrong, for the 401 / UNAUTHENTICATED message. Always None when no key is set."""
        if not self._keys:
            return None
        if not authorization:
            return ("this server requires an API key: send `Authorization: Bearer <key>` (gRPC: `authorization` "
                    "metadata)")
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return "the Authorization value must be `Bearer <key>`"
        given = value.strip().encode()
        # every key compared, so the time taken says nothing about which one came close
        valid = False
        for key in self._keys:
            valid |= hmac.compare_digest(given, key)
        return None if valid else "incorrect API key provided"
