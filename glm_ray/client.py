"""A small HTTP client for a running glm-ray server, for the command line (`glm-ray chat --url`,
`glm-ray status`): the OpenAI chat endpoint streamed, and the operational endpoints."""

from __future__ import annotations

import json
from collections.abc import Iterator

import requests



class ClientError(RuntimeError):
    """The server could not be reached, or answered with an error (its message included)."""


def auth_headers(api_key: str | None = None) -> dict[str, str]:
    """`Authorization: Bearer KEY` for `api_key`, else for the first key in GLM_RAY_API_KEY; {} if none."""
    from glm_ray.serving.api_keys import keys_from_env

    key = api_key or next(iter(keys_from_env()), None)
    return {"Authorization": f"Bearer {key}"} if key else {}


class ServerClient:
    def __init__(self, url: str, timeout_s: float = 30.0, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = auth_headers(api_key)

    def _get(self, path: str) -> requests.Response:
        try:
            return requests.get(f"{self.url}{path}", timeout=self.timeout_s, headers=self.headers)
        except requests.RequestException as e:
            raise ClientError(f"cannot reach {self.url}: {e}") from None

    def _json(self, path: str) -> dict:
        r = self._get(path)
        if r.status_code != 200:
            raise ClientError(f"{path}: {_error_message(r)}")
        return r.json()

    def model(self) -> dict:
        return self._json("/v1/models")["data"][0]

    def health(self) -> tuple[bool, dict | str]:
        r = self._get("/health")
        return (True, r.json()) if r.status_code == 200 else (False, _error_message(r))

    def experts(self) -> dict:
        return self._json("/v1/experts")

    def rebalance(self) -> dict:
        try:
            r = requests.post(f"{self.url}/v1/experts/rebalance", timeout=self.timeout_s, headers=self.headers)
        except requests.RequestException as e:
            raise ClientError(f"cannot reach {self.url}: {e}") from None
        if r.status_code != 200:
            raise ClientError(f"/v1/experts/rebalance: {_error_message(r)}")
        return r.json()

    def metrics(self) -> dict[str, float]:
        """Prometheus samples without labels or with one label, as {"name{label}": value}."""
        r = self._get("/metrics")
        if r.status_code != 200:
            raise ClientError(f"/metrics: {_error_message(r)}")
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    continue
        return out

    def chat(self, model: str, messages: list[dict], **options) -> Iterator[tuple[str, str]]:
        """Stream one assistant turn: ("reasoning" | "content", text) pieces, then ("finish", reason)."""
        body = {"model": model, "messages": messages, "stream": True, **options}
        try:
            r = requests.post(f"{self.url}/v1/chat/completions", json=body, stream=True, timeout=3600,
                              headers=self.headers)
        except requests.RequestException as e:
            raise ClientError(f"cannot reach {self.url}: {e}") from None
        with r:
            if r.status_code != 200:
                raise ClientError(_error_message(r))
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ClientError(chunk["error"]["message"])
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    if delta.get("reasoning_content"):
                        yield "reasoning", delta["reasoning_content"]
                    if delta.get("content"):
                        yield "content", delta["content"]
                    for call in delta.get("tool_calls") or []:
                        function = call.get("function") or {}
                        yield "content", (f"[tool call {function['name']}] " if function.get("name") else "") + \
                            (function.get("arguments") or "")
                    if choice.get("finish_reason"):
                        yield "finish", choice["finish_reason"]


def _error_message(r: requests.Response) -> str:
    try:
        return f"{r.status_code} {r.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code} {r.text[:300]}"


def status_report(client: ServerClient) -> str:
    """What `glm-ray status` prints: health, model, deployments, expert groups and their load."""
    ok, health = client.health()
    model = client.model()
    lines = [f"glm-ray at {client.url}: {'healthy' if ok else 'NOT healthy: ' + str(health)}",
             f"model {model['id']}: max_model_len {model.get('max_model_len')}, computing in "
             f"{model.get('dtype') or 'unknown dtype'}"]
    experts = client.experts()
    deployments = experts.get("deployments") or {}
    if deployments:
        lines.append("deployments: " + ", ".join(f"{name} {d['running']}/{d['replicas']} running"
                                                 + (f", {d['starting']} starting" if d.get("starting") else "")
                                                 + (f", {d['draining']} draining" if d.get("draining") else "")
                                                 + f" ({d['status']})" for name, d in sorted(deployments.items())))
    groups = (experts.get("placement") or {}).get("groups", [])
    replicas, load = experts.get("replicas", {}), experts.get("load", {})
    if groups:
        lines.append(f"expert groups: {len(groups)} (routing table version {experts.get('version')})")
    elif "placement" in experts:
        lines.append("expert groups: 0 (colocated: every attention replica holds every routed expert)")
    group_load = experts.get("groups") or {}
    for g, members in enumerate(groups):
        addresses = replicas.get(str(g), [])
        busy = ", ".join(f"{a} ({load.get(a, 0)} in flight)" for a in addresses) or "NO LIVE REPLICA"
        lines.append(f"  group {g}: {len(members)} experts ({_ranges(members)}), {len(addresses)} replica(s): {busy}")
        if str(g) in group_load:
            gl = group_load[str(g)]
            lines.append(f"    load: busy {100 * gl['busy_fraction']:.1f}% per replica ({gl['busy_sum']:.2f} replicas' "
                         f"worth), {gl['tokens_per_s']:.0f} tokens/s")
    attention = experts.get("attention") or {}
    if attention:
        lines.append(f"attention replicas: {len(attention)}")
        for replica, a in attention.items():
            lines.append(f"  {replica}: {a['sequences']:.0f} sequences ({a.get('running', 0):.0f} running, "
                         f"{a.get('waiting', 0):.0f} waiting), KV cache {100 * a['kv_usage']:.1f}% used")
    tokens = experts.get("tokens_per_expert") or {}
    balance = experts.get("balancedness") or {}
    if tokens:
        lines.append(f"expert load over the last {experts.get('window_s', 0):.0f} s (tokens per expert; "
                     "imbalance = max / mean):")
        for layer, counts in sorted(tokens.items(), key=lambda kv: int(kv[0])):
            total = sum(counts)
            if not total:
                continue
            mean = total / len(counts)
            hottest = sorted(range(len(counts)), key=lambda e: -counts[e])[:3]
            per_group = [round(n) for n in (experts.get("group_tokens") or {}).get(layer, [])]
            layer_balance = (balance.get("layers") or {}).get(layer)
            lines.append(f"  layer {layer}: {total} tokens, imbalance {max(counts) / mean:.2f}, hottest experts "
                         + ", ".join(f"{e} ({counts[e]})" for e in hottest)
                         + (f"; per group {per_group}" if per_group else "")
                         + (f", balancedness {layer_balance:.2f}" if layer_balance is not None else ""))
    if balance.get("min") is not None:
        lines.append(f"balancedness over groups (mean / max tokens per group, 1.0 even): min {balance['min']:.2f}, "
                     f"mean {balance['mean']:.2f} over {len(balance['layers'])} layers")
    for g, b in sorted((balance.get("replicas") or {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"  group {g} over its replicas (tokens/s): {b:.2f}")
    lines.extend(_rebalance_lines(experts.get("rebalance")))
    m = client.metrics()
    if "glm_ray_num_requests_running" in m:
        lines.append(f"requests: {m['glm_ray_num_requests_running']:.0f} running, "
                     f"{m.get('glm_ray_num_requests_waiting', 0):.0f} waiting; KV cache "
                     f"{100 * m.get('glm_ray_kv_cache_usage_ratio', 0):.1f}% used")
    return "\n".join(lines)


def rebalance_report(record: dict) -> str:
    """What `glm-ray rebalance` prints for the router's answer."""
    before, after = record["balancedness_before"], record["predicted_after"]
    fmt = lambda b: "n/a" if b is None else f"{b:.3f}"  # noqa: E731
    if not record["changed"]:
        return (f"placement version {record['version']} stays: no placement the policy finds is better "
                f"(balancedness min {fmt(before.get('min'))}, mean {fmt(before.get('mean'))})")
    lines = [f"rebalancing to placement version {record['version']} ({record['reason']}): balancedness min "
             f"{fmt(before.get('min'))} -> {fmt(after.get('min'))} predicted, mean {fmt(before.get('mean'))} -> "
             f"{fmt(after.get('mean'))}; {record['copies']} expert copies in {record['slots_per_group']} slots "
             "per group"]
    for g, move in sorted(record["moves"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"  group {g}: gains {move['gains'] or 'none'}, drops {move['drops'] or 'none'}")
    lines.append("expert replicas load their new slots while serving; `glm-ray status` shows when it is published")
    return "\n".join(lines)


def _rebalance_lines(r: dict | None) -> list[str]:
    if not r:
        return []
    lines = [f"placement version {r['version']}: {r['slots_per_group']} slots per group "
             f"({r['redundant_experts']} redundant), {r['rebalances']} rebalance(s), {r['failures']} abandoned"
             + (f"; version {r['pending_version']} loading" if r.get("pending_version") is not None else "")]
    last = r.get("last")
    if last:
        before, after = last["balancedness_before"].get("min"), last["predicted_after"].get("min")
        lines.append(f"  last rebalance ({last['reason']}): {last['state']}"
                     + (f" in {last['seconds']:.1f} s" if last.get("seconds") is not None else "")
                     + (f", balancedness {before:.2f} -> {after:.2f} predicted" if before is not None
                        and after is not None else "")
                     + (f", longest engine step meanwhile {1e3 * last['longest_step_s']:.0f} ms"
                        if last.get("longest_step_s") else "")
                     + (f": {last['error']}" if last.get("error") else ""))
    return lines


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, start = [], None
    for i, e in enumerate(ids):
        if start is None:
            start = e
        if i + 1 == len(ids) or ids[i + 1] != e + 1:
            out.append(str(start) if start == e else f"{start}-{e}")
            start = None
    return ", ".join(out)
