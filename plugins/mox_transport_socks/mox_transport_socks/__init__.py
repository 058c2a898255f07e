"""mox transport plugin: direct delivery through a SOCKS5 proxy."""

__version__ = "0.1.0"
