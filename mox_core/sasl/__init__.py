"""SASL (RFC 4422) for mox-core: server-side mechanisms for SMTP AUTH, see :mod:`.server`."""
