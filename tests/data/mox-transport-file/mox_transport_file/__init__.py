"""A third-party transport for mox: each message becomes a file in a directory."""
