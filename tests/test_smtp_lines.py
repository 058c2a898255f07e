"""The CRLF-only check every message passes (server DATA, client DATA, header checks)."""

from __future__ import annotations

import itertools

from mox_core.smtp.lines import only_crlf


def paired_one_by_one(data: bytes) -> bool:
    """The rule, byte by byte: a CR must be followed by LF, an LF must follow that CR."""
    i = 0
    while i < len(data):
        if data[i] == 0x0D:
            if data[i + 1:i + 2] != b"\n":
                return False
            i += 2
        elif data[i] == 0x0A:
            return False
        else:
            i += 1
    return True


def test_agrees_with_the_rule_on_every_short_string() -> None:
    for length in range(8):
        for parts in itertools.product((b"\r", b"\n", b"a", b"."), repeat=length):
            data = b"".join(parts)
            assert only_crlf(data) is paired_one_by_one(data), data


def test_large_messages() -> None:
    body = (b"X" * 78 + b"\r\n") * 1300
    assert only_crlf(body)
    assert not only_crlf(body[:50_000] + b"\n" + body[50_000:])
    assert not only_crlf(body + b"\r")
    assert not only_crlf(b"\n" + body)
    assert not only_crlf(body[:-1])  # ends in a bare CR
