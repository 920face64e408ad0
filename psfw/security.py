"""TLS, mutual TLS and a bearer token for every channel.

    security = Security.from_files(cert="server.pem", key="server.key", ca="clients-ca.pem", token_file="token")

On a server, ``cert``/``key`` turn on TLS, ``ca`` requires client certificates signed
by it (mutual TLS), and ``token`` is checked on every RPC except the health service.
On a client, ``ca`` verifies the server, ``cert``/``key`` are its own certificate for
mutual TLS, and ``token`` is sent as ``authorization: Bearer ...`` on every RPC.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from psfw.errors import ConfigError

HEALTH_PREFIX = "/grpc.health.v1.Health/"


@dataclass(frozen=True)
class Security:
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    token: str | None = None

    @classmethod
    def from_files(
        cls,
        cert: str | None = None,
        key: str | None = None,
        ca: str | None = None,
        token_file: str | None = None,
        token: str | None = None,
    ) -> Security:
        """Read the files; ConfigError names a file that is missing or empty."""

        def read(path: str | None, what: str) -> bytes | None:
            if not path:
                return None
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                raise ConfigError(f"{what} {path}: {err.strerror}") from None
            if not data.strip():
                raise ConfigError(f"{what} {path} is empty")
            return data

        if bool(cert) != bool(key):
            raise ConfigError("a TLS certificate needs its key and a key its certificate: give both")
        secret = read(token_file, "token file")
        token = secret.decode().strip() if secret else token
        return cls(read(cert, "certificate"), read(key, "key"), read(ca, "CA certificate"), token or None)

    @property
    def tls(self) -> bool:
        return self.cert is not None

    # -- server side ---------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenCheck(self.token)] if self.token else []

    # -- client side ---------------------------------------------------------

    def channel(self, address: str, options: list) -> grpc.aio.Channel:
        if self.ca is None and not self.tls:
            return grpc.aio.insecure_channel(address, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
        return grpc.aio.secure_channel(address, credentials, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


NO_SECURITY = Security()


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks without the right bearer token, before
    the handler runs: nothing is read and no state changes."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self._expected):  # constant time
            return await continuation(details)
        handler = await continuation(details)
        return _refusal(handler, "missing bearer token" if not sent else "wrong bearer token")


def _refusal(handler: grpc.RpcMethodHandler | None, reason: str) -> grpc.RpcMethodHandler:
    async def abort(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reason}: send 'authorization: Bearer <token>'")

    async def abort_stream(request, context):
        await abort(request, context)
        yield  # pragma: no cover (abort raises)

    streaming_response = handler is not None and handler.response_streaming
    streaming_request = handler is not None and handler.request_streaming
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(streaming_request, streaming_response)]
    return factory(abort_stream if streaming_response else abort)
