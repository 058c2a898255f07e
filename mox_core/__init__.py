"""mox-core: the core of a mox-style mail server; transports and web handlers are plugins."""

from mox_core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
