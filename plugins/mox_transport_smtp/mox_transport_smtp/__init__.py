"""mox transport plugin: relay through a smarthost, without authentication."""

__version__ = "0.1.0"
