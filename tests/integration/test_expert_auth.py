"""The dispatch plane's cluster secret and TLS, over real gRPC servers on 127.0.0.1 (no Ray): every
ExpertService call without the secret, or with another, is UNAUTHENTICATED and computes nothing;
RemoteExperts with the right one equals LocalExperts, over TLS too."""

import shutil
import subprocess
import time

import grpc
import pytest
import torch

from glm_ray.config import load_model_config
from glm_ray.experts.auth import SECRET_METADATA_KEY, DispatchAuth, DispatchTLS
from glm_ray.experts.local import LocalExperts
from glm_ray.experts.remote import EventLoopThread, ExpertCallError, ExpertUnavailableError, RemoteExperts
from glm_ray.experts.server import ExpertServer
from glm_ray.experts.wire import tensor_from_proto, tensor_to_proto
from glm_ray.model.loader import load_weights
from glm_ray.router.placement import Placement
from glm_ray.v1 import experts_pb2 as pb
from glm_ray.v1 import experts_pb2_grpc

from .test_remote_experts import random_routing, start_servers, stop_all

SECRET = "s3cret-Of-the-cluster"
WRONG = "not-the-cluster-secret"
SERVER_NAME = "glm-ray-experts"


@pytest.fixture(scope="module")
def loop():
    thread = EventLoopThread("test-expert-auth-servers")
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return load_model_config(tiny_model_dir)


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return LocalExperts(load_weights(tiny_model_dir, dtype="float32", dense=False).experts)


@pytest.fixture(scope="module")
def placement(config):
    return Placement.contiguous(config.n_routed_experts, 1)  # one group: local ids are expert ids


@pytest.fixture
def secured(loop, tiny_model_dir, placement):
    """One server requiring SECRET -> (server, its StaticReplicas)."""
    servers, replicas = start_servers(loop, tiny_model_dir, placement, auth=DispatchAuth(secret=SECRET))
    yield servers[0][0], replicas
    stop_all(loop, servers)


def make_cert(directory, name: str) -> DispatchTLS:
    """A self-signed EC certificate for SERVER_NAME, its key in `directory`."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl CLI is needed to make a test certificate")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", f"/CN={SERVER_NAME}", "-addext", f"subjectAltName=DNS:{SERVER_NAME}",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return DispatchTLS(cert_file=str(cert), key_file=str(key), server_name=SERVER_NAME)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Two unrelated self-signed certificates: the servers', and another CA's."""
    directory = tmp_path_factory.mktemp("certs")
    return make_cert(directory, "experts"), make_cert(directory, "other")


def forward_request(config, layer=1, tokens=5):
    x, ids, w = random_routing(config, tokens, seed=layer)
    req = pb.ForwardRequest(layer=layer, request_id=7)
    tensor_to_proto(x, req.hidden_states)
    tensor_to_proto(ids.to(torch.int16), req.local_ids)
    tensor_to_proto(w, req.topk_weights)
    return req, (layer, x, ids, w)


def every_call(stub, req, metadata):
    """Each ExpertService method once with `metadata`, as (name, thunk)."""
    return [
        ("Forward", lambda: stub.Forward(req, metadata=metadata, timeout=10)),
        ("ForwardStream", lambda: list(stub.ForwardStream(iter([req, req]), metadata=metadata, timeout=10))),
        ("Info", lambda: stub.Info(pb.InfoRequest(), metadata=metadata, timeout=10)),
        ("Ping", lambda: stub.Ping(pb.PingRequest(), metadata=metadata, timeout=10)),
    ]


@pytest.mark.parametrize("metadata, why", [
    ((), "no cluster secret sent"),
    (((SECRET_METADATA_KEY, WRONG),), "wrong cluster secret"),
    (((SECRET_METADATA_KEY, SECRET[:-1]),), "wrong cluster secret"),  # a prefix is not the secret
    (((SECRET_METADATA_KEY, SECRET), (SECRET_METADATA_KEY, SECRET)), "sent 2 times"),
])
def test_calls_without_the_secret_are_unauthenticated_and_compute_nothing(secured, config, metadata, why):
    server, replicas = secured
    req, _ = forward_request(config)
    with grpc.insecure_channel(replicas.snapshot()[0][0]) as channel:
        stub = experts_pb2_grpc.ExpertServiceStub(channel)
        for name, call in every_call(stub, req, metadata):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            details = err.value.details()
            assert why in details, (name, details)
            assert SECRET not in details and WRONG not in details and SECRET[:-1] not in details
    assert (server.in_flight, server.num_calls) == (0, 0)


def test_calls_with_the_secret_are_served(secured, config, local):
    server, replicas = secured
    req, (layer, x, ids, w) = forward_request(config)
    want = local.forward(layer, x, ids, w)
    metadata = DispatchAuth(secret=SECRET).metadata()
    with grpc.insecure_channel(replicas.snapshot()[0][0]) as channel:
        stub = experts_pb2_grpc.ExpertServiceStub(channel)
        calls = dict(every_call(stub, req, metadata))
        torch.testing.assert_close(tensor_from_proto(calls["Forward"]().partial), want, rtol=1e-5, atol=1e-5)
        replies = calls["ForwardStream"]()
        assert len(replies) == 2 and not any(r.error_code for r in replies)
        for reply in replies:
            torch.testing.assert_close(tensor_from_proto(reply.partial), want, rtol=1e-5, atol=1e-5)
        assert calls["Info"]().group == 0
        ping = calls["Ping"]()
    assert (ping.in_flight, ping.num_calls) == (0, 3) and server.num_calls == 3


def test_remote_experts_with_the_secret_equal_local(secured, config, local):
    _, replicas = secured
    with RemoteExperts(Placement.contiguous(config.n_routed_experts, 1), replicas,
                       auth=DispatchAuth(secret=SECRET)) as remote:
        for layer in config.moe_layers:
            x, ids, w = random_routing(config, 20, seed=layer)
            torch.testing.assert_close(remote.forward(layer, x, ids, w), local.forward(layer, x, ids, w),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("auth", [None, DispatchAuth(secret=WRONG)], ids=["no-secret", "wrong-secret"])
def test_remote_experts_with_another_secret_fail_at_once(secured, config, auth):
    server, replicas = secured
    x, ids, w = random_routing(config, 8)
    with RemoteExperts(Placement.contiguous(config.n_routed_experts, 1), replicas, auth=auth,
                       unavailable_wait_s=2) as remote:
        start = time.monotonic()
        # the replica's UNAUTHENTICATED names the cause and fails at once; a first write racing the
        # refusal can leave grpc's core reporting INTERNAL instead (seen on a loaded machine): then
        # the call is retried until unavailable_wait_s. Either way nothing is computed.
        with pytest.raises((ExpertCallError, ExpertUnavailableError)) as err:
            remote.forward(1, x, ids, w)
        if isinstance(err.value, ExpertCallError):
            assert "UNAUTHENTICATED" in str(err.value) and "cluster secrets differ" in str(err.value)
            assert time.monotonic() - start < 3 and remote.stats.retries == 0  # not retried elsewhere
        assert not err.value.retryable or isinstance(err.value, ExpertUnavailableError)
        assert SECRET not in str(err.value) and WRONG not in str(err.value)
    assert server.num_calls == 0


def test_tls_with_the_secret_equals_plaintext_and_local(loop, tiny_model_dir, config, placement, local, certs):
    mine, _ = certs
    tls_auth = DispatchAuth(secret=SECRET, tls=mine)
    plain_servers, plain = start_servers(loop, tiny_model_dir, placement, auth=DispatchAuth(secret=SECRET))
    tls_servers, secure = start_servers(loop, tiny_model_dir, placement, auth=tls_auth)
    try:
        with RemoteExperts(placement, plain, auth=DispatchAuth(secret=SECRET)) as without, \
                RemoteExperts(placement, secure, auth=tls_auth) as over_tls:
            for layer in config.moe_layers:
                x, ids, w = random_routing(config, 20, seed=layer)
                got = over_tls.forward(layer, x, ids, w)
                assert torch.equal(got, without.forward(layer, x, ids, w))
                torch.testing.assert_close(got, local.forward(layer, x, ids, w), rtol=1e-5, atol=1e-5)
        assert tls_servers[0][0].num_calls == len(config.moe_layers)
    finally:
        stop_all(loop, plain_servers)
        stop_all(loop, tls_servers)


def test_tls_refuses_plaintext_and_other_cas_and_still_wants_the_secret(loop, tiny_model_dir, config, placement,
                                                                        certs):
    mine, other = certs
    servers, secure = start_servers(loop, tiny_model_dir, placement, auth=DispatchAuth(secret=SECRET, tls=mine))
    other_ca = DispatchTLS(cert_file=mine.cert_file, key_file=mine.key_file, ca_file=other.cert_file,
                           server_name=SERVER_NAME)
    x, ids, w = random_routing(config, 8)
    try:
        for auth in (DispatchAuth(secret=SECRET), DispatchAuth(secret=SECRET, tls=other_ca)):
            with RemoteExperts(placement, secure, auth=auth, unavailable_wait_s=0.3) as remote:
                with pytest.raises(ExpertUnavailableError):
                    remote.forward(1, x, ids, w)
        with RemoteExperts(placement, secure, auth=DispatchAuth(tls=mine), unavailable_wait_s=2) as remote:
            # UNAUTHENTICATED names the cause; a write racing the refusal can leave grpc's core
            # reporting INTERNAL instead (as in the test above), retried until unavailable_wait_s
            with pytest.raises((ExpertCallError, ExpertUnavailableError)) as err:
                remote.forward(1, x, ids, w)
            if isinstance(err.value, ExpertCallError):
                assert "cluster secrets differ" in str(err.value)
            else:
                assert "INTERNAL" in str(err.value)
        with grpc.insecure_channel(secure.snapshot()[0][0]) as channel:  # a plaintext stub, the secret in hand
            with pytest.raises(grpc.RpcError) as err:
                experts_pb2_grpc.ExpertServiceStub(channel).Ping(
                    pb.PingRequest(), metadata=DispatchAuth(secret=SECRET).metadata(), timeout=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert servers[0][0].num_calls == 0
    finally:
        stop_all(loop, servers)


def test_unreadable_tls_files_are_named(tmp_path, tiny_model_dir, placement, certs):
    mine, _ = certs
    missing = str(tmp_path / "absent.pem")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    weights = load_weights(tiny_model_dir, dtype="float32", dense=False, expert_ids=placement.experts_of(0))
    with pytest.raises(ValueError, match=f"private key {missing}: cannot read"):
        ExpertServer(weights.experts, 0, auth=DispatchAuth(tls=DispatchTLS(cert_file=mine.cert_file,
                                                                           key_file=missing)))
    with pytest.raises(ValueError, match=f"certificate {not_pem}: not a PEM file"):
        ExpertServer(weights.experts, 0, auth=DispatchAuth(tls=DispatchTLS(cert_file=str(not_pem),
                                                                           key_file=mine.key_file)))
    with pytest.raises(ValueError, match=f"CA certificate {missing}: cannot read"):
        RemoteExperts(placement, None, auth=DispatchAuth(tls=DispatchTLS(mine.cert_file, mine.key_file,
                                                                         ca_file=missing)))


def test_the_secret_is_never_shown_and_the_dict_round_trips(certs):
    mine, _ = certs
    for auth in (DispatchAuth(secret=SECRET), DispatchAuth(secret=SECRET, tls=mine)):
        assert SECRET not in repr(auth) and SECRET not in str(auth) and SECRET not in f"{auth}"
        assert SECRET not in repr([auth]) and "secret=<set>" in repr(auth)
        assert DispatchAuth.from_dict(auth.to_dict()) == auth and auth.to_dict()["secret"] == SECRET
    assert DispatchAuth.from_dict({"secret": None, "tls": None}) == DispatchAuth()
    assert "secret=None" in repr(DispatchAuth())
    with pytest.raises(ValueError, match="unknown keys") as err:
        DispatchAuth.from_dict({"secret": SECRET, "cluster_secret": SECRET})
    assert SECRET not in str(err.value)
    with pytest.raises(ValueError, match="missing .'key_file'."):
        DispatchAuth.from_dict({"secret": None, "tls": {"cert_file": mine.cert_file}})
    for bad in ("", " padded ", "naïve-secret", "line\nbreak"):
        with pytest.raises(ValueError, match="cluster secret: must be non-empty printable ASCII") as err:
            DispatchAuth(secret=bad)
        assert not bad.strip() or bad.strip() not in str(err.value)
