"""Coverage-guided fuzzing of the SMTP session with atheris (run by hand, not in CI).

Each input is the byte stream a client sends on one connection. It is fed into a real
:class:`~mox_core.smtpserver.protocol.MoxSMTP` (the protocol object ``mox serve`` makes per
connection) over an in-memory transport, split into reads at positions the fuzzer also
chooses, with a policy object that accepts every sender, recipient and message and a
credential store with one user (AUTH is allowed without TLS here so that every mechanism's
parser is reached). A finding is:

* an exception escaping the session task (anything but the cancellation at the end);
* ``451 4.3.0 internal error``: the protocol caught an exception it did not expect (the
  policy object used here never raises);
* a message handed to the policy whose bytes contain a bare CR or LF or a NUL, or a session
  that was given more messages than the input has CRLF.CRLF terminators (smuggling);
* a session that does not finish within 5 seconds of its input ending (a hang).

Run (from the repository root, in the virtualenv)::

    .venv/bin/python tests/security/fuzz_smtp.py -max_total_time=600 -print_final_stats=1 \\
        [-artifact_prefix=/tmp/fuzz-] [CORPUS_DIR]

A crashing input is written to ``crash-<sha1>`` (in ``-artifact_prefix``) and can be replayed
with ``.venv/bin/python tests/security/fuzz_smtp.py crash-<sha1>``. tests/security/README.md
has the result of the last long run.
"""

from __future__ import annotations

import asyncio
import sys

import atheris

with atheris.instrument_imports(include=["mox_core", "aiosmtpd"]):
    from mox_core.accounts.passwords import make_credentials
    from mox_core.accounts.sasl import AuthFailureLimiter
    from mox_core.smtp import codes
    from mox_core.smtp.lines import only_crlf
    from mox_core.smtpserver.protocol import MoxSMTP

USER = "alice@example.org"
CREDENTIALS = make_credentials("pw")

# Seeds: every verb in a state where it is allowed, plus the smuggling forms.
SEEDS = [
    b"EHLO x\r\nMAIL FROM:<a@b.test> SIZE=10 BODY=8BITMIME\r\nRCPT TO:<u@local.test>\r\nDATA\r\n"
    b"Subject: s\r\n\r\nbody\r\n..dot\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n",
    b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<@r.test:u@local.test>\r\nDATA\r\nx\n.\nMAIL FROM:<a@b>\r\n.\r\n",
    b"EHLO x\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHB3\r\nMAIL FROM:<alice@example.org>\r\n",
    b"EHLO x\r\nAUTH LOGIN\r\nYWxpY2U=\r\ncHc=\r\nAUTH CRAM-MD5\r\n*\r\n",
    b"EHLO x\r\nAUTH SCRAM-SHA-256 biwsbj1hbGljZSxyPWFiYw==\r\n",
    b"EHLO x\r\nVRFY root\r\nEXPN staff\r\nHELP\r\nSTARTTLS\r\nXYZZY\r\n",
    b"EHLO x\r\nMAIL FROM:<a@x> AUTH=a+0Ab ENVID=q+0Aw\r\nRCPT TO:<u@l> ORCPT=rfc822;u+0A NOTIFY=FAILURE\r\n",
    b"EHLO x\r\nMAIL FROM:<\"q s\"@x.test> SMTPUTF8\r\nRCPT TO:<\xe7\x94\xa8@local.test>\r\n",
]


class Transport(asyncio.Transport):
    """Collects what the server writes; a socket that never blocks. As a socket transport:
    writes after close() are dropped, and connection_lost() follows on the next turn."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.protocol = None

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}.get(name, default)

    def write(self, data) -> None:
        if not self.closed:
            self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed and self.protocol is not None:
            asyncio.get_running_loop().call_soon(self._lost)
        self.closed = True

    def _lost(self) -> None:
        if self.protocol.transport is not None:
            self.protocol.connection_lost(None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class Finding(Exception):
    pass


class Policy:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.messages.append(envelope.content)
        return "250 2.0.0 ok"


class Store:
    def lookup(self, username: str):
        return CREDENTIALS if username in (USER, "alice") else None


LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(LOOP)


async def _settle(proto: MoxSMTP, task: asyncio.Task) -> None:
    """Let the session work until it waits for input that will not come."""
    idle = 0
    while not task.done() and idle < 20:
        before = (len(proto._reader._buffer), len(proto.transport.out) if proto.transport else 0)
        await asyncio.sleep(0)
        after = (len(proto._reader._buffer), len(proto.transport.out) if proto.transport else 0)
        idle = idle + 1 if before == after else 0


async def session(data: bytes, cuts: list[int]) -> tuple[bytes, list[bytes]]:
    policy = Policy()
    proto = MoxSMTP(policy, hostname="mx.test", max_message_size=4096, max_recipients=5,
                    credential_store=Store(), auth_require_tls=False, auth_failure_delay=0,
                    auth_limiter=AuthFailureLimiter(), idle_timeout=60, loop=LOOP)
    transport = Transport()
    transport.protocol = proto
    proto.connection_made(transport)
    task = proto._handler_coroutine
    await _settle(proto, task)  # the greeting first: a client that talks before it gets 554
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        if transport.closed:
            break
        proto.data_received(data[a:b])
        await _settle(proto, task)
    await asyncio.wait_for(_settle(proto, task), 5)
    if proto.transport is not None:
        proto.connection_lost(None)
    try:
        await asyncio.wait_for(task, 5)
    except asyncio.CancelledError:
        pass
    return bytes(transport.out), policy.messages


def check(data: bytes, cuts: list[int]) -> None:
    out, messages = LOOP.run_until_complete(session(data, cuts))
    if codes.INTERNAL_ERROR.encode() in out:
        raise Finding(f"unexpected exception answered with 451: {out[-300:]!r}")
    for m in messages:
        if not only_crlf(m) or b"\x00" in m:
            raise Finding(f"a message with a bare CR/LF or NUL was accepted: {m[:200]!r}")
    if len(messages) > data.count(b"\r\n.\r\n") + data.startswith(b".\r\n"):
        raise Finding(f"{len(messages)} messages from {data.count(b'.')} terminators")


def lockstep(data: bytes) -> list[int]:
    """Cuts after every line: a client that waits for each reply, as one without PIPELINING
    must (RFC 2920); the session then reaches every state instead of ending in 554 5.5.0."""
    return [i + 1 for i in range(len(data)) if data[i] == 10]


def one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    in_step = fdp.ConsumeBool()
    ncuts = fdp.ConsumeIntInRange(0, 4)
    cuts = [fdp.ConsumeIntInRange(0, 4096) for _ in range(ncuts)]
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    check(data, cuts + lockstep(data) if in_step else cuts)


def main() -> None:
    import os
    from pathlib import Path

    for seed in SEEDS:  # the seeds must pass before fuzzing starts
        check(seed, [])
        check(seed, [1, len(seed) // 2])
        check(seed, lockstep(seed))
    corpus = [Path(a) for a in sys.argv[1:] if not a.startswith("-") and Path(a).is_dir()]
    if corpus and not os.listdir(corpus[0]):
        for i, seed in enumerate(SEEDS):
            (corpus[0] / f"seed-{i}").write_bytes(b"\x01\x00\x00" + seed)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
