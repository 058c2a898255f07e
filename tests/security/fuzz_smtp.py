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
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.security
from tests.security import memsession  # noqa: E402
from tests.security.memsession import Policy  # noqa: E402

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


class Finding(Exception):
    pass


class Store:
    def lookup(self, username: str):
        return CREDENTIALS if username in (USER, "alice") else None


LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(LOOP)


async def session(data: bytes, cuts: list[int]) -> tuple[bytes, list[bytes]]:
    policy = Policy()
    proto = MoxSMTP(policy, hostname="mx.test", max_message_size=4096, max_recipients=5,
                    credential_store=Store(), auth_require_tls=False, auth_failure_delay=0,
                    auth_limiter=AuthFailureLimiter(), idle_timeout=60, loop=LOOP)
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return await memsession.run_session(proto, chunks, quiet=20), policy.messages


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
