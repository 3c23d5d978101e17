"""RemoteExperts over real gRPC servers on 127.0.0.1 (no Ray): equal to LocalExperts, failover,
bounded unavailability, request validation."""

import re
import threading
import time

import grpc
import pytest
import torch

from glm_ray.config import load_model_config
from glm_ray.experts import swiglu_kernel
from glm_ray.experts.backend import ExpertBackend
from glm_ray.experts.local import LocalExperts
from glm_ray.experts.remote import (
    EventLoopThread, ExpertCallError, ExpertUnavailableError, RemoteExperts, StaticReplicas,
)
from glm_ray.experts.server import ExpertServer
from glm_ray.experts.wire import tensor_to_proto
from glm_ray.model.loader import load_model, load_weights
from glm_ray.model.reference import greedy_generate, prompt_logits
from glm_ray.model.synthetic import make_model
from glm_ray.router.placement import Placement
from glm_ray.v1 import experts_pb2 as pb
from glm_ray.v1 import experts_pb2_grpc

PROMPTS = [[1, 5, 9, 200, 17], [3, 3, 3], [900, 14, 77, 2, 41, 8, 600]]


@pytest.fixture(scope="module")
def loop():
    thread = EventLoopThread("test-expert-servers")
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return load_model_config(tiny_model_dir)


def start_servers(loop, model_dir, placement, dtype="float32", copies=1, placement_version=0, own_loops=False,
                  auth=None, expert_backend=None):
    """copies servers per group, each loading only its group's experts -> (servers[g], StaticReplicas).
    All on `loop`, or with own_loops each on a loop of its own (`test_loop`), as deployed: a server
    computes stream requests on its loop, so one that stalls there stalls only itself. auth: each
    server's DispatchAuth."""
    servers = {}
    for g in range(placement.num_groups):
        weights = load_weights(model_dir, dtype=dtype, dense=False, expert_ids=placement.experts_of(g),
                               expert_backend=expert_backend)
        servers[g] = [ExpertServer(weights.experts, g, placement_version=placement_version, auth=auth)
                      for _ in range(copies)]
    for group in servers.values():
        for s in group:
            s.test_loop = EventLoopThread(f"test-expert-server-{s.group}") if own_loops else loop
    replicas = StaticReplicas({g: [s.test_loop.run(s.start()) for s in group] for g, group in servers.items()})
    return servers, replicas


def stop_all(loop, servers):
    for group in servers.values():
        for s in group:
            s.test_loop.run(s.stop(None))
            if s.test_loop is not loop:
                s.test_loop.stop()


def random_routing(config, tokens, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    e, k = config.n_routed_experts, config.num_experts_per_tok
    hidden_states = torch.randn(tokens, config.hidden_size, generator=g).to(dtype)
    topk_ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    return hidden_states, topk_ids, torch.rand(tokens, k, generator=g)


@pytest.mark.parametrize("num_groups", [1, 2, 3])
def test_random_routing_equals_local(loop, tiny_model_dir, config, num_groups):
    local = LocalExperts(load_weights(tiny_model_dir, dtype="float32", dense=False).experts)
    placement = Placement.contiguous(config.n_routed_experts, num_groups)
    servers, replicas = start_servers(loop, tiny_model_dir, placement)
    try:
        with RemoteExperts(placement, replicas) as remote:
            for layer in config.moe_layers:
                x, ids, w = random_routing(config, 50, seed=layer)
                torch.testing.assert_close(remote.forward(layer, x, ids, w), local.forward(layer, x, ids, w),
                                           rtol=1e-5, atol=1e-5)
            assert remote.stats.take()["calls"] == len(config.moe_layers) * num_groups
    finally:
        stop_all(loop, servers)


def test_groups_with_all_or_some_tokens_equal_local(loop, tiny_model_dir, config):
    """Group 0 gets every token (its reply is added whole), group 1 only the odd ones (its reply is
    added at their rows): both paths of the scatter-add, in one call."""
    local = LocalExperts(load_weights(tiny_model_dir, dtype="float32", dense=False).experts)
    placement = Placement.contiguous(config.n_routed_experts, 2)
    servers, replicas = start_servers(loop, tiny_model_dir, placement)
    first, second = placement.experts_of(0), placement.experts_of(1)
    x, _, w = random_routing(config, 9, seed=5)
    k = config.num_experts_per_tok
    ids = torch.tensor([[first[(t + j) % len(first)] for j in range(k - 1)]
                        + [second[t % len(second)] if t % 2 else first[(t + k - 1) % len(first)]]
                        for t in range(9)])
    assert len(set(map(tuple, ids.sort(dim=1).values.tolist()))) > 1 and all(len(set(r)) == k for r in ids.tolist())
    try:
        with RemoteExperts(placement, replicas) as remote:
            layer = config.moe_layers[0]
            torch.testing.assert_close(remote.forward(layer, x, ids, w), local.forward(layer, x, ids, w),
                                       rtol=1e-5, atol=1e-5)
            assert remote.stats.take()["calls"] == 2
    finally:
        stop_all(loop, servers)


@pytest.mark.parametrize("num_groups", [1, 2, 3])
def test_whole_model_equals_local(loop, tiny_model_dir, config, num_groups):
    model, local, _ = load_model(tiny_model_dir, dtype="float32")
    placement = Placement.contiguous(config.n_routed_experts, num_groups)
    servers, replicas = start_servers(loop, tiny_model_dir, placement)
    try:
        with RemoteExperts(placement, replicas) as remote:
            for got, want in zip(prompt_logits(model, remote, PROMPTS), prompt_logits(model, local, PROMPTS)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert greedy_generate(model, remote, PROMPTS, 8) == greedy_generate(model, local, PROMPTS, 8)
    finally:
        stop_all(loop, servers)


def test_bfloat16_single_group_is_bit_exact(loop, tiny_model_dir, config):
    model, local, _ = load_model(tiny_model_dir, dtype="bfloat16")
    placement = Placement.contiguous(config.n_routed_experts, 1)
    servers, replicas = start_servers(loop, tiny_model_dir, placement, dtype="bfloat16")
    try:
        with RemoteExperts(placement, replicas) as remote:
            for got, want in zip(prompt_logits(model, remote, PROMPTS), prompt_logits(model, local, PROMPTS)):
                assert torch.equal(got, want)
    finally:
        stop_all(loop, servers)


@pytest.mark.skipif(swiglu_kernel.unavailable_reason() is not None, reason="the routed-expert C kernel is unavailable")
def test_a_group_holding_a_bf16_checkpoints_experts_in_bf16_computes_in_fp32_bit_exact(loop, tmp_path):
    """An expert group computing a bf16 checkpoint in fp32 on CPU keeps its experts in bf16, takes
    fp32 hidden states, and gives the bits of the in-process engine's experts (held the same way)."""
    d = make_model(tmp_path / "bf16", "tiny", dtype="bfloat16", seed=4)
    model, local, config = load_model(d, dtype="float32")
    placement = Placement.contiguous(config.n_routed_experts, 1)  # one group: the same sums as in-process
    servers, replicas = start_servers(loop, d, placement, expert_backend="cpu-kernel")
    try:
        held = next(iter(servers[0][0].layers.values()))
        assert held.w13.dtype == torch.bfloat16 and servers[0][0].dtype == torch.float32
        # a long prompt too: its prefill gives experts more rows than the C kernel takes (torch's matmuls)
        prompts = [*PROMPTS, torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(1)).tolist()]
        want = prompt_logits(model, local, prompts)
        with RemoteExperts(placement, replicas) as remote:
            for got, w in zip(prompt_logits(model, remote, prompts), want):
                assert torch.equal(got, w)
            # a new placement version's slots (a rebalance) are held and computed the same way
            from glm_ray.experts.slots import assemble

            server = servers[0][0]
            server.add_version(1, assemble(server.layers, placement.experts_of(0), lambda ids: {}))
            rebuilt = next(iter(server.versions[1].values()))
            assert rebuilt.w13.dtype == torch.bfloat16 and rebuilt.compute_dtype == torch.float32
            remote.set_placement(Placement(placement.groups, version=1))
            for got, w in zip(prompt_logits(model, remote, prompts), want):
                assert torch.equal(got, w)
    finally:
        stop_all(loop, servers)


def test_each_server_holds_only_its_group(loop, tiny_model_dir, config):
    placement = Placement.contiguous(config.n_routed_experts, 3)  # 3, 3, 2 experts
    servers, replicas = start_servers(loop, tiny_model_dir, placement)
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size  # gate, up, down
    try:
        for g in range(3):
            with grpc.insecure_channel(replicas.snapshot()[g][0]) as channel:
                stub = experts_pb2_grpc.ExpertServiceStub(channel)
                info = stub.Info(pb.InfoRequest(), timeout=10)
                ping = stub.Ping(pb.PingRequest(), timeout=10)
            assert (ping.in_flight, ping.num_calls) == (0, 0)
            assert info.group == g and list(info.expert_ids) == placement.experts_of(g)
            assert list(info.layers) == config.moe_layers and info.dtype == "float32"
            assert info.num_parameters == len(placement.experts_of(g)) * per_expert * len(config.moe_layers)
    finally:
        stop_all(loop, servers)


def test_prefill_batch_over_4_mib(loop, tiny_model_dir, config):
    local = LocalExperts(load_weights(tiny_model_dir, dtype="float32", dense=False).experts)
    placement = Placement.contiguous(config.n_routed_experts, 2)
    servers, replicas = start_servers(loop, tiny_model_dir, placement)
    try:
        with RemoteExperts(placement, replicas) as remote:
            x, ids, w = random_routing(config, 20_000, seed=5)  # 5 MiB of fp32 hidden states
            torch.testing.assert_close(remote.forward(1, x, ids, w), local.forward(1, x, ids, w),
                                       rtol=1e-5, atol=1e-5)
            assert remote.stats.bytes_sent > 2 * (4 << 20)  # each group's request alone is over 4 MiB
    finally:
        stop_all(loop, servers)


def test_groups_no_token_chose_are_not_called(loop, tiny_model_dir, config):
    placement = Placement.contiguous(config.n_routed_experts, 3)  # experts 0-2 | 3-5 | 6-7
    servers, replicas = start_servers(loop, tiny_model_dir, placement)
    try:
        with RemoteExperts(placement, replicas) as remote:
            x, _, w = random_routing(config, 6)
            remote.forward(1, x, torch.tensor([[0, 1, 2, 1]] * 6), w)
            assert remote.stats.take()["calls"] == 1
            assert [servers[g][0].num_calls for g in range(3)] == [1, 0, 0]
            remote.forward(1, x, torch.tensor([[0, 7, 6, 1]] * 6), w)
            assert remote.stats.take()["calls"] == 2
            assert [servers[g][0].num_calls for g in range(3)] == [2, 0, 1]
    finally:
        stop_all(loop, servers)


class StopAfter(ExpertBackend):
    """Stops `server` after `n` submits: a replica dying mid-run."""

    def __init__(self, inner, loop, server, n):
        self.inner, self.loop, self.server, self.n = inner, loop, server, n

    def forward(self, *args):
        return self.submit(*args).result()

    def submit(self, *args):
        self.n -= 1
        if self.n == 0:
            self.loop.run(self.server.stop(None))
        return self.inner.submit(*args)


def test_a_stopped_replica_fails_over_with_identical_results(loop, tiny_model_dir, config):
    model, local, _ = load_model(tiny_model_dir, dtype="float32")
    placement = Placement.contiguous(config.n_routed_experts, 2)
    servers, replicas = start_servers(loop, tiny_model_dir, placement, copies=2)
    try:
        with RemoteExperts(placement, replicas) as remote:
            want = greedy_generate(model, local, PROMPTS, 6)
            assert greedy_generate(model, StopAfter(remote, loop, servers[0][0], n=5), PROMPTS, 6) == want
            stats = remote.stats.take()
            assert stats["retries"] >= 1
            assert servers[0][1].num_calls > servers[0][0].num_calls  # the survivor took over
    finally:
        stop_all(loop, servers)


def test_a_replica_that_stops_answering_is_left_after_the_call_timeout(loop, tiny_model_dir, config):
    """A replica that holds a request past call_timeout_s: the request goes to the other replica
    (same result), and its stream is dropped, so no later reply is matched to the wrong request."""
    local = LocalExperts(load_weights(tiny_model_dir, dtype="float32", dense=False).experts)
    placement = Placement.contiguous(config.n_routed_experts, 1)
    servers, replicas = start_servers(loop, tiny_model_dir, placement, copies=2, own_loops=True)
    stalled, release = servers[0][0], threading.Event()
    compute = stalled.forward_bytes
    stalled.forward_bytes = lambda request: (release.wait(10), compute(request))[1]
    x, ids, w = random_routing(config, 8)
    try:
        with RemoteExperts(placement, replicas, call_timeout_s=0.5) as remote:
            for layer in (1, 2, 3):  # the replicas take turns: one of these goes to the stalled one first
                torch.testing.assert_close(remote.forward(layer, x, ids, w), local.forward(layer, x, ids, w))
            release.set()
            torch.testing.assert_close(remote.forward(1, x, ids, w), local.forward(1, x, ids, w))
            stats = remote.stats.take()
            assert stats["retries"] >= 1 and stats["calls"] == 4 + stats["retries"]
    finally:
        release.set()
        stop_all(loop, servers)


def test_no_replica_left_raises_within_the_bounded_wait(loop, tiny_model_dir, config):
    placement = Placement.contiguous(config.n_routed_experts, 2)
    servers, replicas = start_servers(loop, tiny_model_dir, placement)
    x, ids, w = random_routing(config, 8)
    try:
        with RemoteExperts(placement, replicas, unavailable_wait_s=0.5) as remote:
            remote.forward(2, x, ids, w)
            loop.run(servers[1][0].stop(None))
            start = time.monotonic()
            with pytest.raises(ExpertUnavailableError, match="expert group 1 .MoE layer 2.") as err:
                remote.forward(2, x, ids, w)
            assert err.value.retryable and 0.4 < time.monotonic() - start < 5
            replicas.set(1, [])  # none registered at all: the same bounded wait
            with pytest.raises(ExpertUnavailableError, match="expert group 1"):
                remote.forward(3, x, ids, w)
    finally:
        stop_all(loop, servers)


def test_a_replica_appearing_during_the_wait_is_used(loop, tiny_model_dir, config):
    local = LocalExperts(load_weights(tiny_model_dir, dtype="float32", dense=False).experts)
    placement = Placement.contiguous(config.n_routed_experts, 1)
    servers, registry = start_servers(loop, tiny_model_dir, placement)

    class Registry(StaticReplicas):  # the registry learns the address only when asked to refresh
        def refresh(self):
            self.set(0, registry.snapshot()[0])

    x, ids, w = random_routing(config, 8)
    try:
        with RemoteExperts(placement, Registry({0: []}), unavailable_wait_s=10) as remote:
            torch.testing.assert_close(remote.forward(1, x, ids, w), local.forward(1, x, ids, w))
    finally:
        stop_all(loop, servers)


def test_bad_requests_get_invalid_argument(loop, tiny_model_dir, config):
    placement = Placement.contiguous(config.n_routed_experts, 1)
    servers, replicas = start_servers(loop, tiny_model_dir, placement, placement_version=4)
    x, ids, w = random_routing(config, 3)

    def request(layer=1, hidden_states=x, local_ids=ids.to(torch.int16), version=4):
        req = pb.ForwardRequest(layer=layer, placement_version=version)
        tensor_to_proto(hidden_states, req.hidden_states)
        tensor_to_proto(local_ids, req.local_ids)
        tensor_to_proto(w, req.topk_weights)
        return req

    cases = [
        (request(layer=99), grpc.StatusCode.INVALID_ARGUMENT, "layer 99 is not served here"),
        (request(hidden_states=x[:, :10]), grpc.StatusCode.INVALID_ARGUMENT, r"hidden_states has shape \[3, 10\]"),
        (request(hidden_states=x.bfloat16()), grpc.StatusCode.INVALID_ARGUMENT, "hidden_states is bfloat16"),
        (request(local_ids=ids + 8), grpc.StatusCode.INVALID_ARGUMENT, "local_ids range"),
        (request(version=5), grpc.StatusCode.FAILED_PRECONDITION, "placement version 4"),
    ]
    try:
        with grpc.insecure_channel(replicas.snapshot()[0][0]) as channel:
            stub = experts_pb2_grpc.ExpertServiceStub(channel)
            for req, code, message in cases:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Forward(req, timeout=10)
                assert err.value.code() == code
                assert re.search(message, err.value.details()), err.value.details()
            assert stub.Forward(request(), timeout=10).partial.shape == [3, config.hidden_size]
            # on a ForwardStream each bad request gets a reply carrying the status; the stream goes on
            replies = list(stub.ForwardStream(iter([req for req, _, _ in cases] + [request()]), timeout=10))
            assert len(replies) == len(cases) + 1
            for reply, (_, code, message) in zip(replies, cases):
                assert reply.error_code == code.value[0] and not reply.HasField("partial")
                assert re.search(message, reply.error), reply.error
            assert replies[-1].error_code == 0 and replies[-1].partial.shape == [3, config.hidden_size]
        with RemoteExperts(Placement(placement.groups, version=4), replicas) as remote:
            with pytest.raises(ExpertCallError, match="INVALID_ARGUMENT: .*layer 99"):
                remote.forward(99, x, ids, w)
            assert remote.stats.retries == 0  # the request was at fault, not the replica
    finally:
        stop_all(loop, servers)


def test_a_message_over_the_limit_is_refused_before_sending(tiny_model_dir, config, monkeypatch):
    import glm_ray.experts.remote as remote_module

    monkeypatch.setattr(remote_module, "MAX_MESSAGE_BYTES", 4096)
    placement = Placement.contiguous(config.n_routed_experts, 1)
    with RemoteExperts(placement, StaticReplicas({0: []}), unavailable_wait_s=0) as remote:
        x, ids, w = random_routing(config, 64)  # 16 KiB of hidden states
        with pytest.raises(ValueError, match="64 tokens for expert group 0 .* over the 0 MiB gRPC limit; run prefill"):
            remote.submit(1, x, ids, w)
        assert remote.stats.calls == 0


def test_copied_experts_and_a_version_switch_equal_local(loop, tiny_model_dir, config):
    """Version 0 without copies; version 1 copies experts 0 and 1 into both groups (the group's new
    slots assembled from what it holds plus what it reads). Servers hold both while the caller
    switches at a step's start; each call goes by one version, and both equal LocalExperts."""
    from glm_ray.experts.slots import assemble

    e = config.n_routed_experts
    local = LocalExperts(load_weights(tiny_model_dir, dtype="float32", dense=False).experts)
    old = Placement.contiguous(e, 2)
    new = Placement([sorted({0, 1, *old.experts_of(0)}), sorted({0, 1, *old.experts_of(1)})], version=1)
    assert new.redundant and new.copies[:2].tolist() == [2, 2]
    servers, replicas = start_servers(loop, tiny_model_dir, old)
    read = []

    def load_missing(ids):
        read.append(ids)
        return load_weights(tiny_model_dir, dtype="float32", dense=False, expert_ids=ids).experts

    try:
        for g, (server,) in servers.items():
            server.add_version(1, assemble(server.layers, new.experts_of(g), load_missing))
            assert sorted(server.versions) == [0, 1] and server.expert_ids == new.experts_of(g)
        assert read == [[0, 1]]  # group 1 read the two experts it gained; group 0 had them
        g = torch.Generator().manual_seed(3)
        x = torch.randn(40, config.hidden_size, generator=g)
        ids = torch.stack([torch.randperm(e, generator=g)[:config.num_experts_per_tok] for _ in range(40)])
        ids[:, 0] = torch.where(torch.arange(40) % 2 == 0, 0, 1)  # every token picks a copied expert
        w = torch.rand(40, config.num_experts_per_tok, generator=g)
        layer = config.moe_layers[0]
        want = local.forward(layer, x, ids, w)
        with RemoteExperts(old, replicas) as remote:
            torch.testing.assert_close(remote.forward(layer, x, ids, w), want, rtol=1e-5, atol=1e-5)
            remote.set_placement(new)
            assert remote.placement.version == 0  # not before the next step
            remote.begin_step()
            assert remote.placement.version == 1
            torch.testing.assert_close(remote.forward(layer, x, ids, w), want, rtol=1e-5, atol=1e-5)
            pairs = remote.take_group_pairs()
            # version 0 sent experts 0 and 1 to group 0 only; version 1 shared them with group 1
            assert set(pairs) == {0, 1} and sum(pairs[1][layer]) == sum(pairs[0][layer]) == ids.numel()
            assert max(pairs[1][layer]) < max(pairs[0][layer])
            for server, in servers.values():
                assert server.retire({1}) == [0] and list(server.versions) == [1]
            torch.testing.assert_close(remote.forward(layer, x, ids, w), want, rtol=1e-5, atol=1e-5)
            remote.set_placement(old, now=True)  # a caller still on a retired version is told so
            with pytest.raises(ExpertCallError, match="FAILED_PRECONDITION: .*serves placement version 1, .*"
                                                      "split with version 0"):
                remote.forward(layer, x, ids, w)
    finally:
        stop_all(loop, servers)


def test_retire_keeps_what_the_router_lists_and_never_nothing(tiny_model_dir):
    weights = load_weights(tiny_model_dir, dtype="float32", dense=False, expert_ids=[0, 1]).experts
    server = ExpertServer(weights, 0, placement_version=0)
    server.add_version(1, weights)
    server.add_version(2, weights)  # say version 2 was abandoned by the router after this replica built it
    assert server.retire({1}) == [0, 2] and list(server.versions) == [1] and server.placement_version == 1
    assert server.retire({7}) == [] and list(server.versions) == [1]  # a list naming nothing held keeps what is here


def test_a_server_refuses_layers_that_compute_in_different_dtypes(tiny_model_dir):
    """One layer's bf16 experts computing in fp32 beside another's computing in bf16: refused, and
    the message names both compute dtypes (the held dtype and shape being the same)."""
    from glm_ray.experts.local import ExpertWeights

    held = load_weights(tiny_model_dir, dtype="bfloat16", dense=False, expert_ids=[0, 1]).experts
    first, second = list(held)[:2]
    mixed = {first: held[first], second: ExpertWeights(held[second].expert_ids, held[second].w13, held[second].w2,
                                                       len(held[second].slot), compute_dtype=torch.float32)}
    with pytest.raises(ValueError, match=r"computed in torch.float32, .* computed in torch.bfloat16; all must match"):
        ExpertServer(mixed, 0)


def test_channels_to_replicas_that_left_the_table_are_closed(loop, tiny_model_dir, config, monkeypatch):
    import glm_ray.experts.remote as remote_module

    monkeypatch.setattr(remote_module, "FORGET_INTERVAL_S", 0.0)
    placement = Placement.contiguous(config.n_routed_experts, 1)
    servers, replicas = start_servers(loop, tiny_model_dir, placement, copies=2)
    first, second = replicas.snapshot()[0]
    try:
        with RemoteExperts(placement, replicas) as remote:
            x, ids, w = random_routing(config, 8)
            layer = config.moe_layers[0]
            for _ in range(4):  # ties rotate: both replicas get calls, so both get a channel
                remote.forward(layer, x, ids, w)
            assert set(remote._channels) == {first, second}
            replicas.set(0, [second])  # the first left the table (scaled down, or dead)
            remote.forward(layer, x, ids, w)
            assert set(remote._channels) == set(remote._streams) == {second}
            assert first not in remote._outstanding and first not in remote._suspect_until
    finally:
        stop_all(loop, servers)
