"""Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("glm_ray_requests", "Requests by endpoint (HTTP path or gRPC method) and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("glm_ray_time_to_first_token_seconds", "From request arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("glm_ray_inter_token_latency_seconds", "Time between output tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("glm_ray_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter("glm_ray_generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge("glm_ray_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("glm_ray_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("glm_ray_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)",
                              registry=r)
        self.replicas = Gauge("glm_ray_expert_group_replicas", "Live replicas per expert group", ["group"],
                              registry=r)
        self.balancedness = Gauge("glm_ray_expert_balancedness", "Mean / max tokens per expert group of a MoE "
                                  "layer over the router's window (1.0 is even)", ["layer"], registry=r)
        self.balancedness_summary = Gauge("glm_ray_expert_balancedness_summary", "Balancedness over the MoE "
                                          "layers: their min and mean", ["stat"], registry=r)
        self.replica_balancedness = Gauge("glm_ray_expert_replica_balancedness", "Mean / max tokens/s over the "
                                          "replicas of an expert group", ["group"], registry=r)
        self.routed_tokens = Gauge("glm_ray_expert_group_routed_tokens", "Tokens routed to each expert group",
                                   ["group"], registry=r)
        self.group_busy = Gauge("glm_ray_expert_group_busy_fraction", "Seconds computing per wall second, mean "
                                "over the group's live replicas (look-back window)", ["group"], registry=r)
        self.group_tokens = Gauge("glm_ray_expert_group_tokens_per_second", "Tokens computed per second, summed "
                                  "over the group's live replicas", ["group"], registry=r)
        self.deployment_replicas = Gauge("glm_ray_deployment_replicas", "Replicas of each deployment by state "
                                         "(running, starting, draining)", ["deployment", "state"], registry=r)
        self.attention_sequences = Gauge("glm_ray_attention_sequences", "Sequences running + waiting on each "
                                         "attention replica", ["replica"], registry=r)
        self.attention_kv = Gauge("glm_ray_attention_kv_cache_usage_ratio", "KV-cache use of each attention "
                                  "replica (0..1)", ["replica"], registry=r)
        self._rebalance = RebalanceCollector()
        r.register(self._rebalance)
        self._resumed = CountCollector("glm_ray_requests_resumed", "Streams this ingress replica resumed on another "
                                       "attention replica after theirs was lost or reached its drain limit")
        r.register(self._resumed)

    def observe_tokens(self, arrival: float, last: float | None, now: float, num_tokens: int) -> None:
        """One delta carrying `num_tokens` tokens arrived at `now`; `last` is the previous one's time."""
        if last is None:
            self.ttft.observe(now - arrival)
            num_tokens -= 1
            last = now
        for _ in range(max(0, num_tokens)):
            self.itl.observe((now - last) / max(1, num_tokens))

    def observe_token_times(self, arrival: float, token_times: list[float]) -> None:
        """A whole request's token times, on the same clock as `arrival`."""
        if not token_times:
            return
        self.ttft.observe(token_times[0] - arrival)
        for before, after in zip(token_times, token_times[1:]):
            self.itl.observe(after - before)

    def render(self, stats: dict | None) -> bytes:
        if stats:
            self.running.set(stats.get("running", 0))
            self.waiting.set(stats.get("waiting", 0))
            self.kv_usage.set(stats.get("kv_cache_usage", 0.0))
            for group, n in (stats.get("replicas") or {}).items():
                self.replicas.labels(str(group)).set(n)
            for group, n in (stats.get("routed_tokens") or {}).items():
                self.routed_tokens.labels(str(group)).set(n)
            for group, load in (stats.get("groups") or {}).items():
                self.group_busy.labels(str(group)).set(load["busy_fraction"])
                self.group_tokens.labels(str(group)).set(load["tokens_per_s"])
            balance = stats.get("balancedness") or {}
            self.balancedness.clear()
            for layer, b in (balance.get("layers") or {}).items():
                self.balancedness.labels(str(layer)).set(b)
            self.balancedness_summary.clear()
            for stat in ("min", "mean"):
                if balance.get(stat) is not None:
                    self.balancedness_summary.labels(stat).set(balance[stat])
            self.replica_balancedness.clear()
            for group, b in (balance.get("replicas") or {}).items():
                self.replica_balancedness.labels(str(group)).set(b)
            # replicas come and go: old label sets must not linger as stale series
            self.deployment_replicas.clear()
            for name, d in (stats.get("deployments") or {}).items():
                for state in ("running", "starting", "draining"):
                    self.deployment_replicas.labels(name, state).set(d.get(state, 0))
            self._rebalance.status = stats.get("rebalance")
            self._resumed.value = stats.get("resumed", 0)
            self.attention_sequences.clear()
            self.attention_kv.clear()
            for replica, load in (stats.get("attention") or {}).items():
                self.attention_sequences.labels(replica).set(load["sequences"])
                self.attention_kv.labels(replica).set(load["kv_usage"])
        return generate_latest(self.registry)


class CountCollector:
    """A count something else keeps (a plain int), exposed as a Prometheus counter."""

    def __init__(self, name: str, documentation: str):
        self.name, self.documentation, self.value = name, documentation, 0

    def collect(self):
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


class RebalanceCollector:
    """The router's rebalancing counters as Prometheus counters and gauges (the router owns the counts)."""

    def __init__(self):
        self.status: dict | None = None

    def describe(self):
        return []

    def collect(self):
        r = self.status
        if not r:
            return
        yield CounterMetricFamily("glm_ray_expert_rebalances", "Placement versions published by rebalancing",
                                  value=r.get("rebalances", 0))
        yield CounterMetricFamily("glm_ray_expert_rebalance_failures", "Rebalances abandoned (a replica could not "
                                  "load its slots, or the timeout passed); the old placement stayed in force",
                                  value=r.get("failures", 0))
        yield GaugeMetricFamily("glm_ray_expert_placement_version", "Placement version in force",
                                value=r.get("version", 0))
        last = r.get("last") or {}
        if last.get("seconds") is not None and last.get("changed"):
            yield GaugeMetricFamily("glm_ray_expert_rebalance_seconds", "The last rebalance: from its start until "
                                    "its version was published (or abandoned)", value=last["seconds"])
        if last.get("longest_step_s") is not None and last.get("changed"):
            yield GaugeMetricFamily("glm_ray_expert_rebalance_longest_step_seconds", "The longest decode step "
                                    "(no prompt tokens) of any attention replica during the last rebalance",
                                    value=last["longest_step_s"])
