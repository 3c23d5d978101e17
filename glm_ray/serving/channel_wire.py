"""Messages on the channel between an ingress replica and an attention replica.

One long-lived gRPC stream per (ingress replica, attention replica) pair carries every request
between them: the ingress writes `submit` and `abort` messages; the attention replica writes one
message per engine step (or fewer, when the reader lags) holding every delta of that step for
this ingress's requests, and per-request errors. msgpack, never pickle: the port is reachable by
other nodes (and guarded by the cluster secret, experts/auth.py).
"""

from __future__ import annotations

import msgpack

SERVICE = "glm_ray.v1.AttentionChannel"
OPEN_METHOD = f"/{SERVICE}/Open"

# error codes, as HTTP statuses: 400 the request itself is wrong; 503 the replica cannot serve it
BAD_REQUEST, UNAVAILABLE = 400, 503


def submit(request: dict) -> bytes:
    """request: {"request_id", "prompt_token_ids", "sampling_params", "prompt"?, "stream"?}."""
    return msgpack.packb({"op": "submit", "request": request}, use_bin_type=True)


def abort(request_id: str) -> bytes:
    return msgpack.packb({"op": "abort", "request_id": request_id}, use_bin_type=True)


def decode_command(data: bytes) -> dict:
    """A client message, checked: a ValueError names what is wrong."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as e:
        raise ValueError(f"not a channel message: {e}") from None
    op = msg.get("op") if isinstance(msg, dict) else None
    if op == "submit" and isinstance(msg.get("request"), dict) and isinstance(msg["request"].get("request_id"), str):
        return msg
    if op == "abort" and isinstance(msg.get("request_id"), str):
        return msg
    raise ValueError("a channel message is {op: submit, request: {request_id, ...}} or {op: abort, request_id}")


def error(request_id: str, code: int, message: str, retry: bool, resumable: bool = False) -> dict:
    """`retry`: nothing of the request was produced, so it may be sent again to another replica;
    `resumable`: it was stopped for a reason of this replica's own (its drain time ran out), so
    another replica may continue it from the tokens already sent (attention_links.py)."""
    return {"request_id": request_id, "code": code, "message": message, "retry": retry, "resumable": resumable}


def replies(deltas: list[dict], errors: list[dict]) -> bytes:
    return msgpack.packb({"deltas": deltas, "errors": errors}, use_bin_type=True)


def decode_replies(data: bytes) -> tuple[list[dict], list[dict]]:
    msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return msg.get("deltas", []), msg.get("errors", [])
