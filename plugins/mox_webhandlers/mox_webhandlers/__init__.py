"""mox web handlers plugin: static files, redirects, a reverse proxy (websockets too) and
mox's internal services under a path."""

__version__ = "0.1.0"
