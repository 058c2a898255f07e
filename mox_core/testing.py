"""pytest plugin for the mox_core test suite (test peers). Work in progress."""
