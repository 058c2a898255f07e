"""Certificates from an ACME certificate authority (RFC 8555), e.g. Let's Encrypt.

Listeners whose ``tls`` names an ACME provider of ``[acme]`` in mox.toml get certificates for
their host names, and for ``mta-sts.<domain>`` and ``autoconfig.<domain>`` where they serve
those over HTTPS. Who does what:

* the main process of ``mox serve`` runs the client in the background
  (:mod:`mox_core.acme.manager`, :mod:`mox_core.acme.client`): it obtains a certificate per
  host name, renews it when two thirds of its lifetime have passed, and retries failures with
  a growing delay;
* the certificates are files under the data directory (:mod:`mox_core.acme.store`): one file
  per host name with the private key and the chain, mode 0600, replaced atomically;
* every process serving TLS (the SMTP workers, the web process, the main process) reads those
  files for the host name a client asks for, and reads them again when they change
  (:mod:`mox_core.server.tls`), so a new certificate is used without a restart;
* the challenges are answered by the web process from files the client writes: http-01
  (RFC 8555 §8.3) at ``/.well-known/acme-challenge/`` on plain HTTP, and tls-alpn-01
  (RFC 8737, :mod:`mox_core.acme.tlsalpn`) on the HTTPS port.

Until the first certificate arrives a host name gets a temporary self-signed one.
"""
