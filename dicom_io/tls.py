"""DICOM TLS for the listener (PS3.15 Annex B): the server's SSL context from configuration.

pynetdicom wraps each accepted socket in the one thread that accepts connections, and a
plain ``wrap_socket`` runs the whole handshake right there, with no time limit: a single
peer that opened the port and sent nothing (a stalled modality, a port scan) held up every
other sender, and a failed handshake vanished without a line in the log.  The context built
here leaves the handshake to the association's own thread, bounds it in time, and reports a
failure as one log line that says whose connection failed and why.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from settings.config import ConfigError, ListenerTlsConfig

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger("xray_triage.listener")

# Long enough for a slow modality on a congested link, short enough that a peer that never
# completes the handshake does not hold its thread (and its association slot) for long.
HANDSHAKE_TIMEOUT_S = 30.0
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

# OpenSSL reasons a site can act on, in the words of whoever reads the listener's log.
_REASONS = {
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (a plain DICOM sender on the TLS port?)",
    "HTTP_REQUEST": "the peer does not speak TLS (an HTTP request)",
    "UNSUPPORTED_PROTOCOL": "the peer offered only TLS versions below 1.2",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer offered only TLS versions below 1.2",
    "NO_SHARED_CIPHER": "no cipher suite in common with the peer",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no client certificate (listener.tls.require_client_cert)",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer rejected our certificate as expired",
}


def _describe(exc: BaseException) -> tuple[int, str]:
    """Log level and reason for a failed handshake: a peer that just went away is no warning."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return logging.WARNING, f"client certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionError):
        return logging.INFO, "the peer closed the connection during the handshake"
    if isinstance(exc, TimeoutError):
        return logging.WARNING, f"no complete handshake within {HANDSHAKE_TIMEOUT_S:.0f} s"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "")
        return logging.WARNING, _REASONS.get(reason, reason.replace("_", " ").lower() or str(exc))
    return logging.WARNING, f"{type(exc).__name__}: {exc}"


class _AcceptedSocket(ssl.SSLSocket):
    """A server-side TLS socket whose handshake runs on first use, in the association's thread."""

    _xt_handshake_ok: bool | None = None

    def _handshake(self) -> bool:
        if self._xt_handshake_ok is not None:
            return self._xt_handshake_ok
        try:
            host, port = self.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "a peer"
        previous = self.gettimeout()
        try:
            self.settimeout(HANDSHAKE_TIMEOUT_S)
            self.do_handshake()
            self.settimeout(previous)
        except OSError as exc:  # ssl.SSLError, TimeoutError and ConnectionError are all OSErrors
            level, reason = _describe(exc)
            log.log(level, "TLS handshake with %s failed: %s", peer, reason)
            self._xt_handshake_ok = False
            return False
        self._xt_handshake_ok = True
        log.debug("TLS handshake with %s: %s, %s", peer, self.version(), (self.cipher() or ("?",))[0])
        return True

    # A failed handshake reads as a closed connection: pynetdicom then ends the association
    # quietly instead of logging a traceback about a PDU it never started to receive.
    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        return super().recv(buflen, flags) if self._handshake() else b""

    def recv_into(self, buffer: Buffer, nbytes: int | None = None, flags: int = 0) -> int:
        return super().recv_into(buffer, nbytes, flags) if self._handshake() else 0

    def send(self, data: Buffer, flags: int = 0) -> int:
        if not self._handshake():
            raise ConnectionAbortedError(errno.ECONNABORTED, "TLS handshake failed")
        return super().send(data, flags)

    def sendall(self, data: Buffer, flags: int = 0) -> None:
        if not self._handshake():
            raise ConnectionAbortedError(errno.ECONNABORTED, "TLS handshake failed")
        super().sendall(data, flags)


class ListenerSSLContext(ssl.SSLContext):
    """An SSLContext that never handshakes inside ``wrap_socket`` (see the module docstring)."""

    sslsocket_class = _AcceptedSocket

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def _check_readable(path: Path, key: str) -> None:
    """Name the key and the file: OpenSSL's own errors name neither."""
    try:
        with path.open("rb") as fp:
            fp.read(1)
    except OSError as exc:
        raise ConfigError(f"listener.tls.{key}: cannot read {path}: {exc.strerror or exc}") from None


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, and a service has none.
    raise ConfigError("encrypted")


def server_ssl_context(tls: ListenerTlsConfig | None) -> ssl.SSLContext | None:
    """None (plain TCP) when TLS is not configured; a bad certificate or key stops start-up.

    Raises ConfigError with a one-line message naming the configuration key and the file.
    """
    if tls is None:
        return None
    for path, key in ((tls.cert_file, "cert_file"), (tls.key_file, "key_file")):
        _check_readable(path, key)
    if tls.ca_file is not None:
        _check_readable(tls.ca_file, "ca_file")

    # PROTOCOL_TLS_SERVER loads no system CAs: only the site CA below decides who may connect.
    context = ListenerSSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    try:
        # Parsing the certificate file on its own tells a bad certificate from a bad key.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=tls.cert_file)
    except ssl.SSLError:
        raise ConfigError(
            f"listener.tls.cert_file: {tls.cert_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ) from None
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
    except ConfigError:
        raise ConfigError(
            f"listener.tls.key_file: {tls.key_file} is encrypted; the listener needs an unencrypted key "
            "(readable only by its service account)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"listener.tls.key_file: {tls.key_file} is not the key of the certificate in "
                f"listener.tls.cert_file ({tls.cert_file})"
            ) from None
        raise ConfigError(f"listener.tls.key_file: {tls.key_file} holds no PEM private key") from None

    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.ca_file)
        except ssl.SSLError:
            raise ConfigError(f"listener.tls.ca_file: {tls.ca_file} holds no PEM CA certificate") from None
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
