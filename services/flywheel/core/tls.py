"""TLS for every gRPC and HTTP server and for the clients the project ships (docs/SECURITY.md).

Servers (`ServiceServer`): `cert_file` + `key_file` make both the gRPC and the HTTP port serve
TLS only. `client_ca_file` adds mutual TLS: gRPC refuses, in the handshake, a client without a
certificate signed by that CA; HTTP asks for one in the handshake (a certificate that does not
verify fails it) and answers 401 to a request without one, except `/health` and `/live`: the
kubelet's probes cannot present a certificate. Health and reflection run on the same secure port.
The files are re-read when they change (looked at on a new connection, at most once a second),
so a rotated Secret takes effect without a restart; a half-written pair (a key that does not
match the certificate) keeps the previous pair, with a warning, until it is complete.

Clients (`channel()`, `TlsConfig.client_ssl_context()`): `ca_file` makes every client dial with
TLS and verify the server against that CA; `client_cert_file` + `client_key_file` is presented
to a server that requires mutual TLS; `server_name` is the name the server's certificate must
carry when the dialed address is another one (a pod IP). A client reads its files when it makes
its channel: rotating a client certificate takes a restart of that client.

Every file is checked when the config is made: a missing or unreadable file, a file that is not
PEM, a key that is not the certificate's, an expired certificate, or half of a pair is a
ConfigError naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from flywheel.core import errors
from flywheel.core.config import ConfigError, require, setting

if TYPE_CHECKING:  # grpc and aiohttp load only where a channel or a server is made
    import grpc
    from aiohttp import web

log = logging.getLogger(__name__)

RELOAD_CHECK_S = 1.0  # how often a new connection may look at the files' stamps
MIN_TLS = ssl.TLSVersion.TLSv1_2


@dataclasses.dataclass
class TlsConfig:
    """TLS of the gRPC and HTTP servers (certificate, key, client CA for mutual TLS) and of the
    clients the project ships (CA to verify servers, client certificate)."""

    SECTION: ClassVar[str] = "tls"

    cert_file: str = setting(
        "",
        "Server certificate chain (PEM). With key_file, every service's gRPC and HTTP ports serve TLS only "
        "(re-read when the file changes). Empty: plaintext.",
    )
    key_file: str = setting("", "Private key (PEM, unencrypted) of cert_file.")
    client_ca_file: str = setting(
        "",
        "CA bundle (PEM) that signs client certificates: set for mutual TLS. gRPC then refuses a client "
        "without such a certificate in the handshake; HTTP answers 401 except /health and /live (probes).",
    )
    ca_file: str = setting(
        "",
        "CA bundle (PEM) clients verify servers with. Set: every client the project ships (the services' "
        "own clients, `flywheel up`'s probes, the demo panel, `flywheel ops`) dials with TLS. Empty: plaintext.",
    )
    client_cert_file: str = setting(
        "", "Client certificate chain (PEM) presented to servers that require mutual TLS (needs ca_file)."
    )
    client_key_file: str = setting("", "Private key (PEM, unencrypted) of client_cert_file.")
    server_name: str = setting(
        "",
        "Name the server's certificate must carry when clients dial another address (such as a pod IP); "
        "empty: the dialed host.",
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        for name in ("cert_file", "key_file", "client_ca_file", "ca_file", "client_cert_file", "client_key_file"):
            path = getattr(self, name)
            if path:
                problem = _unreadable(path)
                require(problem is None, n, name, path, f"{problem}: fix the path or mount the file")
        _require_pair(n, "cert_file", self.cert_file, "key_file", self.key_file)
        _require_pair(n, "client_cert_file", self.client_cert_file, "client_key_file", self.client_key_file)
        require(
            not self.client_ca_file or bool(self.cert_file),
            n,
            "client_ca_file",
            self.client_ca_file,
            "mutual TLS needs the server's own certificate: set cert_file and key_file too",
        )
        for name in ("client_cert_file", "server_name"):
            require(
                not getattr(self, name) or bool(self.ca_file),
                n,
                name,
                getattr(self, name),
                "clients use TLS only when ca_file is set: set ca_file (the CA that signed the servers' certificates)",
            )
        if self.cert_file:
            check_pair(n, "cert_file", self.cert_file, "key_file", self.key_file)
        if self.client_cert_file:
            check_pair(n, "client_cert_file", self.client_cert_file, "client_key_file", self.client_key_file)
        for name in ("client_ca_file", "ca_file"):
            if getattr(self, name):
                check_ca(n, name, getattr(self, name))

    @property
    def server_enabled(self) -> bool:
        return bool(self.cert_file)

    @property
    def mutual(self) -> bool:
        """Servers require client certificates."""
        return bool(self.client_ca_file)

    @property
    def client_enabled(self) -> bool:
        return bool(self.ca_file)

    # --- clients ----------------------------------------------------------------------
    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC credentials of a client: the CA, and the client certificate when one is set."""
        import grpc

        key = _read(self.client_key_file) if self.client_key_file else None
        chain = _read(self.client_cert_file) if self.client_cert_file else None
        return grpc.ssl_channel_credentials(_read(self.ca_file), key, chain)

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel arguments a secure channel needs (the name its server's certificate carries)."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSLContext for HTTP clients (hostname checked; pass `server_hostname=server_name`
        to the client when server_name is set)."""
        if not self.client_enabled:
            raise ConfigError(f"{type(self).__name__}.ca_file is empty: set it to make TLS clients")
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.minimum_version = MIN_TLS
        if self.client_cert_file:
            ctx.load_cert_chain(self.client_cert_file, self.client_key_file)
        return ctx


def load_tls() -> TlsConfig:
    """The `tls` section of the config file (FLYWHEEL_CONFIG) and its environment variables."""
    from flywheel.core.config import load_section

    return load_section(TlsConfig)


def channel(address: str, tls: TlsConfig | None = None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A gRPC channel to `address`: TLS when `tls` (default: `load_tls()`) has a ca_file, else plaintext.

    Every client the project ships dials through this, so one setting secures all of them."""
    import grpc

    tls = load_tls() if tls is None else tls
    if not tls.client_enabled:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.channel_credentials(), options=[*options, *tls.channel_options()])


# ------------------------------------------------------------------------------- servers


@dataclasses.dataclass(frozen=True)
class _Pair:
    """One consistent read of the server's files."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext


class ServerCertificates:
    """The server's certificate, key and client CA, re-read when their files change.

    Both ports ask it on each new connection (gRPC through dynamic credentials, HTTP through the
    SSLContext's SNI callback, which runs on every handshake); the files' stamps are looked at
    most once per RELOAD_CHECK_S. A new pair that does not load keeps the previous one.
    """

    def __init__(self, tls: TlsConfig, check_every_s: float = RELOAD_CHECK_S) -> None:
        if not tls.server_enabled:
            raise ConfigError(f"{type(tls).__name__}.cert_file is empty: set cert_file and key_file to serve TLS")
        self.tls, self.check_every_s = tls, check_every_s
        self._files = [p for p in (tls.cert_file, tls.key_file, tls.client_ca_file) if p]
        self._lock = threading.Lock()
        self._stamp = _stamps(self._files)
        self._pair = self._load()
        self._checked = time.monotonic()
        self._grpc_served: _Pair | None = None
        self.reloads = 0

    @property
    def mutual(self) -> bool:
        return self.tls.mutual

    def current(self) -> _Pair:
        """The pair to use now, re-read first when a file changed since the last look."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self.check_every_s:
                return self._pair
            self._checked = now
            stamp = _stamps(self._files)
            if stamp == self._stamp:
                return self._pair
            try:
                pair = self._load()
            except (OSError, ssl.SSLError, ValueError) as e:  # half-written: keep serving the last good pair
                log.warning("TLS files changed but do not load (%s); keeping the previous certificate", e)
                return self._pair
            self._stamp, self._pair = stamp, pair
            self.reloads += 1
            log.info("TLS certificate re-read from %s", self.tls.cert_file)
            return pair

    def _load(self) -> _Pair:
        cert, key = _read(self.tls.cert_file), _read(self.tls.key_file)
        client_ca = _read(self.tls.client_ca_file) if self.tls.client_ca_file else None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = MIN_TLS
        ctx.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        if client_ca is not None:
            # Optional in the handshake, required by http_middleware: probes have no certificate.
            ctx.verify_mode = ssl.CERT_OPTIONAL
            ctx.load_verify_locations(cadata=client_ca.decode())
        ctx.sni_callback = self._sni
        return _Pair(cert, key, client_ca, ctx)

    # --- gRPC --------------------------------------------------------------------------
    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that pick up a changed pair on the next connection."""
        import grpc

        pair = self.current()
        self._grpc_served = pair
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(pair), self._grpc_fetch, require_client_authentication=self.mutual
        )

    def _grpc_fetch(self) -> Any:
        pair = self.current()  # grpc calls this before every handshake, on one of its threads
        if pair is self._grpc_served:
            return None  # no change
        self._grpc_served = pair
        return self._grpc_config(pair)

    @staticmethod
    def _grpc_config(pair: _Pair) -> Any:
        import grpc

        return grpc.ssl_server_certificate_configuration([(pair.key, pair.cert)], root_certificates=pair.client_ca)

    # --- HTTP --------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        """The SSLContext for aiohttp's site; each handshake switches to the current pair."""
        return self.current().context

    def _sni(self, conn: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        pair = self.current()
        if pair.context is not ctx:
            conn.context = pair.context

    def http_middleware(self, exempt_paths: Collection[str]) -> Any:
        """Under mutual TLS: 401 for a request whose connection presented no client certificate
        (one that does not verify never completes the handshake), except `exempt_paths`."""
        from aiohttp import web

        @web.middleware
        async def require_client_certificate(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.path not in exempt_paths and not _peer_certificate(request):
                raise errors.Unauthenticated(
                    "this server requires a client certificate (mutual TLS): connect with a certificate "
                    "signed by the deployment's client CA"
                )
            return await handler(request)

        return require_client_certificate


def _peer_certificate(request: web.Request) -> dict[str, Any] | None:
    transport = request.transport
    return transport.get_extra_info("peercert") if transport is not None else None


# ------------------------------------------------------------------------------- file checks


def _unreadable(path: str) -> str | None:
    """Why `path` cannot be read as a file, or None."""
    if not os.path.exists(path):
        return "no such file"
    if not os.path.isfile(path):
        return "not a file"
    if not os.access(path, os.R_OK):
        return "not readable by this process"
    return None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _stamps(paths: Sequence[str]) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when a file is rewritten or a mounted Secret's symlink is swapped."""
    out: list[tuple[int, int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def _require_pair(n: str, cert_field: str, cert: str, key_field: str, key: str) -> None:
    require(not key or bool(cert), n, key_field, key, f"set {cert_field} too: the certificate chain of this key")
    require(not cert or bool(key), n, cert_field, cert, f"set {key_field} too: the private key of this certificate")


def check_pair(n: str, cert_field: str, cert_path: str, key_field: str, key_path: str) -> None:
    """ConfigError unless `cert_path` holds PEM certificates, the first one valid now, and
    `key_path` an unencrypted PEM private key of that certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        chain = x509.load_pem_x509_certificates(_read(cert_path))
    except ValueError:
        chain = []
    require(bool(chain), n, cert_field, cert_path, "holds no PEM certificate: give the certificate chain in PEM")
    now = datetime.datetime.now(datetime.UTC)
    leaf = chain[0]
    require(
        leaf.not_valid_after_utc > now,
        n,
        cert_field,
        cert_path,
        f"the certificate expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: renew it",
    )
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except TypeError:
        raise ConfigError(f"{n}.{key_field} = {key_path!r}: the key is encrypted: give it unencrypted") from None
    except ValueError:
        raise ConfigError(f"{n}.{key_field} = {key_path!r}: holds no PEM private key: give the key in PEM") from None
    require(
        _public_bytes(key.public_key()) == _public_bytes(leaf.public_key()),
        n,
        key_field,
        key_path,
        f"this key does not belong to the certificate in {cert_field}: give the pair's own key",
    )


def check_ca(n: str, field: str, path: str) -> None:
    """ConfigError unless `path` holds at least one PEM certificate."""
    from cryptography import x509

    try:
        ok = bool(x509.load_pem_x509_certificates(_read(path)))
    except ValueError:
        ok = False
    require(ok, n, field, path, "holds no PEM certificate: give the CA certificate(s) in PEM")


def _public_bytes(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


__all__ = ["ServerCertificates", "TlsConfig", "channel", "check_ca", "check_pair", "load_tls"]
