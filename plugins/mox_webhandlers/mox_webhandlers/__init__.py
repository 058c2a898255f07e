"""mox web handlers plugin: static files, redirects and a reverse proxy."""

__version__ = "0.1.0"
