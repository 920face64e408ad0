"""TLS, mutual TLS and a bearer token for every channel.

    security = Security.from_files(cert="server.pem", key="server.key", ca="clients-ca.pem", token_file="token")

On a server, ``cert``/``key`` turn on TLS, ``ca`` requires client certificates signed
by it (mutual TLS), and ``token`` is checked on every RPC except the health service.
On a client, ``ca`` verifies the server, ``cert``/``key`` are its own certificate for
mutual TLS, and ``token`` is sent as ``authorization: Bearer ...`` on every RPC.
A probe that runs next to a server with the server's own settings reaches it with
``probe_credentials`` (the image's HEALTHCHECK: ``psfw health --local``).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import re
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import grpc

from psfw.base.errors import UsageError
from psfw.base.service import finish_reading

HEALTH_PREFIX = "/grpc.health.v1.Health/"

OnRefusal = Callable[[grpc.aio.ServicerContext, str, grpc.StatusCode, str], None]


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
        """Read the files; UsageError names a file that is missing or empty."""

        def read(path: str | None, what: str) -> bytes | None:
            if not path:
                return None
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                raise UsageError(f"{what} {path}: {err.strerror}") from None
            if not data.strip():
                raise UsageError(f"{what} {path} is empty")
            return data

        if bool(cert) != bool(key):
            raise UsageError("a TLS certificate needs its key and a key its certificate: give both")
        secret = read(token_file, "token file")
        if secret:
            secret = secret.strip()
            # sent as a gRPC header value: printable ASCII, no spaces or line breaks
            if not all(33 <= b <= 126 for b in secret):
                raise UsageError(
                    f"token file {token_file} must hold one token of printable ASCII characters without "
                    "spaces or line breaks (for example: openssl rand -hex 32 > token)"
                )
            token = secret.decode("ascii")
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

    def link_server_context(self) -> ssl.SSLContext | None:
        """The TLS of a shard's link (the same certificate, key and client CA as its
        gRPC port); None: plaintext."""
        if not self.tls:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _load_chain(context, self.cert, self.key)
        if self.ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=self.ca.decode())
        return context

    def interceptors(self, on_refusal: OnRefusal | None = None) -> list[grpc.aio.ServerInterceptor]:
        """The server's interceptors; ``on_refusal(context, method, code, reason)`` is
        told of each RPC refused for its token (a shard counts and logs them)."""
        return [TokenCheck(self.token, on_refusal)] if self.token else []

    # -- client side ---------------------------------------------------------

    def channel(self, address: str, options: list) -> grpc.aio.Channel:
        credentials = self.channel_credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, credentials, options=options)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """A client's TLS credentials (when it has a CA or a certificate); None: plaintext."""
        if self.ca is None and not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def link_client_context(self) -> ssl.SSLContext | None:
        """A client's TLS for a shard's link, as ``channel_credentials`` for its gRPC
        port (the host name checked as gRPC checks it); None: plaintext."""
        if self.ca is None and not self.tls:
            return None
        context = ssl.create_default_context(cadata=self.ca.decode() if self.ca is not None else None)
        if self.tls:
            _load_chain(context, self.cert, self.key)
        return context

    def probe_credentials(self) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
        """Credentials and channel options for a probe that runs next to the server
        this Security configures (``cert``/``key`` are the server's): it trusts the
        server's own certificate (or ``ca`` when given) under the name that
        certificate carries, whatever address it dials (127.0.0.1), and presents the
        same certificate when the server requires client certificates.
        (None, []): the server speaks plaintext."""
        if not self.tls:
            return None, []
        credentials = grpc.ssl_channel_credentials(self.ca or self.cert, self.key, self.cert)
        names = certificate_names(self.cert)
        return credentials, [("grpc.ssl_target_name_override", names[0])] if names else []

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


NO_SECURITY = Security()


def _load_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Python's ssl loads a certificate and key from files only: from a private
    folder that is gone once they are read."""
    with tempfile.TemporaryDirectory(prefix="psfw-tls-") as folder:  # mode 0700
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_file.write_bytes(cert)
        key_file.write_bytes(key)
        context.load_cert_chain(cert_file, key_file)


_SAN = bytes.fromhex("0603551d11")  # the OID 2.5.29.17, subjectAltName, as DER
_COMMON_NAME = bytes.fromhex("0603550403")  # 2.5.4.3


def certificate_names(pem: bytes) -> list[str]:
    """The names the first certificate of a PEM file is valid for: its DNS names and
    IP addresses (subjectAltName), else its subject's common name; [] when it cannot
    be read. A wildcard ``*.x`` is given as ``probe.x``, a name it matches."""
    found = re.search(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", pem, re.S)
    try:
        der = base64.b64decode(b"".join(found.group(1).split()), validate=True)
        _, start, stop = next(_der(der, 0, len(der)))  # Certificate
        _, start, stop = next(_der(der, start, stop))  # tbsCertificate
        fields = list(_der(der, start, stop))
        subject = fields[5 if fields[0][0] == 0xA0 else 4]  # after [version], serial, algorithm, issuer, validity
        names, common = [], []
        for tag, start, stop in fields:
            if tag != 0xA3:  # [3] extensions
                continue
            _, start, stop = next(_der(der, start, stop))
            for _, e_start, e_stop in _der(der, start, stop):
                parts = list(_der(der, e_start, e_stop))
                if der[parts[0][1] - 2 : parts[0][2]] == _SAN:
                    _, start, stop = next(_der(der, parts[-1][1], parts[-1][2]))
                    for kind, n_start, n_stop in _der(der, start, stop):
                        if kind == 0x82:  # dNSName
                            names.append(der[n_start:n_stop].decode("ascii"))
                        elif kind == 0x87:  # iPAddress
                            names.append(str(ipaddress.ip_address(der[n_start:n_stop])))
        for _, start, stop in _der(der, subject[1], subject[2]):  # RDN sets
            for _, a_start, a_stop in _der(der, start, stop):
                oid, value = list(_der(der, a_start, a_stop))
                if der[oid[1] - 2 : oid[2]] == _COMMON_NAME:
                    common.append(der[value[1] : value[2]].decode("utf-8"))
    except (AttributeError, IndexError, StopIteration, ValueError):  # not a certificate we can read
        return []
    return [re.sub(r"^\*\.", "probe.", n) for n in (names or common)]


def _der(data: bytes, start: int, stop: int):
    """(tag, content start, content stop) of each DER element in data[start:stop]."""
    while start < stop:
        tag, length = data[start], data[start + 1]
        start += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[start : start + count], "big")
            start += count
        if start + length > stop:
            raise ValueError("truncated DER element")
        yield tag, start, start + length
        start += length


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks without the right bearer token, before
    the handler runs: no state changes (what a client streams is read and dropped,
    see ``finish_reading``)."""

    def __init__(self, token: str, on_refusal: OnRefusal | None = None):
        self._expected = f"Bearer {token}".encode()
        self._on_refusal = on_refusal

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
        reason = "missing bearer token" if not sent else "wrong bearer token"
        return _refusal(handler, details.method.rpartition("/")[2], reason, self._on_refusal)


def _refusal(
    handler: grpc.RpcMethodHandler | None, method: str, reason: str, on_refusal: OnRefusal | None
) -> grpc.RpcMethodHandler:
    async def abort(request, context):
        message = f"{reason}: send 'authorization: Bearer <token>'"
        if on_refusal is not None:
            on_refusal(context, method, grpc.StatusCode.UNAUTHENTICATED, message)
        if streaming_request:
            await finish_reading(request, context)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

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


class ConnectionProblem(NamedTuple):
    """What a client's failed RPC says about its connection to a shard.

    ``kind``: ``"handshake"`` (a TLS handshake that failed: retrying cannot help),
    ``"closed"`` (the shard closed the connection at once: a handshake it refused,
    when it keeps happening), ``"down"`` (nobody answers: the shard may be starting
    or restarting), or ``""`` (not about connecting: an answer of the shard).
    ``cause``: the likely cause and the flag that fixes it, in words."""

    kind: str
    cause: str


def connection_problem(details: str, security: Security) -> ConnectionProblem:
    """Read the details of an UNAVAILABLE (gRPC says ``failed to connect to all
    addresses; last error: ...``) as seen by a client with ``security``."""
    if "failed to connect" not in details:
        return ConnectionProblem("", "")
    if "WRONG_VERSION_NUMBER" in details:
        return ConnectionProblem(
            "handshake",
            "the shard speaks plaintext and this client TLS: drop --tls-ca (and --tls-cert/--tls-key), "
            "or start the shard with --tls-cert/--tls-key",
        )
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return ConnectionProblem(
            "handshake",
            "the shard's certificate is not signed by the CA this client trusts: give --tls-ca the CA that "
            "signed the shard's --tls-cert",
        )
    if "Hostname Verification" in details:
        return ConnectionProblem(
            "handshake",
            "the shard's certificate is made out for another name: connect by a host name or IP address that "
            "its certificate lists",
        )
    if "andshake failed" in details:
        return ConnectionProblem(
            "handshake", "the TLS handshake failed: check --tls-ca, --tls-cert and --tls-key against the shard's"
        )
    if "Socket closed" in details or "Connection reset" in details:
        if security.ca is None and not security.tls:
            cause = (
                "the shard closes every plaintext connection: it probably serves TLS: give --tls-ca (and "
                "--tls-cert/--tls-key if it requires client certificates)"
            )
        elif not security.tls:
            cause = (
                "the shard closes the connection in the TLS handshake: it probably requires a client "
                "certificate: give --tls-cert/--tls-key, signed by the CA the shard trusts (its --tls-client-ca)"
            )
        else:
            cause = (
                "the shard refuses this client's certificate in the TLS handshake: give --tls-cert/--tls-key "
                "signed by the CA the shard trusts (its --tls-client-ca)"
            )
        return ConnectionProblem("closed", cause + " (or a proxy in front of a shard that is down closes it)")
    if "Connection refused" in details:
        return ConnectionProblem("down", "connection refused")
    last = details.rpartition("last error: ")[2] or details
    return ConnectionProblem("down", last.rpartition(": ")[2] or last)
