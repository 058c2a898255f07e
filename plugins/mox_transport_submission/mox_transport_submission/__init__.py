"""mox transport plugin: submission to a smarthost with SASL authentication."""

__version__ = "0.1.0"
