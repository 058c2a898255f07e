"""A plugin with a misspelt hook."""

from mox_core import hookimpl


@hookimpl
def mox_register_transport():  # missing "s": must be reported, not ignored
    return []
