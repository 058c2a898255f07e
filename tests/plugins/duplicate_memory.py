"""Registers the transport kind "memory" again, to test conflicts."""

from mox_core import hookimpl
from mox_core.plugins.kinds import TransportKind
from tests.plugins.every_hook import MemorySettings, MemoryTransport


@hookimpl
def mox_register_transports():
    return [TransportKind("memory", MemorySettings, MemoryTransport)]
