"""The site the security cases attack: one real ``mox serve`` for the whole session.

* domain ``local.test`` with the accounts ``admin`` (postmaster), ``u``, ``alice`` (password
  ``alice-pw``, may submit) and ``bob``;
* a DNS server on loopback: ``ext.test`` and ``bank.test`` have their MX on 127.0.0.1;
* Postfix's smtp-sink on a free port of 127.0.0.1 as every remote MX (``[testing]
  direct_smtp_port``), so whatever mox relays or sends out lands in its dump directory.

A case checks the reply, then proves that nothing was stored or sent by sending a marker
message after the attack and waiting for it (:meth:`Site.marker_inbound`,
:meth:`Site.marker_outbound`): once the marker arrived, anything the attack had caused would
have arrived before it, so the marker must be the only new message. Cases that kill the
server or change its limits start their own.
"""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from mox_testpeers.dnsserver import DNSServer
from mox_testpeers.moxserver import MoxServer
from mox_testpeers.sink import SmtpSink
from tests.security.smtpraw import client_tls, message, wait_for

DOMAINS = """\
[domains."local.test"]

[accounts.admin]
domain = "local.test"
[accounts.admin.destinations."admin@local.test"]

[accounts.u]
[accounts.u.destinations."u@local.test"]
[accounts.u.destinations."v@local.test"]

[accounts.alice]
[accounts.alice.destinations."alice@local.test"]

[accounts.bob]
[accounts.bob.destinations."bob@local.test"]
"""

STATIC = """\
[testing]
allow_private_targets = @PRIVATE@
direct_smtp_port = @SINKPORT@

[queue]
@QUEUE@
"""
QUEUE = "retry_intervals = [1.0]\nmax_attempts = 3"

ALICE_PW = "alice-pw"


class Site:
    def __init__(self, mox: MoxServer, dns: DNSServer, sink: SmtpSink) -> None:
        self.mox, self.dns, self.sink = mox, dns, sink

    @property
    def smtp_port(self) -> int:
        return self.mox.smtp_port

    @property
    def submission_port(self) -> int:
        return self.mox.submission_port

    def stored(self) -> dict[Path, bytes]:
        """Every message in every account's Maildir (all mailboxes), by path."""
        root = self.mox.data_dir / "accounts"
        out = {}
        for p in root.glob("*/Maildir/**/new/*") if root.exists() else []:
            try:
                out[p] = p.read_bytes()
            except FileNotFoundError:
                pass
        return out

    def sent(self) -> list:
        """Every transaction the sink (all remote MXs) received."""
        return self.sink.messages()

    def marker_inbound(self, before: dict[Path, bytes]) -> dict[Path, bytes]:
        """Send a marker to u@local.test over SMTP and wait for it; return what was stored
        since ``before``, the marker left out (so an attack that stored nothing gives {})."""
        subject = f"marker-{time.time_ns()}"
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=15) as s:
            s.sendmail("m@ext.test", ["u@local.test"], message(subject))
        new = wait_for(lambda: {p: d for p, d in self.stored().items() if p not in before and subject.encode() in d},
                       what="the marker message in u's Maildir")
        return {p: d for p, d in self.stored().items() if p not in before and p not in new}

    def marker_outbound(self, before: int) -> list:
        """Submit a marker to marker@ext.test as alice and wait for it at the sink; return the
        transactions the sink got since it had ``before``, the marker left out."""
        subject = f"outmarker-{time.time_ns()}"
        self.submit("alice@local.test", ["marker@ext.test"], message(subject, "alice@local.test", "marker@ext.test"))
        wait_for(lambda: any(subject in m.text for m in self.sent()), what="the marker at the sink")
        return [m for m in self.sent()[before:] if subject not in m.text]

    def submit(self, frm: str, to: list[str], data: bytes, user: str = "alice@local.test",
               password: str = ALICE_PW) -> None:
        with smtplib.SMTP("127.0.0.1", self.submission_port, timeout=15) as s:
            s.starttls(context=client_tls())
            s.login(user, password)
            s.sendmail(frm, to, data)

    def queue_list(self) -> str:
        return self.mox.mox("queue", "list").stdout


class TunedMox(MoxServer):
    """A MoxServer with extra keys in its ``[listeners.local]`` table (``listener_extra``)."""

    listener_extra: str = ""

    def write_config(self) -> None:
        super().write_config()
        if self.listener_extra:
            text = self.config_path.read_text()
            self.config_path.write_text(text.replace("[listeners.local.tls]", self.listener_extra.strip()
                                                     + "\n\n[listeners.local.tls]", 1))


def make_site(directory: Path, static_extra: str = "", static_top: str = "smtp_workers = 1\n",
              domains: str = DOMAINS, sink_options: dict | None = None,
              listener_extra: str = "", queue: str = QUEUE, allow_private_targets: bool = True,
              ) -> tuple[Site, list]:
    """Start DNS, the sink and mox; returns the site and what to stop afterwards."""
    started: list = []
    dns = DNSServer().start()
    started.append(dns)
    sink = SmtpSink(host="127.0.0.1", port=None, **(sink_options or {})).start()
    started.append(sink)
    for domain in ("ext.test", "bank.test"):
        dns.add(domain, "MX", f"10 mx.{domain}.")
        dns.add(f"mx.{domain}", "A", "127.0.0.1")
    TunedMox.listener_extra = listener_extra  # read by write_config, which __post_init__ calls
    mox = TunedMox(directory, domains=domains, nameserver=dns.nameserver, static_top=static_top,
                   static_extra=STATIC.replace("@SINKPORT@", str(sink.port)).replace("@QUEUE@", queue).replace(
                       "@PRIVATE@", str(allow_private_targets).lower()) + static_extra)
    TunedMox.listener_extra = ""
    mox.listener_extra = listener_extra
    mox.set_password("alice", ALICE_PW)
    mox.start()
    started.append(mox)
    return Site(mox, dns, sink), started


def stop_all(started: list) -> None:
    for peer in reversed(started):
        try:
            peer.cleanup() if hasattr(peer, "cleanup") else peer.stop()
        except Exception:  # teardown goes on
            pass


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    s, started = make_site(tmp_path_factory.mktemp("security") / "mox")
    yield s
    stop_all(started)


@pytest.fixture
def own_site(tmp_path):
    """``own_site(static_extra="", ...)``: a site of the test's own (it may kill or reconfigure it)."""
    started: list = []

    def make(**kw) -> Site:
        s, peers = make_site(tmp_path / f"mox{len(started)}", **kw)
        started.extend(peers)
        return s

    yield make
    stop_all(started)


# Hypothesis: a fixed, small, derandomized set of examples in CI (and by default); "long" for
# a longer random search by hand (HYPOTHESIS_PROFILE=long).
def _hypothesis_profiles() -> None:
    import os

    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", max_examples=5000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_hypothesis_profiles()
