"""The outgoing SMTP client (mox_core.smtpclient): session, SASL, MX resolution, MTA-STS.

Peers: a scripted asyncio SMTP server (for what real servers will not do: inject bytes after
STARTTLS, count RCPTs per transaction, show the exact DATA bytes), the private Postfix
smarthost with Cyrus SASL and a Postfix MX (mox_testpeers fixtures), the loopback DNS
server, and an HTTPS server with a throwaway CA made by the openssl CLI. All on 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import scramp

from mox_core.plugins.kinds import DeliveryContext, DeliveryStatus, OutgoingMessage
from mox_core.smtpclient import sasl
from mox_core.smtpclient.client import Timeouts, open_client
from mox_core.smtpclient.dial import gather_ips, order_ips, refused_target
from mox_core.smtpclient.errors import SMTPClientError, SMTPTLSError
from mox_core.smtpclient.mtasts import HTTPSPolicyFetcher, MTASTSCache, Policy, PolicyError, parse_policy, parse_record
from mox_core.smtpclient.mx import NULL_MX_TEXT, deliver_to_host, deliver_via_mx, gather_destinations
from mox_core.smtpclient.sasl import AuthCredentials
from mox_core.smtpclient.sessions import SessionCache
from mox_core.smtpclient.tls import TLSMode
from mox_core.smtpclient.wire import Reply, parse_extensions, prepare_data
from mox_testpeers import wait_for

DELIVERED, TEMPORARY, PERMANENT = DeliveryStatus.DELIVERED, DeliveryStatus.TEMPORARY, DeliveryStatus.PERMANENT


# ============================================================================ helpers


@dataclass
class CA:
    dir: Path
    ca_file: str
    cert_file: str
    key_file: str

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory) -> CA:
    """Throwaway CA and one server certificate (openssl CLI; `cryptography` is not installed)."""
    d = tmp_path_factory.mktemp("ca")
    names = "DNS:localhost,DNS:mini.test,DNS:mta-sts.sts.test,DNS:mx.sts.test,IP:127.0.0.1"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-days", "30", "-subj", "/CN=mox test CA", "-keyout", "ca.key", "-out", "ca.crt",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (d / "ext.cnf").write_text(f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "30", "-extfile", "ext.cnf", "-out", "server.crt")
    return CA(d, str(d / "ca.crt"), str(d / "server.crt"), str(d / "server.key"))


class MiniSMTP:
    """Scripted SMTP server on loopback for client edge cases smtp-sink cannot produce.

    ``rcpt_reply(address, n)`` answers the n-th RCPT of the transaction (1-based);
    ``transactions`` records (MAIL line, accepted recipients, exact DATA bytes before the
    final ``.\\r\\n``, dot-stuffing included).
    """

    def __init__(self, *, extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME"),
                 tls_extensions: tuple[str, ...] | None = None, greeting: str = "220 mini.test ESMTP",
                 ehlo_reply: str | None = None, mail_reply: str = "250 2.1.0 ok",
                 rcpt_reply: Callable[[str, int], str] | None = None, final_reply: str = "250 2.0.0 queued",
                 tls_context: ssl.SSLContext | None = None, inject_after_starttls: bytes = b"",
                 auth: Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]] | None = None,
                 hang_after_data: bool = False, stop_reading_at_data: bool = False,
                 close_after: int | None = None, close_reply: str = "") -> None:
        self.extensions = extensions
        self.tls_extensions = tls_extensions
        self.greeting = greeting
        self.ehlo_reply = ehlo_reply
        self.mail_reply = mail_reply
        self.rcpt_reply = rcpt_reply
        self.final_reply = final_reply
        self.tls_context = tls_context
        self.inject = inject_after_starttls
        self.auth = auth
        self.hang_after_data = hang_after_data
        self.stop_reading_at_data = stop_reading_at_data  # after the 354: a stuck peer
        # after this many transactions on one connection, hang up right after the final reply
        # (with close_reply, e.g. a 421, sent in the same write): a server's idle timeout
        self.close_after = close_after
        self.close_reply = close_reply
        self.commands: list[str] = []
        self.transactions: list[tuple[str, list[str], bytes]] = []
        self.connections = 0
        self._stop = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.host, self.port = "", 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> MiniSMTP:
        self.server = await asyncio.start_server(self._serve, host, port)
        self.host, self.port = self.server.sockets[0].getsockname()[:2]
        return self

    async def stop(self) -> None:
        self._stop.set()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(*lines: str) -> None:
            writer.write("".join(line + "\r\n" for line in lines).encode())

        send(self.greeting)
        tls, mail, rcpts, n = False, "", [], 0
        while True:
            await writer.drain()
            raw = await reader.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\r\n")
            self.commands.append(line)
            verb = line.split(" ")[0].upper()
            if verb == "EHLO":
                if self.ehlo_reply:
                    send(self.ehlo_reply)
                    continue
                exts = list(self.tls_extensions if tls and self.tls_extensions is not None else self.extensions)
                if self.tls_context is not None and not tls:
                    exts.append("STARTTLS")
                lines = ["mini.test", *exts]
                send(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")
            elif verb == "HELO":
                send("250 mini.test")
            elif verb == "STARTTLS" and self.tls_context is not None:
                # one write: the 220 plus whatever a man in the middle injects (RFC 3207 §4.2)
                writer.write(b"220 2.0.0 ready\r\n" + self.inject)
                await writer.drain()
                await writer.start_tls(self.tls_context)
                tls = True
            elif verb == "MAIL":
                mail, rcpts, n = line, [], 0
                send(self.mail_reply)
            elif verb == "RCPT":
                n += 1
                addr = line[line.index("<") + 1:line.index(">")]
                reply = self.rcpt_reply(addr, n) if self.rcpt_reply else "250 2.1.5 ok"
                if reply.startswith("250"):
                    rcpts.append(addr)
                send(reply)
            elif verb == "DATA":
                if not mail or not rcpts or not self.mail_reply.startswith("250"):
                    send("554 5.5.1 no valid recipients")  # RFC 2920 §3.1
                    continue
                send("354 go ahead")
                await writer.drain()
                if self.stop_reading_at_data:
                    await self._stop.wait()
                    return
                data = b""
                while not (data.endswith(b"\r\n.\r\n") or data == b".\r\n"):
                    chunk = await reader.readline()
                    if not chunk:
                        return
                    data += chunk
                if self.hang_after_data:
                    await self._stop.wait()
                    return
                self.transactions.append((mail, rcpts, data[:-3]))
                mail, rcpts = "", []
                send(self.final_reply)
                done_here = getattr(writer, "_mini_done", 0) + 1
                writer._mini_done = done_here  # type: ignore[attr-defined]
                if self.close_after is not None and done_here >= self.close_after:
                    if self.close_reply:
                        send(self.close_reply)
                    await writer.drain()
                    return
            elif verb == "RSET":
                mail, rcpts = "", []
                send("250 2.0.0 ok")
            elif verb == "AUTH" and self.auth is not None:
                await self.auth(reader, writer, line)
            elif verb == "QUIT":
                send("221 2.0.0 bye")
                await writer.drain()
                return
            else:
                send("502 5.5.2 command not implemented")


@pytest.fixture
async def mini_factory():
    servers: list[MiniSMTP] = []

    async def make(**options) -> MiniSMTP:
        server = await MiniSMTP(**options).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        await s.stop()


async def session(server: MiniSMTP, **options):
    reader, writer = await server.connect()
    options.setdefault("remote_host", "mini.test")
    options.setdefault("ehlo_name", "client.test")
    return await open_client(reader, writer, **options)


MSG = b"From: a@example.org\r\nSubject: test\r\n\r\nhello\r\n"


# ============================================================================ pure parts


def test_prepare_data_dot_stuffing_and_terminator():
    assert prepare_data(b".a\r\nb\r\n..c\r\n.\r\n") == b"..a\r\nb\r\n...c\r\n..\r\n.\r\n"
    assert prepare_data(b"no final newline") == b"no final newline\r\n.\r\n"
    assert prepare_data(b"") == b".\r\n"


@pytest.mark.parametrize("data", [
    b"x\r.\r\nMAIL FROM:<ceo@bank.test>\r\n",  # SMTP smuggling: a bare CR before the dot
    b"a\n.\nb\r\n", b"a\n.\r\nb\r\n", b"a\r\n.\nb\r\n", b"a\rb\r\n", b"a\r\n.\r\r\nb\r\n", b"lf only\n",
    b"a\nb\rc\r\n", b"a\n\rb\r\n",  # as many CRs as LFs, but not all in pairs
])
def test_prepare_data_refuses_bare_cr_or_lf(data):
    with pytest.raises(ValueError, match="bare"):
        prepare_data(data)


def test_parse_extensions():
    ext = parse_extensions(["PIPELINING", "SIZE 1000", "8BITMIME", "smtputf8", "STARTTLS",
                            "AUTH SCRAM-SHA-256 plain", "LIMITS RCPTMAX=2 MAILMAX=5", "ENHANCEDSTATUSCODES"])
    assert (ext.pipelining, ext.size, ext.eightbitmime, ext.smtputf8, ext.starttls) == (True, 1000, True, True, True)
    assert ext.auth == ("SCRAM-SHA-256", "PLAIN") and ext.rcptmax == 2
    # RFC 9422: a malformed or duplicated LIMITS is ignored as a whole
    assert parse_extensions(["LIMITS RCPTMAX=0"]).rcptmax is None
    assert parse_extensions(["LIMITS RCPTMAX=2 RCPTMAX=3"]).rcptmax is None
    assert parse_extensions(["LIMITS RCPTMAX=1234567"]).rcptmax is None
    assert parse_extensions(["SIZE"]).size == 0


def test_reply_enhanced_code():
    r = Reply(550, ("5.1.1 no such user", "second line"))
    assert (r.enhanced_code, r.text) == ("5.1.1", "no such user second line")
    assert Reply(450, ("5.1.1 class mismatch",)).enhanced_code is None
    assert Reply(250, ("ok",)).enhanced_code is None


def test_cram_md5_rfc2195_example():
    m = sasl.CramMD5("tim", "tanstaaftanstaaf")
    assert m.initial() is None and not m.complete
    assert m.respond(b"<1896.697170952@postoffice.reston.mci.net>") == b"tim b913a602c7eda7a495b4e6e7334d3890"
    assert m.complete


@pytest.mark.parametrize("challenge", [b"", b"1896.697@host", b"<nodot@host>", b"<1.2>", b"<1.2@>"])
def test_cram_md5_invalid_challenge(challenge):
    with pytest.raises(sasl.SASLError, match="invalid challenge"):
        sasl.CramMD5("tim", "pw").respond(challenge)


@pytest.mark.parametrize("name", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_against_scramp_server(name):
    mech = scramp.ScramMechanism(name)
    salt, stored, server_key, iterations = mech.make_auth_info("pencil", iteration_count=4096)
    server = mech.make_server(lambda user: (salt, stored, server_key, iterations))
    client = sasl.Scram(name, "user", "pencil")
    server.set_client_first(client.initial().decode())
    final = client.respond(server.get_server_first().encode())
    server.set_client_final(final.decode())
    assert not client.complete
    assert client.respond(server.get_server_final().encode()) == b""
    assert client.complete


def test_scram_rejects_bad_server_signature_and_weak_parameters():
    mech = scramp.ScramMechanism("SCRAM-SHA-256")
    salt, stored, server_key, _ = mech.make_auth_info("right", iteration_count=4096)
    server = mech.make_server(lambda user: (salt, stored, server_key, 4096))
    client = sasl.Scram("SCRAM-SHA-256", "user", "wrong")
    server.set_client_first(client.initial().decode())
    client.respond(server.get_server_first().encode())
    with pytest.raises(sasl.SASLError):
        client.respond(b"v=" + base64.b64encode(b"x" * 32))
    assert not client.complete

    for first, why in [("r={n}abcdefgh,s={salt},i=1000", "iteration"), ("r={n}abcdefgh,s=c2FsdA==,i=4096", "salt"),
                       ("r={n}abc,s={salt},i=4096", "nonce"), ("m=x,r={n}abcdefgh,s={salt},i=4096", "mandatory")]:
        c = sasl.Scram("SCRAM-SHA-1", "user", "pw")
        c.initial()
        text = first.format(n=c._nonce, salt=base64.b64encode(b"saltsalt12").decode())
        with pytest.raises(sasl.SASLError, match=why):
            c.respond(text.encode())


def test_select_mechanism_order_default_and_plain_rules():
    creds = AuthCredentials("u", "p")
    offered = ["PLAIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"]
    assert sasl.select_mechanism(creds, offered, tls=True).name == "SCRAM-SHA-256"
    assert sasl.select_mechanism(creds, ["PLAIN", "cram-md5"], tls=True).name == "CRAM-MD5"
    # explicit list walked in order: the first offered wins, not the strongest
    pinned = AuthCredentials("u", "p", ["CRAM-MD5", "SCRAM-SHA-256"])
    assert sasl.select_mechanism(pinned, offered, tls=True).name == "CRAM-MD5"
    # PLAIN only when listed, never without TLS
    with pytest.raises(sasl.NoMatchingMechanism, match="no matching authentication mechanisms, server supports PLAIN, LOGIN"):
        sasl.select_mechanism(creds, ["PLAIN", "LOGIN"], tls=True)
    plain = AuthCredentials("u", "p", ["PLAIN"])
    assert sasl.select_mechanism(plain, ["PLAIN"], tls=True).initial() == b"\0u\0p"
    with pytest.raises(sasl.PlainWithoutTLS):
        sasl.select_mechanism(plain, ["PLAIN"], tls=False)
    with pytest.raises(ValueError, match="unknown"):
        sasl.select_mechanism(AuthCredentials("u", "p", ["LOGIN"]), ["LOGIN"], tls=True)


@pytest.mark.parametrize("ip, refused", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("10.0.0.5", "private"), ("192.168.1.1", "private"), ("172.16.0.1", "private"), ("fd00::1", "private"),
    ("100.64.1.1", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("::ffff:127.0.0.1", "loopback"),
    ("93.184.215.14", None), ("2606:2800:21f:cb07::1", None),  # public: allowed (no traffic here)
])
def test_refused_target(ip, refused):
    why = refused_target(ip)
    assert (why is None) if refused is None else (refused in why)


def test_order_ips_alternates_family_and_keeps_greylisting_ip():
    ips = ["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"]
    assert order_ips(ips, []) == ips
    # last time IPv4: IPv6 first now
    assert order_ips(ips, ["192.0.2.2"]) == ["2001:db8::1", "2001:db8::2", "192.0.2.2", "192.0.2.1"]
    # IPv4 dialed twice: no preference for the previous IPv4 address
    assert order_ips(ips, ["192.0.2.1", "192.0.2.2"]) == ["2001:db8::1", "2001:db8::2", "192.0.2.1", "192.0.2.2"]


def test_mtasts_parse_policy_and_matching():
    p = parse_policy("version: STSv1\r\nmode: enforce\r\nmx: mx1.example.org\r\nmx: *.mail.example.org\r\n"
                     "max_age: 86400\r\nextension: ignored\r\n")
    assert p == Policy(mode="enforce", max_age=86400, mx=("mx1.example.org", "*.mail.example.org"))
    assert p.matches("MX1.example.org.") and p.matches("a.mail.example.org")
    assert not p.matches("a.b.mail.example.org") and not p.matches("mail.example.org")
    assert not p.matches("mx2.example.org")
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mode == "none"
    for bad in ["mode: enforce\nmx: a\nmax_age: 1", "version: STSv1\nmode: strict\nmx: a\nmax_age: 1",
                "version: STSv1\nmode: enforce\nmax_age: 1", "version: STSv1\nmode: enforce\nmx: a\nmax_age: x",
                "version: STSv1\nmode: enforce\nmx: a\nmax_age: 99999999999"]:
        with pytest.raises(PolicyError):
            parse_policy(bad)
    assert parse_record("v=STSv1; id=20160831085700Z;") == "20160831085700Z"
    for bad in ["v=STSv2; id=1", "v=STSv1;", "v=STSv1; id=has-dash", "id=1; v=STSv1"]:
        with pytest.raises(PolicyError):
            parse_record(bad)


# ============================================================================ session edge cases (scripted server)


async def test_starttls_response_injection_is_discarded(mini_factory, test_ca):
    """RFC 3207 §4.2: bytes after the 220 to STARTTLS never count as replies inside TLS."""
    server = await mini_factory(extensions=("8BITMIME",), tls_extensions=("8BITMIME", "SIZE 100000"),
                                tls_context=test_ca.server_context(),
                                inject_after_starttls=b"250-PIPELINING\r\n250 AUTH PLAIN\r\n")
    client = await session(server)
    assert client.tls_active
    # the capabilities are those of the EHLO inside TLS, not the injected lines
    assert client.extensions.auth == () and not client.extensions.pipelining
    assert client.extensions.size == 100000
    assert [c.split()[0] for c in server.commands] == ["EHLO", "STARTTLS", "EHLO"]
    results = await client.deliver("a@example.org", ["b@example.net"], MSG)
    await client.quit()
    assert [r.status for r in results] == [DELIVERED]
    assert server.transactions[0][0] == f"MAIL FROM:<a@example.org> SIZE={len(MSG)} BODY=7BIT"


async def test_opportunistic_tls_not_verified_and_required_verified(mini_factory, test_ca):
    server = await mini_factory(tls_context=test_ca.server_context())
    client = await session(server, tls_mode=TLSMode.OPPORTUNISTIC)  # test CA unknown: still fine
    assert client.tls_active and not client.tls_verified
    await client.quit()
    with pytest.raises(SMTPTLSError, match="certificate verification failed") as exc:
        await session(server, tls_mode=TLSMode.REQUIRED_VERIFIED)
    assert not exc.value.permanent
    client = await session(server, tls_mode=TLSMode.REQUIRED_VERIFIED, ca_file=test_ca.ca_file)
    assert client.tls_verified
    await client.quit()
    # STARTTLS required but not offered: a temporary TLS error, nothing sent in the clear
    plain = await mini_factory()
    with pytest.raises(SMTPTLSError, match="STARTTLS refused"):
        await session(plain, tls_mode=TLSMode.REQUIRED_UNVERIFIED)
    assert "MAIL" not in " ".join(plain.commands)


async def test_helo_fallback(mini_factory):
    server = await mini_factory(ehlo_reply="502 5.5.2 EHLO not implemented")
    client = await session(server)
    assert not client.extensions.esmtp
    await client.deliver("a@example.org", ["b@example.net"], MSG, has_8bit=True)
    await client.quit()
    assert [c.split()[0] for c in server.commands[:2]] == ["EHLO", "HELO"]
    assert server.transactions[0][0] == "MAIL FROM:<a@example.org>"  # no SIZE/BODY without ESMTP


async def test_exact_data_bytes_are_dot_stuffed(mini_factory):
    server = await mini_factory()
    client = await session(server)
    data = b"Subject: dots\r\n\r\n.\r\n..two\r\n. space\r\nend"
    await client.deliver("a@example.org", ["b@example.net"], data)
    await client.deliver("", ["b@example.net"], MSG)  # the null sender of DSNs, same connection
    await client.quit()
    assert server.transactions[0][2] == b"Subject: dots\r\n\r\n..\r\n...two\r\n.. space\r\nend\r\n"
    assert server.transactions[1][0] == "MAIL FROM:<> BODY=7BIT" and server.connections == 1


async def test_bare_lf_is_refused_before_any_command(mini_factory):
    server = await mini_factory()
    client = await session(server)
    with pytest.raises(SMTPClientError, match="bare newline") as exc:
        await client.deliver("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\na\n.\nMAIL FROM:<x@y>\r\n")
    await client.quit()
    assert exc.value.permanent
    assert not any(c.startswith("MAIL") for c in server.commands)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_rcptmax_batches_and_452_starts_new_transaction(mini_factory, pipelining):
    """RFC 5321 §4.5.3.1.10 / RFC 9422: at most RCPTMAX per transaction, 452 on a later RCPT
    means "the rest in another transaction" on the same connection."""
    exts = ("LIMITS RCPTMAX=3",) + (("PIPELINING",) if pipelining else ())
    server = await mini_factory(extensions=exts,
                                rcpt_reply=lambda addr, n: "452 4.5.3 too many recipients" if n == 3 else "250 ok")
    client = await session(server)
    rcpts = [f"r{i}@example.net" for i in range(1, 6)]
    results = await client.deliver("a@example.org", rcpts, MSG)
    await client.quit()
    assert [r.recipient for r in results] == rcpts
    assert all(r.status is DELIVERED for r in results), results
    assert [t[1] for t in server.transactions] == [rcpts[0:2], rcpts[2:4], rcpts[4:5]]
    assert server.connections == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_per_recipient_results(mini_factory, pipelining):
    replies = {"ok@x.test": "250 2.1.5 ok", "gone@x.test": "550 5.1.1 no such user",
               "full@x.test": "450 4.2.2 mailbox full", "ok2@x.test": "250 2.1.5 ok"}
    server = await mini_factory(extensions=("PIPELINING",) if pipelining else (),
                                rcpt_reply=lambda addr, n: replies[addr])
    client = await session(server)
    results = await client.deliver("a@example.org", list(replies), MSG)
    await client.quit()
    got = {r.recipient: (r.status, r.code, r.enhanced_code) for r in results}
    assert got == {"ok@x.test": (DELIVERED, 250, "2.0.0"), "gone@x.test": (PERMANENT, 550, "5.1.1"),
                   "full@x.test": (TEMPORARY, 450, "4.2.2"), "ok2@x.test": (DELIVERED, 250, "2.0.0")}
    assert server.transactions[0][1] == ["ok@x.test", "ok2@x.test"]
    assert all(r.remote_host == "mini.test" for r in results)


async def test_all_recipients_refused_no_data_then_rset(mini_factory):
    server = await mini_factory(extensions=(), rcpt_reply=lambda a, n: "550 5.1.1 unknown" if n == 1 else "452 4.5.3 later")
    client = await session(server)
    results = await client.deliver("a@example.org", ["a@x.test"], MSG)
    assert [(r.status, r.code) for r in results] == [(PERMANENT, 550)]
    # a second message on the same connection starts with RSET (the first transaction was open)
    results = await client.deliver("a@example.org", ["b@x.test"], MSG)
    await client.quit()
    assert [(r.status, r.code) for r in results] == [(PERMANENT, 550)]
    assert "RSET" in server.commands and "DATA" not in server.commands


@pytest.mark.parametrize("reply, permanent", [("550 5.7.1 sender refused", True), ("451 4.3.0 try later", False)])
async def test_mail_from_refused(mini_factory, reply, permanent):
    server = await mini_factory(mail_reply=reply)
    client = await session(server)
    with pytest.raises(SMTPClientError) as exc:
        await client.deliver("a@example.org", ["b@x.test", "c@x.test"], MSG)
    await client.quit()
    assert exc.value.permanent is permanent and exc.value.code == int(reply[:3])
    assert exc.value.command == "mail" and exc.value.remote_host == "mini.test"


async def test_size_smtputf8_8bitmime_rules(mini_factory):
    server = await mini_factory(extensions=("SIZE 50", "PIPELINING"))
    client = await session(server)
    with pytest.raises(SMTPClientError, match="exceeds") as exc:
        await client.deliver("a@example.org", ["b@x.test"], b"x" * 60 + b"\r\n")
    assert exc.value.permanent
    with pytest.raises(SMTPClientError, match="SMTPUTF8") as exc:
        await client.deliver("a@example.org", ["bé@x.test"], b"x\r\n")
    assert not exc.value.permanent
    with pytest.raises(SMTPClientError, match="8BITMIME") as exc:
        await client.deliver("a@example.org", ["b@x.test"], b"\xc3\xa9\r\n", has_8bit=True, require_8bitmime=True)
    assert exc.value.permanent
    # direct delivery sends 8-bit anyway; an IDN domain goes out as A-label without SMTPUTF8
    await client.deliver("a@example.org", ["b@bücher.test"], b"\xc3\xa9\r\n", has_8bit=True)
    await client.quit()
    assert sum(c.startswith("MAIL") for c in server.commands) == 1
    assert server.transactions == [("MAIL FROM:<a@example.org> SIZE=4", ["b@xn--bcher-kva.test"], b"\xc3\xa9\r\n")]

    utf8 = await mini_factory(extensions=("SMTPUTF8", "8BITMIME"))
    client = await session(utf8)
    await client.deliver("a@example.org", ["bé@x.test"], b"\xc3\xa9\r\n", has_8bit=True)
    await client.quit()
    assert utf8.transactions[0][0] == "MAIL FROM:<a@example.org> BODY=8BITMIME SMTPUTF8"


async def test_greeting_5xx_and_timeouts_and_lost_connection(mini_factory):
    server = await mini_factory(greeting="554 5.3.2 no service")
    with pytest.raises(SMTPClientError) as exc:
        await session(server)
    assert exc.value.permanent and exc.value.command == "greeting" and exc.value.code == 554

    slow = await mini_factory(hang_after_data=True)
    client = await session(slow, timeouts=Timeouts(data=0.3))
    with pytest.raises(SMTPClientError, match="timeout") as exc:
        await client.deliver("a@example.org", ["b@x.test"], MSG)
    await client.close()
    assert not exc.value.permanent

    # a peer that stops reading: the message fills the socket buffers, and the write of the
    # rest times out instead of waiting for ever
    stuck = await mini_factory(stop_reading_at_data=True)
    client = await session(stuck, timeouts=Timeouts(data=0.5))
    big = b"From: a@example.org\r\n\r\n" + (b"x" * 998 + b"\r\n") * 16_000
    with pytest.raises(SMTPClientError, match="timeout writing message data") as exc:
        await client.deliver("a@example.org", ["b@x.test"], big)
    await client.close()
    assert not exc.value.permanent

    async def close_on_auth(reader, writer, line):
        writer.close()

    gone = await mini_factory(extensions=("AUTH CRAM-MD5",), auth=close_on_auth)
    with pytest.raises(SMTPClientError, match="connection closed") as exc:
        await session(gone, auth=AuthCredentials("u", "p"))
    assert not exc.value.permanent


async def test_auth_protocol_errors(mini_factory):
    async def bad_base64(reader, writer, line):
        writer.write(b"334 !!!notbase64\r\n")
        await writer.drain()
        assert (await reader.readline()) == b"*\r\n"
        writer.write(b"501 5.7.0 aborted\r\n")

    server = await mini_factory(extensions=("AUTH CRAM-MD5",), auth=bad_base64)
    with pytest.raises(SMTPClientError, match="client aborted authentication: malformed base64") as exc:
        await session(server, auth=AuthCredentials("u", "p"))
    assert exc.value.permanent

    async def early_success(reader, writer, line):
        writer.write(b"235 2.7.0 fine, no proof needed\r\n")

    server = await mini_factory(extensions=("AUTH SCRAM-SHA-256",), auth=early_success)
    with pytest.raises(SMTPClientError, match="earlier than client expected"):
        await session(server, auth=AuthCredentials("u", "p"))

    async def cram(reader, writer, line):
        challenge = b"<12345.678@mini.test>"
        writer.write(b"334 " + base64.b64encode(challenge) + b"\r\n")
        await writer.drain()
        user, digest = base64.b64decode(await reader.readline()).split()
        ok = digest.decode() == hmac.new(b"pw", challenge, hashlib.md5).hexdigest()
        writer.write(b"235 2.7.0 ok\r\n" if ok and user == b"u" else b"535 5.7.8 bad\r\n")

    server = await mini_factory(extensions=("AUTH CRAM-MD5 PLAIN",), auth=cram)
    client = await session(server, auth=AuthCredentials("u", "pw"))
    assert client.authenticated
    await client.quit()
    with pytest.raises(SMTPClientError, match="535") as exc:
        await session(server, auth=AuthCredentials("u", "wrong"))
    assert exc.value.permanent

    # PLAIN offered, but no TLS: the password is never sent
    server = await mini_factory(extensions=("AUTH PLAIN",), auth=cram)
    with pytest.raises(SMTPClientError, match="without TLS") as exc:
        await session(server, auth=AuthCredentials("u", "pw", ["PLAIN"]))
    assert not exc.value.permanent
    assert not any(c.startswith("AUTH") for c in server.commands)


# ============================================================================ against Postfix with Cyrus SASL


def _smarthost_session(sh, **options):
    async def go():
        reader, writer = await asyncio.open_connection(sh.host, sh.port)
        options.setdefault("tls_mode", TLSMode.REQUIRED_VERIFIED)
        return await open_client(reader, writer, remote_host="localhost", ehlo_name="client.test",
                                 ca_file=sh.cafile, **options)
    return go()


@pytest.fixture(scope="module")
def smarthost():
    """One private Postfix smarthost for this module (starting one takes a while)."""
    from mox_testpeers.postfix import PostfixSmarthost

    sh = PostfixSmarthost(implicit_tls=True).start()
    yield sh
    sh.cleanup()


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN"])
async def test_sasl_mechanisms_against_postfix(smarthost, mech):
    client = await _smarthost_session(smarthost, auth=AuthCredentials("alice", "secret-pw", [mech]))
    assert client.authenticated and client.tls_verified
    subject = f"via {mech}"
    results = await client.deliver("a@example.org", ["b@example.net"],
                                   f"Subject: {subject}\r\n\r\nhello\r\n".encode())
    await client.quit()
    assert [r.status for r in results] == [DELIVERED]
    # Maildir delivery and postlogd are asynchronous: poll
    wait_for(lambda: f"sasl_method={mech}, sasl_username=alice@" in smarthost.log_text(), 10, what="log line")
    wait_for(lambda: any(m.message["Subject"] == subject for m in smarthost.messages()), 10, what=subject)


async def test_sasl_default_prefers_scram_sha_256_and_wrong_password(smarthost):
    client = await _smarthost_session(smarthost, auth=AuthCredentials("alice", "secret-pw"))
    assert client.authenticated
    await client.quit()
    with pytest.raises(SMTPClientError) as exc:
        await _smarthost_session(smarthost, auth=AuthCredentials("alice", "wrong"))
    assert exc.value.permanent and exc.value.code == 535 and exc.value.command == "auth"


async def test_postfix_no_auth_before_tls_and_implicit_tls(smarthost):
    # smtpd_tls_auth_only: no AUTH offered in plaintext -> permanent "no matching" error
    with pytest.raises(SMTPClientError, match="no matching authentication mechanisms, server supports none") as exc:
        await _smarthost_session(smarthost, tls_mode=TLSMode.SKIP, auth=AuthCredentials("alice", "secret-pw"))
    assert exc.value.permanent
    # immediate TLS on the 465-style port, verified against the test CA
    reader, writer = await asyncio.open_connection(smarthost.host, smarthost.tls_port)
    client = await open_client(reader, writer, remote_host="localhost", ehlo_name="client.test",
                               tls_mode=TLSMode.IMMEDIATE, ca_file=smarthost.cafile,
                               auth=AuthCredentials("alice", "secret-pw"))
    assert client.tls_verified and client.authenticated
    await client.quit()
    # the wrong name: verification fails
    with pytest.raises(SMTPTLSError, match="verification"):
        reader, writer = await asyncio.open_connection(smarthost.host, smarthost.port)
        await open_client(reader, writer, remote_host="smtp.elsewhere.test", ehlo_name="client.test",
                          tls_mode=TLSMode.REQUIRED_VERIFIED, ca_file=smarthost.cafile)


async def test_deliver_to_host_smarthost(smarthost, dns_server, dns_resolver):
    """The smtp/submission transports' path: one named host, required verified TLS, AUTH."""
    dns_server.add("localhost", "A", "127.0.0.1")
    msg = OutgoingMessage("a@example.org", ["x@example.net", "y@example.net"],
                          b"Subject: via deliver_to_host\r\n\r\n\xc3\xa9\r\n", has_8bit=True)
    results = await deliver_to_host(msg, host="localhost", port=smarthost.port, ehlo_name="client.test",
                                    resolver=dns_resolver, tls_mode=TLSMode.REQUIRED_VERIFIED,
                                    ca_file=smarthost.cafile, auth=AuthCredentials("alice", "secret-pw"))
    assert [(r.status, r.remote_host) for r in results] == [(DELIVERED, "localhost")] * 2
    wait_for(lambda: any(m.message["Subject"] == "via deliver_to_host" for m in smarthost.messages()), 10,
             what="message at the smarthost")
    # without credentials Postfix refuses the recipients (relay denied): per-recipient 554s
    results = await deliver_to_host(msg, host="localhost", port=smarthost.port, ehlo_name="client.test",
                                    resolver=dns_resolver, tls_mode=TLSMode.REQUIRED_VERIFIED,
                                    ca_file=smarthost.cafile)
    assert [(r.status, r.code) for r in results] == [(PERMANENT, 554)] * 2
    # an unknown host name: a temporary error per recipient, not an exception
    results = await deliver_to_host(msg, host="nowhere.test", port=25, ehlo_name="client.test",
                                    resolver=dns_resolver, tls_mode=TLSMode.REQUIRED_VERIFIED)
    assert [r.status for r in results] == [TEMPORARY] * 2 and "nowhere.test" in results[0].text


async def test_session_cache_delivers_several_messages_over_one_session(mini_factory, dns_server, dns_resolver):
    """With the queue's SessionCache, the next message to the same smarthost goes over the
    session of the previous one (no new connection, EHLO once), and closing the cache QUITs."""
    server = await mini_factory()
    dns_server.add("mini.test", "A", server.host)
    cache = SessionCache()
    for i in range(3):
        msg = OutgoingMessage("a@example.org", [f"r{i}@example.net"], MSG)
        [r] = await deliver_to_host(msg, host="mini.test", port=server.port, ehlo_name="client.test",
                                    resolver=dns_resolver, tls_mode=TLSMode.SKIP, sessions=cache, session_key="k")
        assert r.status is DELIVERED, r
    assert server.connections == 1 and cache.reused == 2
    assert [rcpts for _, rcpts, _ in server.transactions] == [[f"r{i}@example.net"] for i in range(3)]
    assert sum(c.startswith("EHLO") for c in server.commands) == 1 and "QUIT" not in server.commands
    # another key (other settings): its own session
    [r] = await deliver_to_host(OutgoingMessage("a@example.org", ["o@example.net"], MSG), host="mini.test",
                                port=server.port, ehlo_name="client.test", resolver=dns_resolver,
                                tls_mode=TLSMode.SKIP, sessions=cache, session_key="other")
    assert r.status is DELIVERED and server.connections == 2
    await cache.aclose()
    assert server.commands.count("QUIT") == 2


@pytest.mark.parametrize("close_reply", ["421 4.4.2 mini.test idle timeout, closing", ""])
async def test_session_closed_by_the_server_meanwhile_message_goes_over_a_new_one(
        mini_factory, dns_server, dns_resolver, close_reply):
    """The server hung up a kept session (with a 421, or silently): the next message is
    delivered over a new session, exactly once; nothing was sent on the dead one but MAIL."""
    server = await mini_factory(close_after=1, close_reply=close_reply)
    dns_server.add("mini.test", "A", server.host)
    cache = SessionCache()
    for i in range(2):
        msg = OutgoingMessage("a@example.org", [f"r{i}@example.net"], MSG)
        [r] = await deliver_to_host(msg, host="mini.test", port=server.port, ehlo_name="client.test",
                                    resolver=dns_resolver, tls_mode=TLSMode.SKIP, sessions=cache, session_key="k")
        assert r.status is DELIVERED, r
    assert server.connections == 2
    assert [rcpts for _, rcpts, _ in server.transactions] == [["r0@example.net"], ["r1@example.net"]]
    if close_reply:  # the 421 was still unread: the kept session was tried, and given up at MAIL
        assert cache.reused == 1
    await cache.aclose()


# ============================================================================ MX resolution


async def test_gather_destinations_mx_order_cname_nullmx(dns_server, dns_resolver):
    dns_server.add("dest.test", "MX", "20 mx2.dest.test.")
    dns_server.add("dest.test", "MX", "10 mx1.dest.test.")
    for i in range(3):
        dns_server.add("dest.test", "MX", f"30 eq{i}.dest.test.")
    d = await gather_destinations(dns_resolver, "Dest.Test")
    assert d.hosts[:2] == ("mx1.dest.test", "mx2.dest.test")
    assert set(d.hosts[2:]) == {"eq0.dest.test", "eq1.dest.test", "eq2.dest.test"}
    orders = {(await gather_destinations(dns_resolver, "dest.test")).hosts[2:] for _ in range(30)}
    assert len(orders) > 1  # equal preferences in random order

    dns_server.add("alias.test", "CNAME", "alias2.test.")
    dns_server.add("alias2.test", "CNAME", "dest.test.")
    d = await gather_destinations(dns_resolver, "alias.test")
    assert (d.domain, d.expanded, d.hosts[0]) == ("alias.test", "dest.test", "mx1.dest.test")

    dns_server.add("loop1.test", "CNAME", "loop2.test.")
    dns_server.add("loop2.test", "CNAME", "loop1.test.")
    with pytest.raises(SMTPClientError, match="cname loop") as exc:
        await gather_destinations(dns_resolver, "loop1.test")
    assert not exc.value.permanent
    for i in range(17):
        dns_server.add(f"c{i}.test", "CNAME", f"c{i + 1}.test.")
    with pytest.raises(SMTPClientError, match="too many cname records"):
        await gather_destinations(dns_resolver, "c0.test")

    dns_server.add_null_mx("nomail.test")
    with pytest.raises(SMTPClientError) as exc:
        await gather_destinations(dns_resolver, "nomail.test")
    assert exc.value.permanent and exc.value.text == NULL_MX_TEXT

    dns_server.add("implicit.test", "A", "192.0.2.1")
    d = await gather_destinations(dns_resolver, "implicit.test")
    assert d.implicit_mx and d.hosts == ("implicit.test",)

    with pytest.raises(SMTPClientError, match="does not exist") as exc:
        await gather_destinations(dns_resolver, "nonexistent.test")
    assert exc.value.permanent

    dns_server.fail("broken.test", "MX", "SERVFAIL")
    with pytest.raises(SMTPClientError, match="SERVFAIL") as exc:
        await gather_destinations(dns_resolver, "broken.test")
    assert not exc.value.permanent

    d = await gather_destinations(dns_resolver, "[192.0.2.7]")
    assert d.ip_literal == "192.0.2.7" and d.hosts == ("192.0.2.7",)
    assert (await gather_destinations(dns_resolver, "[IPv6:2001:db8::1]")).ip_literal == "2001:db8::1"


async def test_gather_ips_families(dns_server, dns_resolver):
    dns_server.add("h.test", "A", "192.0.2.1")
    dns_server.add("h.test", "AAAA", "2001:db8::1")
    assert await gather_ips(dns_resolver, "h.test") == ["192.0.2.1", "2001:db8::1"]
    assert await gather_ips(dns_resolver, "h.test", ipv4=False) == ["2001:db8::1"]
    assert await gather_ips(dns_resolver, "h.test", ipv6=False) == ["192.0.2.1"]
    dns_server.add("v6only.test", "AAAA", "2001:db8::2")
    with pytest.raises(SMTPClientError, match="no A records") as exc:
        await gather_ips(dns_resolver, "v6only.test", ipv6=False)
    assert not exc.value.permanent


# ============================================================================ MTA-STS


class PolicyServer:
    """HTTPS on loopback serving /.well-known/mta-sts.txt with the test CA's certificate.

    Whatever goes wrong while serving a request (an unexpected request line, a client that
    went away) is kept in ``errors``; the fixture fails the test with them."""

    def __init__(self, ca: CA, body: str, status: str = "200 OK", ctype: str = "text/plain") -> None:
        self.ca, self.body, self.status, self.ctype = ca, body, status, ctype
        self.hits = 0
        self.errors: list[str] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> PolicyServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ca.server_context())
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            if not request.startswith(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\n"):
                self.errors.append(f"unexpected request {request!r}")
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            if b"\r\nhost: mta-sts." not in request.lower():
                self.errors.append(f"request without the policy host (RFC 8461 §3.3): {request!r}")
            self.hits += 1
            body = self.body.encode()
            writer.write(f"HTTP/1.1 {self.status}\r\nContent-Type: {self.ctype}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except Exception as exc:
            self.errors.append(f"serving a request: {exc!r}")
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


POLICY = "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n"


@pytest.fixture
async def policy_server(test_ca):
    server = await PolicyServer(test_ca, POLICY).start()
    yield server
    await server.stop()
    if server.errors:
        pytest.fail("the MTA-STS policy server: " + "; ".join(server.errors), pytrace=False)


def _fetcher(server: PolicyServer, ca: CA) -> HTTPSPolicyFetcher:
    return HTTPSPolicyFetcher(port=server.port, ca_file=ca.ca_file, allow_private=True, timeout=5)


async def test_mtasts_fetch_cache_refresh_and_persist(dns_server, dns_resolver, policy_server, test_ca, tmp_path):
    dns_server.add("_mta-sts.sts.test", "TXT", "v=STSv1; id=one;")
    dns_server.add("mta-sts.sts.test", "A", "127.0.0.1")
    now = [1000.0]
    cache = MTASTSCache(_fetcher(policy_server, test_ca), data_dir=tmp_path, clock=lambda: now[0])
    policy = await cache.get("sts.test", dns_resolver)
    assert policy == Policy(mode="enforce", max_age=86400, mx=("mx.sts.test",))
    assert await cache.get("sts.test", dns_resolver) == policy and policy_server.hits == 1
    # a new id means a new policy (RFC 8461 §5.1)
    dns_server.set("_mta-sts.sts.test", "TXT", ["v=STSv1; id=two;"])
    policy_server.body = POLICY.replace("enforce", "testing")
    assert (await cache.get("sts.test", dns_resolver)).mode == "testing" and policy_server.hits == 2
    # persisted: a new cache (restart) does not fetch while the id is unchanged
    cache2 = MTASTSCache(_fetcher(policy_server, test_ca), data_dir=tmp_path, clock=lambda: now[0])
    assert (await cache2.get("sts.test", dns_resolver)).mode == "testing" and policy_server.hits == 2
    # TXT lookup failing: the cached policy is used; expired and failing: a temporary error
    dns_server.fail("_mta-sts.sts.test", "TXT", "SERVFAIL")
    assert (await cache2.get("sts.test", dns_resolver)).mode == "testing"
    now[0] += 86401
    with pytest.raises(SMTPClientError, match="mta-sts") as exc:
        await cache2.get("sts.test", dns_resolver)
    assert not exc.value.permanent
    # no record at all: no policy
    dns_server.clear_failures()
    dns_server.remove("_mta-sts.sts.test")
    assert await cache2.get("sts.test", dns_resolver) is None


@pytest.mark.parametrize("status, ctype", [("404 Not Found", "text/plain"), ("301 Moved", "text/plain"),
                                           ("200 OK", "text/html")])
async def test_mtasts_bad_http_response_means_no_policy(dns_server, dns_resolver, policy_server, test_ca,
                                                         status, ctype):
    dns_server.add("_mta-sts.sts.test", "TXT", "v=STSv1; id=one;")
    dns_server.add("mta-sts.sts.test", "A", "127.0.0.1")
    policy_server.status, policy_server.ctype = status, ctype
    cache = MTASTSCache(_fetcher(policy_server, test_ca))
    assert await cache.get("sts.test", dns_resolver) is None and policy_server.hits == 1
    # and an untrusted certificate: the fetch fails before any request
    untrusted = MTASTSCache(HTTPSPolicyFetcher(port=policy_server.port, allow_private=True, timeout=5))
    assert await untrusted.get("sts.test", dns_resolver) is None and policy_server.hits == 1


def _ctx(resolver) -> DeliveryContext:
    return DeliveryContext(transport_name="", attempt=0, hostname="mail.example.org", resolver=resolver)


async def test_mtasts_enforce_skips_other_mx_and_requires_verified_tls(
        dns_server, dns_resolver, policy_server, test_ca, smtp_sink_factory, postfix_mx_factory):
    """RFC 8461 §5: in enforce mode only policy hosts are used, with a verified certificate."""
    sink = smtp_sink_factory(host=None, port=25)  # mx.other.test: not in the policy
    # mx.sts.test, certificate from its own CA; the Received header says whether TLS was used
    mx = postfix_mx_factory("sts.test", main_cf={"smtpd_tls_received_header": "yes"})
    dns_server.add("sts.test", "MX", "10 mx.other.test.")
    dns_server.add("sts.test", "MX", "20 mx.sts.test.")
    dns_server.add("mx.other.test", "A", sink.host)
    dns_server.add("mx.sts.test", "A", mx.host)
    dns_server.add("_mta-sts.sts.test", "TXT", "v=STSv1; id=one;")
    dns_server.add("mta-sts.sts.test", "A", "127.0.0.1")
    cache = MTASTSCache(_fetcher(policy_server, test_ca))
    msg = OutgoingMessage("a@example.org", ["bob@sts.test"], b"Subject: sts\r\n\r\nx\r\n")

    # the Postfix MX's CA is not trusted: verification fails, and no plaintext retry
    results = await deliver_via_mx(msg, _ctx(dns_resolver), allow_private=True, mtasts=cache)
    assert [r.status for r in results] == [TEMPORARY]
    assert "verification failed" in results[0].text and results[0].remote_host == "mx.sts.test"
    assert sink.count == 0 and mx.messages() == []

    results = await deliver_via_mx(msg, _ctx(dns_resolver), allow_private=True, mtasts=cache,
                                   tls_ca_file=mx.cafile)
    assert [(r.status, r.remote_host) for r in results] == [(DELIVERED, "mx.sts.test")]
    [got] = mx.wait_for_messages(1)
    assert got.message["Subject"] == "sts"
    assert "using TLS" in got.text
    assert sink.count == 0

    # only the non-policy host exists: skipped with the mox error text
    dns_server.set("sts.test", "MX", ["10 mx.other.test."])
    results = await deliver_via_mx(msg, _ctx(dns_resolver), allow_private=True, mtasts=cache)
    assert results[0].status is TEMPORARY
    assert results[0].text == "mx host mx.other.test does not match enforced mta-sts policy with hosts mx.sts.test"
    assert sink.count == 0

    # testing mode: delivered anyway (and opportunistic TLS: smtp-sink has none)
    dns_server.set("_mta-sts.sts.test", "TXT", ["v=STSv1; id=two;"])
    policy_server.body = POLICY.replace("enforce", "testing")
    results = await deliver_via_mx(msg, _ctx(dns_resolver), allow_private=True, mtasts=cache)
    assert [(r.status, r.remote_host) for r in results] == [(DELIVERED, "mx.other.test")]
    assert sink.wait_for_messages(1)[0].rcpt_to == ["bob@sts.test"]


async def test_deliver_via_mx_custom_dialer_and_port(dns_server, dns_resolver, mini_factory):
    """The socks transport reuses the loop with its own dialer: it sees host, ip, port."""
    server = await mini_factory()
    dns_server.add("dest.test", "MX", "10 mx.dest.test.")
    dns_server.add("mx.dest.test", "A", "11.22.33.44")  # never dialed for real
    calls = []

    async def dial(host: str, ip: str, port: int, timeout: float):
        calls.append((host, ip, port))
        return await asyncio.open_connection(server.host, server.port)

    msg = OutgoingMessage("a@example.org", ["b@dest.test"], MSG)
    results = await deliver_via_mx(msg, _ctx(dns_resolver), dial=dial, ehlo_name="proxy.example.org", port=2525)
    assert [r.status for r in results] == [DELIVERED]
    assert calls == [("mx.dest.test", "11.22.33.44", 2525)]
    assert server.commands[0] == "EHLO proxy.example.org"
