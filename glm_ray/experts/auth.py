"""Who may call an expert replica: the cluster secret, checked on every ExpertService call, and
optional TLS on the dispatch plane (attention replicas -> expert-group replicas).

The secret travels as the `x-glm-ray-cluster-secret` metadata of each call (a ForwardStream is one
call, so a MoE layer pays nothing for it). A server holding a secret rejects a call that lacks it,
or carries another, with UNAUTHENTICATED before any handler runs; the comparison takes the same
time whatever the bytes sent. Without TLS the secret crosses the network in plaintext: keep the
plane on a private network, or configure a cert/key pair. Nothing here logs or shows the secret.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

import grpc

SECRET_METADATA_KEY = "x-glm-ray-cluster-secret"
_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class DispatchTLS:
    """PEM files, at the same paths on every node. Clients verify servers against `ca_file`
    (default: `cert_file` itself, a self-signed certificate) under `server_name` (default: the
    address dialled)."""

    cert_file: str
    key_file: str
    ca_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class DispatchAuth:
    """The dispatch plane's credentials: a shared secret (None: calls are not checked) and TLS
    (None: plaintext). Built from the plain dict Serve hands replicas (`from_dict`)."""

    secret: str | None = field(default=None, repr=False)
    tls: DispatchTLS | None = None

    def __post_init__(self):
        if self.secret is not None:
            # gRPC metadata values (non "-bin" keys) are printable ASCII without surrounding blanks
            if not self.secret or not self.secret.isascii() or not self.secret.isprintable() \
                    or self.secret != self.secret.strip():
                raise ValueError(f"cluster secret: must be non-empty printable ASCII without leading or trailing "
                                 f"whitespace (got {len(self.secret)} characters, not shown); use None for none")

    def __repr__(self) -> str:
        return f"DispatchAuth(secret={'<set>' if self.secret is not None else None}, tls={self.tls!r})"

    __str__ = __repr__

    @classmethod
    def from_dict(cls, d: dict) -> DispatchAuth:
        """{"secret": str | None, "tls": {"cert_file", "key_file", "ca_file"?, "server_name"?} | None}."""
        unknown = set(d) - {"secret", "tls"}
        if unknown:
            raise ValueError(f"dispatch auth: unknown keys {sorted(unknown)}; expected 'secret' and 'tls'")
        tls = d.get("tls")
        if tls is not None:
            unknown = set(tls) - {"cert_file", "key_file", "ca_file", "server_name"}
            missing = {"cert_file", "key_file"} - {k for k, v in tls.items() if v}
            if unknown or missing:
                raise ValueError(f"dispatch auth tls: unknown keys {sorted(unknown)}, missing {sorted(missing)}; "
                                 "expected cert_file, key_file and optionally ca_file, server_name")
            tls = DispatchTLS(**tls)
        return cls(secret=d.get("secret"), tls=tls)

    def to_dict(self) -> dict:
        """The plain dict `from_dict` reads; it holds the secret in full."""
        tls = None if self.tls is None else {"cert_file": self.tls.cert_file, "key_file": self.tls.key_file,
                                             "ca_file": self.tls.ca_file, "server_name": self.tls.server_name}
        return {"secret": self.secret, "tls": tls}

    # -- client side -----------------------------------------------------------------------------

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries."""
        return () if self.secret is None else ((SECRET_METADATA_KEY, self.secret),)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials verifying the servers (reads the CA file now), or None for plaintext."""
        if self.tls is None:
            return None
        ca_file = self.tls.ca_file or self.tls.cert_file
        return grpc.ssl_channel_credentials(root_certificates=_read_pem(ca_file, "CA certificate"))

    def open_channel(self, address: str, credentials: grpc.ChannelCredentials | None = None,
                     options: list[tuple[str, object]] | tuple = ()) -> grpc.aio.Channel:
        """A channel to `address`: TLS with `credentials` (from channel_credentials(); read now if
        None) when configured, plaintext otherwise."""
        if self.tls is None:
            return grpc.aio.insecure_channel(address, options=list(options))
        credentials = credentials or self.channel_credentials()
        if self.tls.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.tls.server_name)]
        return grpc.aio.secure_channel(address, credentials, options=list(options))

    # -- server side -----------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for add_secure_port (reads the key and certificate now), or None."""
        if self.tls is None:
            return None
        key = _read_pem(self.tls.key_file, "private key")
        cert = _read_pem(self.tls.cert_file, "certificate")
        return grpc.ssl_server_credentials([(key, cert)])

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.secret is None else [SecretCheck(self.secret)]


def _read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"dispatch TLS {what} {path}: cannot read it ({e.strerror}); every node needs "
                         "the file at this path") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"dispatch TLS {what} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def _digest(value: str) -> bytes:
    # compare digests, not the strings: compare_digest's time then reveals not even the length
    return hashlib.sha256(value.encode()).digest()


class SecretCheck(grpc.aio.ServerInterceptor):
    """Rejects every call whose metadata lacks the secret or carries another with UNAUTHENTICATED;
    the service's handler never runs for it (no request is read, no counter moves)."""

    def __init__(self, secret: str):
        self._digest = _digest(secret)

    async def intercept_service(self, continuation, handler_call_details):
        sent = [v for k, v in handler_call_details.invocation_metadata or () if k == SECRET_METADATA_KEY]
        if len(sent) == 1 and isinstance(sent[0], str) and hmac.compare_digest(_digest(sent[0]), self._digest):
            return await continuation(handler_call_details)
        if not sent:
            message = f"no cluster secret sent (metadata {SECRET_METADATA_KEY!r}); this expert replica requires one"
        elif len(sent) > 1:
            message = f"the cluster secret was sent {len(sent)} times (metadata {SECRET_METADATA_KEY!r}); send it once"
        else:
            message = f"wrong cluster secret (metadata {SECRET_METADATA_KEY!r})"
        return _rejection(message)


def _rejection(message: str) -> grpc.RpcMethodHandler:
    # stream-stream whatever the method: the server then reads no request (a Forward may carry
    # hundreds of MiB) before the status goes out; on the wire every call type ends the same way
    async def reject(request_iterator, context: grpc.aio.ServicerContext):
        await context.abort(_UNAUTHENTICATED, message)
    return grpc.stream_stream_rpc_method_handler(reject)
