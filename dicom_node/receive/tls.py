"""DICOM TLS (PS3.15 Annex B secure transport, BCP 195 profile): contexts and the handshake.

Both directions use TLS 1.2 or newer and forward-secret AEAD cipher suites only (the BCP 195
non-downgrading set: ECDHE/DHE with AES-GCM, plus ChaCha20-Poly1305; TLS 1.3 suites are
OpenSSL's, all AEAD). The listener's handshake is done by :func:`handshake` in the connection's
own thread, against a deadline, never in the accept loop (see :mod:`dicom_node.receive.limits`).
"""

from __future__ import annotations

import select
import ssl
import time
from pathlib import Path
from typing import cast

from dicom_node.config import DestinationTLS, TLSSettings
from dicom_node.errors import ConfigError

#: TLS 1.2 suites allowed (OpenSSL names); all forward-secret, all AEAD.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP"
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def _readable(path: Path, key: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{key}: {str(path)!r} is not a readable file")
    return path


def _private(path: Path, key: str) -> Path:
    """A private key file others cannot read (its group may: the unit reads it through the
    service's group)."""
    _readable(path, key)
    if path.stat().st_mode & 0o004:
        raise ConfigError(
            f"{key}: {str(path)!r} can be read by every user; make it private (chmod o-r)"
        )
    return path


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE


def server_context(settings: TLSSettings) -> ssl.SSLContext:
    """The listener's context: our certificate, and the clients' CA when one is configured.

    Raises
    ------
    ConfigError
        A file is missing or unreadable, or the certificate, key or CA cannot be loaded (the
        message names the ``node.tls`` key).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    cert = _readable(settings.cert, "node.tls.cert")
    key = _private(settings.key, "node.tls.key")
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"node.tls.cert/key: cannot load them ({exc})") from exc
    if settings.ca is not None:
        ca = _readable(settings.ca, "node.tls.ca")
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"node.tls.ca: cannot load {str(ca)!r} ({exc})") from exc
        # without require_client_cert a certificate is still checked when a client sends one
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.require_client_cert else ssl.CERT_OPTIONAL
        )
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(settings: DestinationTLS, *, where: str) -> ssl.SSLContext:
    """A context for sending to one destination: its certificate must chain to ``settings.ca``.
    ``where``: the settings' key in the configuration, for the messages.

    Raises
    ------
    ConfigError
        A file is missing or cannot be loaded (the message names the key).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context)
    context.check_hostname = settings.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    ca = _readable(settings.ca, f"{where}.ca")
    try:
        context.load_verify_locations(cafile=ca)
        if settings.cert is not None and settings.key is not None:
            context.load_cert_chain(
                _readable(settings.cert, f"{where}.cert"), _private(settings.key, f"{where}.key")
            )
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{where}: cannot load the certificates ({exc})") from exc
    return context


def certificate_names(sock: object) -> list[str]:
    """The names a connection's verified client certificate carries: its subject's Common
    Name first, then the DNS names of its Subject Alternative Name (none without TLS or
    without a certificate)."""
    if not isinstance(sock, ssl.SSLSocket):
        return []
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):  # the connection is gone
        return []
    if not cert:
        return []
    subject = cast(tuple[tuple[tuple[str, str], ...], ...], cert.get("subject", ()))
    alternatives = cast(tuple[tuple[str, str], ...], cert.get("subjectAltName", ()))
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    names += [value for kind, value in alternatives if kind == "DNS"]
    return names


def handshake(sock: ssl.SSLSocket, *, timeout: float) -> None:
    """Complete the server side of the TLS handshake on ``sock`` within ``timeout`` seconds.

    The deadline covers the whole handshake, so a peer that trickles bytes cannot stretch it.
    The socket is left non-blocking; the caller sets the timeout it wants next.

    Raises
    ------
    TimeoutError
        The handshake did not finish in time.
    ssl.SSLError
        The peer spoke plaintext, an old protocol, no or an untrusted certificate...
    OSError
        The connection failed.
    """
    deadline = time.monotonic() + timeout
    sock.setblocking(False)
    while True:
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            wait_read = True
        except ssl.SSLWantWriteError:
            wait_read = False
        else:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"TLS handshake not finished after {timeout:g} s")
        if wait_read:
            ready = select.select([sock], [], [], left)[0]
        else:
            ready = select.select([], [sock], [], left)[1]
        if not ready:
            raise TimeoutError(f"TLS handshake not finished after {timeout:g} s")


def describe_failure(exc: BaseException) -> str:
    """A short reason for a failed handshake, for the audit log (``exc`` as OpenSSL names it)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    return str(exc) or type(exc).__name__
