"""mox transport plugin: direct delivery to the recipient domain's MX hosts."""

__version__ = "0.1.0"
