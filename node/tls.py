"""DICOM TLS: the TLS contexts of the node's TLS listener (``[scp.tls]``) and of ``tls = true`` destinations.

Both sides follow the Non-Downgrading BCP 195 TLS Secure Transport Connection Profile (DICOM PS3.15
B.10): TLS 1.2 or 1.3 only (an older version is refused, not negotiated down to), no TLS compression,
Python's default cipher suites (forward-secret ECDHE and DHE only, AES-GCM and ChaCha20 first; no RC4,
3DES, NULL, export or anonymous suites). The Basic TLS profile (B.1: TLS 1.0, Triple DES) is not offered.

Trust. A peer's certificate is verified against the configured ``ca_file`` only, never against the
system's CA store: a hospital's DICOM certificates come from its own CA, and a public CA vouches for
nothing here. A destination's certificate is not matched against its ``host`` unless that destination
sets ``check_hostname`` (hospitals address PACS by IP address, and their certificates seldom name
it); any certificate the CA signed is accepted then, so give the DICOM peers a CA of their own.
The listener verifies a client certificate when a client presents one and ``ca_file`` is set, and
refuses clients without one when ``require_client_cert``.

Keys are read unencrypted (a service cannot type a passphrase): keep the key file readable by
``service.user`` only. The files are read when a context is built: the listener's at start-up (a
renewed certificate takes a restart), a destination's for every association.

Errors name the configuration key and the file (:class:`TlsFileError`); nothing of a key is logged.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
TLS_PORT = 2762  # IANA "dicom-tls": the DICOM upper layer over TLS


class TlsFileError(ValueError):
    """A certificate, key or CA file cannot be used; the message names its key, the file and why."""


class _EncryptedKeyError(Exception):
    """OpenSSL asked for a passphrase: the key file is encrypted (raised by the callback, caught below)."""


def _no_passphrase() -> str:
    """The passphrase callback: refuse, so that OpenSSL never prompts on a terminal a service does not have."""
    raise _EncryptedKeyError


def _restrict(context: ssl.SSLContext) -> None:
    """TLS 1.2 at least, no compression (Python's default cipher suites stay)."""
    context.minimum_version = MINIMUM_VERSION
    context.options |= ssl.OP_NO_COMPRESSION


def _readable(key: str, path: str) -> None:
    """Raise :class:`TlsFileError` unless ``path`` names a file this process can read."""
    if not path:
        raise TlsFileError(f"{key}: required, found nothing")
    p = Path(path)
    if not p.is_file():
        raise TlsFileError(f"{key}: expected a PEM file, found no file at {p}")
    try:
        with p.open("rb"):
            pass
    except OSError as exc:
        raise TlsFileError(f"{key}: expected a file this process can read, found {p} ({exc.strerror})") from exc


def _load_chain(context: ssl.SSLContext, where: str, cert_file: str, key_file: str) -> None:
    """Load our certificate (with any intermediates after it) and its private key."""
    _readable(f"{where}.cert_file", cert_file)
    _readable(f"{where}.key_file", key_file)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _EncryptedKeyError as exc:
        raise TlsFileError(f"{where}.key_file: expected an unencrypted private key, found an encrypted one in "
                           f"{key_file} (store it without a passphrase, readable by service.user only)") from exc
    except ssl.SSLError as exc:
        raise TlsFileError(f"{where}.cert_file/key_file: expected a PEM certificate and its matching private key, "
                           f"cannot load {cert_file} with {key_file} ({exc})") from exc


def _load_ca(context: ssl.SSLContext, where: str, ca_file: str) -> None:
    """Trust the CA certificates of ``ca_file`` (PEM, one or more) and nothing else."""
    _readable(f"{where}.ca_file", ca_file)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise TlsFileError(f"{where}.ca_file: expected PEM CA certificates, cannot load {ca_file} ({exc})") from exc


def server_context(cert_file: str, key_file: str, ca_file: str = "", require_client_cert: bool = False,
                   where: str = "scp.tls") -> ssl.SSLContext:
    """The listener's context: our certificate and key; client certificates verified against ``ca_file``.

    Args:
        cert_file: our certificate (PEM, intermediates after it).
        key_file: its unencrypted private key (PEM).
        ca_file: the CA certificates client certificates must chain to; "" requests none.
        require_client_cert: refuse a client without a certificate (needs ``ca_file``).
        where: the configuration key named in errors.

    Raises:
        TlsFileError: a file is missing, unreadable, encrypted or not what it should be.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _restrict(context)
    _load_chain(context, where, cert_file, key_file)
    if ca_file:
        _load_ca(context, where, ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise TlsFileError(f"{where}.ca_file: required with require_client_cert = true (the CA that client "
                           "certificates must chain to), found nothing")
    return context


class ClientContext(ssl.SSLContext):
    """A client context that keeps the TLS error of its connection (``tls_error``).

    pynetdicom catches a failed handshake and reports only a failed connection; its socket class
    (:class:`_ClientSocket`) records the error here first, so that the send's outcome can say why.
    One context serves one association.
    """

    tls_error: OSError | None = None


class _ClientSocket(ssl.SSLSocket):
    """An SSL socket that records a failed handshake, or a TLS alert received later (a server that refused
    our certificate after a TLS 1.3 handshake), on its :class:`ClientContext`."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:  # SSLError, or a timeout or reset during the handshake
            self._record(exc)
            raise

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # ssl.SSLSocket's signature
        try:
            return super().read(len, buffer)
        except ssl.SSLError as exc:
            self._record(exc)
            raise

    def _record(self, exc: OSError) -> None:
        context = self.context
        if isinstance(context, ClientContext) and context.tls_error is None:
            context.tls_error = exc


def client_context(ca_file: str, cert_file: str = "", key_file: str = "", check_hostname: bool = False,
                   where: str = "destinations") -> ClientContext:
    """A destination's context: its certificate verified against ``ca_file``; ours presented if configured.

    Args:
        ca_file: the CA certificates the destination's certificate must chain to (required).
        cert_file: our client certificate (PEM); "" presents none.
        key_file: its unencrypted private key (PEM); with ``cert_file``.
        check_hostname: also match the certificate's names against the host we connect to.
        where: the configuration key named in errors (``destinations.NAME``).

    Raises:
        TlsFileError: a file is missing, unreadable, encrypted or not what it should be.
    """
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    _restrict(context)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    context.sslsocket_class = _ClientSocket
    if not ca_file:
        raise TlsFileError(f"{where}.ca_file: required with tls = true (the CA that the destination's "
                           "certificate must chain to), found nothing")
    _load_ca(context, where, ca_file)
    if cert_file or key_file:
        _load_chain(context, where, cert_file, key_file)
    return context


def self_check_context(cert_file: str, key_file: str, where: str = "scp.tls") -> ssl.SSLContext:
    """The context of the node's health check on its own TLS listener: the listener's certificate is not
    verified (it is this node's), and the node's own certificate is presented (which the listener accepts
    when its ``ca_file`` trusts it).

    Raises:
        TlsFileError: the certificate or key cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _restrict(context)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _load_chain(context, where, cert_file, key_file)
    return context


def describe_error(exc: OSError) -> str:
    """A TLS error in a few words: OpenSSL's reason and verify message, without the C source location."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message.rstrip('.')}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__
