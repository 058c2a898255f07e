"""Server TLS contexts for the listeners, with the certificate chosen by the host name the client
asks for (SNI, RFC 6066 §3), and certificates read again when their files change.

A listener's ``tls`` names one certificate and key, plus any number in ``key_certs``; a client
naming a host that one of their certificates covers (exact, or a ``*.`` wildcard for one
label) gets that certificate, any other client the first one. With ``tls.acme`` the
certificates are the ACME client's files, one per host name (:mod:`mox_core.acme.store`); a
name without one gets the listener's host name's certificate.

Every process serving TLS (SMTP workers, web process, main process) holds its own contexts.
At a handshake, a certificate's files are checked (``stat``) at most once per
:data:`CHECK_INTERVAL`; when they changed, they are loaded again and new connections get the
new certificate. A file that does not load (say, half written) is logged and the previous
certificate stays. TLS 1.2 or newer.
"""

from __future__ import annotations

import os
import ssl
import time
from pathlib import Path
from typing import Any

import structlog

from mox_core.acme.store import cert_path, ensure_certificate
from mox_core.acme.tlsalpn import ChallengeResponder
from mox_core.config.listeners import TLSFiles
from mox_core.smtp.domain import to_ascii

__all__ = ["CHECK_INTERVAL", "CertSource", "ServerTLS", "cert_names", "name_matches", "server_context"]

log = structlog.get_logger(component="tls")

#: seconds between checks of a certificate's files for changes
CHECK_INTERVAL = 1.0
_MAX_ACME_NAMES = 1000  # per context; unknown names asked for by clients are cached too


def _resolve(p: Path, config_dir: Path) -> Path:
    return p if p.is_absolute() else config_dir / p


def _context(cert: Path, key: Path | None, alpn: list[str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def cert_names(cert: Path) -> list[str]:
    """The DNS names of the (first) certificate in the PEM file ``cert``, lower-case.

    ``cryptography`` is imported only here: it adds megabytes to a process, and only a
    listener with several certificate files needs the names."""
    from cryptography import x509

    c = x509.load_pem_x509_certificate(cert.read_bytes())
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [a.value.lower() for a in c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
                if isinstance(a.value, str)]


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 §6.4: exact, or ``*.example.org`` for one label in front of example.org."""
    if pattern == name:
        return True
    if pattern.startswith("*.") and "." in name:
        return name.split(".", 1)[1] == pattern[2:]
    return False


class CertSource:
    """A certificate chain and its key from files (``key`` None: the key is in ``cert``),
    as a server context that is loaded again when a file changes."""

    def __init__(self, cert: Path, key: Path | None, alpn: list[str] | None, *, with_names: bool = False) -> None:
        self.cert, self.key, self.alpn = cert, key, alpn
        self.with_names = with_names  # read the certificate's names (for choosing among several)
        self.names: list[str] = []
        self._ctx: ssl.SSLContext | None = None
        self._signature: tuple[Any, ...] | None = None
        self._checked = 0.0

    def _stat(self) -> tuple[Any, ...]:
        out: tuple[Any, ...] = ()
        for p in (self.cert, self.key):
            if p is not None:
                st = os.stat(p)
                out += (st.st_ino, st.st_size, st.st_mtime_ns)
        return out

    def load(self) -> ssl.SSLContext:
        """Load now; raises ``OSError`` naming the files when they cannot be used."""
        try:
            signature = self._stat()
            ctx = _context(self.cert, self.key, self.alpn)
            names = cert_names(self.cert) if self.with_names else []
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise OSError(f"tls certificate {self.cert}" + (f" / key {self.key}" if self.key else "")
                          + f": {exc}") from None
        self._ctx, self.names, self._signature = ctx, names, signature
        self._checked = time.monotonic()
        return ctx

    def context(self) -> ssl.SSLContext | None:
        """The current context, loaded again first if the files changed since the last check
        (at most one check per :data:`CHECK_INTERVAL`). None if it never loaded."""
        now = time.monotonic()
        if self._ctx is not None and now - self._checked < CHECK_INTERVAL:
            return self._ctx
        self._checked = now
        try:
            signature = self._stat()
        except OSError:
            return self._ctx  # gone for now: keep serving what we have
        if signature != self._signature:
            previous = self._signature
            try:
                self.load()
            except OSError as exc:
                self._signature = signature  # try again when the files change again
                log.error("tls_certificate_reload_failed", error=str(exc), keeping_previous=self._ctx is not None)
                return self._ctx
            if previous is not None:
                log.info("tls_certificate_reloaded", cert=str(self.cert), names=self.names)
        return self._ctx


class ServerTLS:
    """The certificates of one listener (for one ALPN list) and the SNI callback choosing
    among them. :meth:`context` is the context to listen with."""

    def __init__(self, static: list[CertSource], *, acme_data_dir: Path | None = None,
                 default_name: str | None = None, alpn: list[str] | None = None,
                 challenges: ChallengeResponder | None = None) -> None:
        self.static = static
        self.acme_data_dir = acme_data_dir
        self.default_name = default_name
        self.alpn = alpn
        self.challenges = challenges
        self._acme: dict[str, CertSource | float] = {}  # name -> source, or when found missing

    def _acme_source(self, name: str) -> CertSource | None:
        assert self.acme_data_dir is not None
        entry = self._acme.get(name)
        if isinstance(entry, CertSource):
            return entry
        now = time.monotonic()
        if entry is not None and now - entry < CHECK_INTERVAL:
            return None
        try:
            path = cert_path(self.acme_data_dir, name)
        except ValueError:
            return None
        if len(self._acme) >= _MAX_ACME_NAMES:
            self._acme = {k: v for k, v in self._acme.items() if isinstance(v, CertSource)}
        if not path.exists():
            self._acme[name] = now
            return None
        source = CertSource(path, None, self.alpn)
        self._acme[name] = source
        return source

    def context_for(self, name: str | None) -> ssl.SSLContext | None:
        """The context for a client asking for host ``name`` (None: no SNI)."""
        if name:
            for source in self.static:
                if any(name_matches(p, name) for p in source.names):
                    return source.context()
            if self.acme_data_dir is not None:
                source = self._acme_source(name)
                ctx = source.context() if source is not None else None
                if ctx is not None:
                    return ctx
        if self.acme_data_dir is not None and self.default_name:
            source = self._acme_source(self.default_name)
            if source is None:  # made by the main process at start; make it if it is gone
                ensure_certificate(self.acme_data_dir, self.default_name)
                self._acme.pop(self.default_name, None)
                source = self._acme_source(self.default_name)
            return source.context() if source is not None else None
        if self.static:
            return self.static[0].context()
        return None

    def _choose(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        try:
            name = server_name.lower().rstrip(".") if server_name else None
            if self.challenges is not None and self.challenges.wants_challenge(sslobj):
                challenge = self.challenges.context(name or "")
                if challenge is None:
                    return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
                sslobj.context = challenge
                return None
            ctx = self.context_for(name)
            if ctx is not None:
                sslobj.context = ctx
        except Exception:  # never let a bug here end every handshake silently
            log.exception("tls_sni_callback_failed", server_name=server_name)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None

    def context(self) -> ssl.SSLContext:
        """The listening context: the default certificate, and the SNI callback that picks
        the current certificate for each handshake."""
        for source in self.static:
            source.load()
        if self.acme_data_dir is None:
            first = self.static[0]
            listening = _context(first.cert, first.key, self.alpn)
        else:
            assert self.default_name
            path = ensure_certificate(self.acme_data_dir, self.default_name)
            try:
                listening = _context(path, None, self.alpn)
            except (OSError, ssl.SSLError) as exc:
                raise OSError(f"tls certificate {path}: {exc}") from None
        if self.challenges is not None and not self.challenges.install(listening):
            self.challenges = None
        listening.sni_callback = self._choose
        return listening


def server_context(tls: TLSFiles, config_dir: Path, *, alpn: list[str] | None = None,
                   data_dir: Path | None = None, hostname: str | None = None,
                   acme_challenges: bool = False) -> ssl.SSLContext:
    """The listening context for a listener's TLS; raises ``OSError``/``ssl.SSLError`` for
    unusable files, naming them.

    ``data_dir`` and ``hostname`` (the listener's host name, the default certificate) are
    needed with ``tls.acme``; ``acme_challenges``: also answer tls-alpn-01 challenges here.
    """
    pairs = [(kc.cert_file, kc.key_file) for kc in tls.key_certs]
    if tls.cert_file is not None and tls.key_file is not None:
        pairs.insert(0, (tls.cert_file, tls.key_file))
    several = len(pairs) > 1 or (bool(pairs) and tls.acme is not None)
    static = [CertSource(_resolve(cert, config_dir), _resolve(key, config_dir), alpn, with_names=several)
              for cert, key in pairs]
    if tls.acme is None:
        return ServerTLS(static, alpn=alpn).context()
    if data_dir is None or not hostname:
        raise ValueError("tls.acme needs the data directory and the listener's host name")
    challenges = ChallengeResponder(data_dir) if acme_challenges else None
    return ServerTLS(static, acme_data_dir=data_dir, default_name=to_ascii(hostname), alpn=alpn,
                     challenges=challenges).context()
