"""Routes: evaluation order, per-attempt evaluation, reload, overrides, explain."""

from __future__ import annotations

import copy
import dataclasses
import os

import click
import pytest
from click.testing import CliRunner

from mox_core.builtin.route_matchers import domain_matches, mox_register_route_matchers, parse_domain_list
from mox_core.cli.main import cli
from mox_core.cli.queue import register
from mox_core.config.holder import ConfigHolder
from mox_core.outgoing.routing import TransportCache, TransportUnavailable, explain, resolve, route_context
from mox_core.queue import Filter
from tests.plugins import queue_scripted
from tests.plugins.queue_helpers import MSG, maildir_new, make_config, make_host, running
from tests.plugins.queue_scripted import SCRIPT, P, T

ROUTES = """\
[[accounts.alice.routes]]
to_domain = ["acct.example"]
transport = "relay"

[[domains."example.org".routes]]
to_domain = [".dom.example"]
transport = "backup"

[[domains."example.org".routes]]
to_domain = ["acct.example", "dom.example"]
transport = "relay"

[[routes]]
minimum_attempts = 3
transport = "relay"

[[routes]]
from_domain = ["example.org"]
transport = "backup"
"""


@pytest.fixture(autouse=True)
def _reset_script():
    SCRIPT.reset()
    queue_scripted.BUILT.clear()
    yield
    SCRIPT.reset()


@pytest.fixture
def cfg(tmp_path):
    return make_config(tmp_path, domains=ROUTES)


def pick(cfg, to, attempts=0, sender="alice@example.org", account="alice", override=None):
    ctx = route_context(mail_from=sender, recipient=to, attempts=attempts, account=account)
    r = resolve(cfg, ctx, override)
    return (r.name, r.source, r.route.where if r.route else None)


def test_account_then_sender_domain_then_global_first_match_wins(cfg):
    assert pick(cfg, "x@acct.example") == ("relay", "route", "account alice")
    # without the account, the domain routes decide: .dom.example matches first
    assert pick(cfg, "x@acct.example", account=None) == ("relay", "route", "domain example.org")
    assert pick(cfg, "x@a.dom.example", account=None) == ("backup", "route", "domain example.org")
    assert pick(cfg, "x@dom.example", account=None) == ("backup", "route", "domain example.org")
    # .dom.example is dom.example and its subdomains, label by label: not notdom.example
    assert pick(cfg, "x@notdom.example", account=None) == ("backup", "route", "global")
    assert pick(cfg, "x@a.notdom.example", account=None) == ("backup", "route", "global")
    # sender domain routes only for that sender domain; global ones for everyone
    assert pick(cfg, "x@dom.example", sender="a@other.example", account=None) == (
        "", "default", None)
    assert pick(cfg, "x@else.example", attempts=3) == ("relay", "route", "global")
    assert pick(cfg, "x@else.example", attempts=2) == ("backup", "route", "global")
    assert pick(cfg, "x@else.example", sender="", account=None) == ("", "default", None)


@pytest.mark.parametrize("entries, domain, expected", [
    ((".dom.example",), "dom.example", True),
    ((".dom.example",), "a.dom.example", True),
    ((".dom.example",), "a.b.dom.example", True),
    ((".dom.example",), "A.Dom.Example.", True),
    ((".dom.example",), "notdom.example", False),   # the label boundary counts
    ((".dom.example",), "a.notdom.example", False),
    ((".dom.example",), "dom.example.com", False),
    ((".dom.example",), "", False),
    (("dom.example",), "dom.example", True),
    (("dom.example",), "DOM.example.", True),
    (("dom.example",), "a.dom.example", False),       # without the dot: that domain only
    (("dom.example",), "xdom.example", False),
    ((".",), "", True),                                # "." is the empty domain of IP literals
    ((".",), "dom.example", False),
    (("a.example", ".dom.example"), "b.dom.example", True),
    (("a.example", ".dom.example"), "b.example", False),
    ((), "anything.example", True),                    # no entries: no restriction
    ((), "", True),
])
def test_domain_matches(entries, domain, expected):
    assert domain_matches(entries, domain) is expected


@pytest.mark.parametrize("values, expected", [
    (["dom.example"], ("dom.example",)),
    ([".Dom.Example"], (".dom.example",)),
    (["."], (".",)),
    (["bücher.example", ".bücher.example"], ("xn--bcher-kva.example", ".xn--bcher-kva.example")),
    (["A.example", ".", "b.example"], ("a.example", ".", "b.example")),
])
def test_parse_domain_list(values, expected):
    assert parse_domain_list(values) == expected


def test_minimum_attempts_is_0_or_more():
    kind = {k.name: k for k in mox_register_route_matchers()}["minimum_attempts"]
    assert kind.parse(0) == 0 and kind.parse(3) == 3
    with pytest.raises(ValueError, match="^must be 0 or more$"):
        kind.parse(-1)


def test_no_routes_means_default_direct_transport(tmp_path):
    cfg = make_config(tmp_path)
    res = resolve(cfg, route_context(mail_from="a@example.org", recipient="b@x.example",
                                     attempts=5, account="alice"))
    assert (res.name, res.kind, res.source, res.error) == ("", "direct", "default", None)
    cache = TransportCache()
    t = cache.get(cfg, res)
    assert (t.kind, t.name, t.settings.label) == ("direct", "", "")
    assert cache.get(cfg, res) is t


def test_override_wins_and_missing_transport_is_an_error(cfg):
    assert pick(cfg, "x@acct.example", override="backup") == ("backup", "override", None)
    ctx = route_context(mail_from="a@example.org", recipient="b@x.example", attempts=0, account=None)
    res = resolve(cfg, ctx, "gone")
    assert res.error == 'cannot find transport "gone"'
    with pytest.raises(TransportUnavailable, match='cannot find transport "gone"'):
        TransportCache().get(cfg, res)


def test_explain_lists_every_route_and_why_it_did_not_match(cfg):
    e = explain(cfg, "alice@example.org", "x@else.example", 3)
    assert e.context.attempts == 2 and e.context.account == "alice"
    lines = e.lines()
    assert lines[0].startswith("attempt 3 (2 attempt(s) made before)")
    assert "account alice route #1" in lines[1] and \
        "no match: to_domain ['acct.example'] does not include 'else.example'" in lines[1]
    assert "domain example.org route #1" in lines[2] and "no match" in lines[2]
    assert "global route #1" in lines[4] and \
        "minimum_attempts = 3, but 2 attempt(s) made" in lines[4]
    assert "global route #2" in lines[5] and lines[5].endswith("MATCHES")
    assert lines[-1] == "transport: backup (kind queue_scripted), from global route #2"
    e4 = explain(cfg, "alice@example.org", "x@else.example", 4).lines()
    assert e4[4].endswith("MATCHES") and "not considered" in e4[5]
    assert e4[-1] == "transport: relay (kind queue_scripted), from global route #1"
    none = explain(cfg, "bob@other.example", "x@else.example", 1).lines()
    assert none[-1] == "transport: direct delivery (default, no route matched)"


def test_routes_explain_command(cfg):
    group = click.Group("mox", callback=cli.callback, params=cli.params)
    register(group)
    r = CliRunner().invoke(group, ["--config", str(cfg.path), "routes", "explain", "--from",
                                   "alice@example.org", "--to", "x@else.example", "--attempt", "4"],
                           obj=make_host())
    assert r.exit_code == 0, r.output
    assert "minimum_attempts = 3" not in r.output
    assert r.output.splitlines()[-1] == "transport: relay (kind queue_scripted), from global route #1"


async def test_direct_first_then_a_relay_from_the_fourth_attempt(tmp_path):
    """minimum_attempts = 3: attempts 1-3 go direct, the 4th through the other transport."""
    cfg = make_config(tmp_path, domains='[[routes]]\nminimum_attempts = 3\ntransport = "relay"\n')
    SCRIPT.default = (T, 451, "4.0.0", "later")
    async with running(cfg) as q:
        await q.add(account="alice", mail_from="alice@example.org", recipients=["b@x.example"], data=MSG)
        await q.scheduler.settle()
        for iv in (450, 900, 1800, 3600):
            q.clock.advance(iv)
            await q.scheduler.settle()
    assert [(c.attempt, c.transport, c.kind) for c in SCRIPT.calls] == [
        (0, "", "direct"), (1, "", "direct"), (2, "", "direct"),
        (3, "relay", "queue_scripted"), (4, "relay", "queue_scripted")]


async def test_route_change_in_domains_toml_applies_at_the_next_attempt(tmp_path):
    cfg = make_config(tmp_path)
    holder = ConfigHolder(cfg, interval=0)
    SCRIPT.default = (T, 451, "4.0.0", "later")
    async with running(holder) as q:
        await q.add(account="alice", mail_from="alice@example.org", recipients=["b@x.example"], data=MSG)
        await q.scheduler.settle()
        text = cfg.domains_path.read_text() + '[[routes]]\nto_domain = ["x.example"]\ntransport = "backup"\n'
        cfg.domains_path.write_text(text)
        st = os.stat(cfg.domains_path)
        os.utime(cfg.domains_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        q.clock.advance(450)
        await q.scheduler.settle()
    assert [c.transport for c in SCRIPT.calls] == ["", "backup"]


async def test_named_transport_gone_from_config_fails_temporarily(tmp_path):
    cfg = make_config(tmp_path)
    holder = ConfigHolder(cfg, interval=3600)
    async with running(holder) as q:
        await q.add(account="alice", mail_from="alice@example.org", recipients=["b@x.example"],
                    data=MSG, hold=True)
        await q.kick(transport="relay")
        holder.replace(dataclasses.replace(cfg, transports={}))
        await q.set_hold(Filter(), False)
        await q.scheduler.settle()
        [m] = await q.list_messages()
        assert m.attempts == 1 and m.last_error == 'cannot find transport "relay"'
        assert not m.results[-1]["permanent"] and SCRIPT.calls == []


async def test_transports_are_built_once_per_config(tmp_path):
    cfg = make_config(tmp_path, domains='[[routes]]\nto_domain = ["r.example"]\ntransport = "relay"\n')
    holder = ConfigHolder(cfg, interval=3600)
    async with running(holder) as q:
        for i in range(3):
            await q.add(account="alice", mail_from="alice@example.org",
                        recipients=[f"a{i}@r.example", f"b{i}@x.example"], data=MSG)
            await q.scheduler.settle()
        assert sorted(queue_scripted.BUILT) == [("direct", ""), ("queue_scripted", "relay")]
        # a reload of domains.toml keeps the transports; a new mox.toml rebuilds them
        holder.replace(dataclasses.replace(cfg))
        await q.add(account="alice", mail_from="alice@example.org", recipients=["c@r.example"], data=MSG)
        await q.scheduler.settle()
        assert len(queue_scripted.BUILT) == 2
        holder.replace(dataclasses.replace(cfg, transports=dict(cfg.transports)))
        await q.add(account="alice", mail_from="alice@example.org", recipients=["d@r.example"], data=MSG)
        await q.scheduler.settle()
        assert len(queue_scripted.BUILT) == 3


async def test_per_transport_retry_intervals_and_max_attempts(tmp_path):
    cfg = make_config(
        tmp_path, "[transports.fast]\nkind = \"queue_scripted\"\nretry_intervals = [60.0, 120.0]\nmax_attempts = 3\n",
        '[[routes]]\ntransport = "fast"\n',
    )
    SCRIPT.default = (T, 451, "4.0.0", "later")
    async with running(cfg) as q:
        t0 = q.clock.now()
        await q.add(account="alice", mail_from="alice@example.org", recipients=["b@x.example"], data=MSG)
        await q.scheduler.settle()
        for iv in (60, 120, 120):
            q.clock.advance(iv)
            await q.scheduler.settle()
        assert [c.time - t0 for c in SCRIPT.calls] == [0, 60, 180]
        assert await q.list_messages() == []
    [dsn] = maildir_new(cfg, "alice")
    assert b"Action: failed" in dsn.read_bytes()


async def test_permanent_result_through_a_route(cfg):
    SCRIPT.default = (P, 554, "5.7.1", "relay denied")
    async with running(cfg) as q:
        await q.add(account="alice", mail_from="alice@example.org", recipients=["x@acct.example"], data=MSG)
        await q.scheduler.settle()
    assert [c.transport for c in SCRIPT.calls] == ["relay"]
    assert len(maildir_new(cfg, "alice")) == 1


# --------------------------------------------------------------------------------------------
# the parts, one by one (expected values written out)


@pytest.mark.parametrize("address, domain", [
    ("a@Dom.Example", "dom.example"),
    ("A@DOM.EXAMPLE", "dom.example"),
    ('"a@b"@dom.example', "dom.example"),        # the last @ separates the domain
    ("a@b@dom.example", "dom.example"),
    ("a@bücher.example", "xn--bcher-kva.example"),
    ("a@[192.0.2.1]", "[192.0.2.1]"),
    ("a@[IPv6:2001:DB8::1]", "[ipv6:2001:db8::1]"),
    ("a@Bad..Example", "bad..example"),           # not a valid name: lower case as written
    ("nodomain", "nodomain"),
])
def test_address_domain(address, domain):
    from mox_core.outgoing.routing import address_domain

    assert address_domain(address) == domain


def test_route_context():
    ctx = route_context(mail_from="Alice@Example.ORG", recipient="bob@Dest.Example", attempts=2, account="alice")
    assert (ctx.from_domain, ctx.to_domain, ctx.attempts, ctx.account, ctx.sender, ctx.recipient) == (
        "example.org", "dest.example", 2, "alice", "Alice@Example.ORG", "bob@Dest.Example")
    # the null sender and a sender without a domain have no sender domain
    assert route_context(mail_from="", recipient="b@d.example", attempts=0, account=None).from_domain == ""
    assert route_context(mail_from="postmaster", recipient="b@d.example", attempts=0, account=None).from_domain == ""


def test_routes_for_keeps_the_configured_lists(cfg):
    from mox_core.outgoing.routing import routes_for

    wheres = [(r.where, r.index) for r in routes_for(cfg, "alice", "Example.ORG")]
    assert wheres == [("account alice", 0), ("domain example.org", 0), ("domain example.org", 1),
                      ("global", 0), ("global", 1)]
    assert [(r.where, r.index) for r in routes_for(cfg, "alice", "example.org")] == wheres  # unchanged
    assert len(cfg.dynamic.routes_account["alice"]) == 1 and len(cfg.dynamic.routes_global) == 2
    # an account without routes of its own, and no account
    assert [(r.where, r.index) for r in routes_for(cfg, "bob", "other.example")] == [("global", 0), ("global", 1)]
    assert [(r.where, r.index) for r in routes_for(cfg, None, "other.example")] == [("global", 0), ("global", 1)]
    assert pick(cfg, "x@acct.example", account="bob", sender="bob@example.org") == (
        "relay", "route", "domain example.org")


def test_a_route_to_a_missing_transport(tmp_path):
    cfg = make_config(tmp_path, domains='[[routes]]\nto_domain = ["gone.example"]\ntransport = "relay"\n')
    # the transport is removed from the resolved config, as after an edit of mox.toml
    cfg = dataclasses.replace(cfg, transports={k: v for k, v in cfg.transports.items() if k != "relay"})
    r = resolve(cfg, route_context(mail_from="a@example.org", recipient="b@gone.example", attempts=0, account=None))
    assert (r.name, r.source, r.kind, r.entry, r.error) == ("relay", "route", None, None, 'cannot find transport "relay"')
    assert r.route is not None and (r.route.where, r.route.index) == ("global", 0)
    assert explain(cfg, "a@example.org", "b@gone.example", 1).lines()[-1] == (
        "transport: 'relay': cannot find transport \"relay\" (attempt fails temporarily)")


def test_transport_cache_builds_with_the_settings_and_says_what_is_missing(cfg):
    cache = TransportCache()
    res = resolve(cfg, route_context(mail_from="a@other.example", recipient="x@else.example", attempts=3,
                                     account=None))
    t = cache.get(cfg, res)
    assert (res.name, t.name, t.settings.label) == ("relay", "relay", "relay")
    assert cache.get(cfg, res) is t
    plugins = copy.copy(cfg.plugins)
    plugins.transports = {}
    no_kinds = dataclasses.replace(cfg, plugins=plugins)
    with pytest.raises(TransportUnavailable, match='^transport kind "queue_scripted" is not installed$'):
        TransportCache().get(no_kinds, res)
    default = resolve(cfg, route_context(mail_from="", recipient="x@else.example", attempts=0, account=None))
    with pytest.raises(TransportUnavailable, match='^no transport kind "direct" installed for default delivery$'):
        TransportCache().get(no_kinds, default)


def test_explain_texts(tmp_path):
    cfg = make_config(tmp_path, domains=(
        '[[routes]]\nfrom_domain = ["a.example"]\nto_domain = ["b.example"]\nminimum_attempts = 2\n'
        'transport = "relay"\n'))
    lines = explain(cfg, "", "x@c.example", 1).lines()
    assert lines == [
        "attempt 1 (0 attempt(s) made before), from domain (none), to domain c.example, account (none)",
        "global route #1 (from_domain=('a.example',), to_domain=('b.example',), minimum_attempts=2) -> transport "
        "'relay': no match: "
        "from_domain ['a.example'] does not include '(empty)'; to_domain ['b.example'] does not include "
        "'c.example'; minimum_attempts = 2, but 0 attempt(s) made",
        "transport: direct delivery (default, no route matched)",
    ]
    # a recipient without a domain (a bare "x@") is said as such, as the null sender is
    no_domain = explain(cfg, "a@a.example", "x@", 2).lines()
    assert "to_domain ['b.example'] does not include '(empty)'" in no_domain[1]
    over = explain(cfg, "alice@example.org", "x@c.example", 2, override="backup").lines()
    assert over[0] == "attempt 2 (1 attempt(s) made before), from domain example.org, to domain c.example, account alice"
    assert over[-1] == "transport: backup (kind queue_scripted), override"
    empty = explain(make_config(tmp_path / "none"), "bob@other.example", "x@c.example", 1).lines()
    assert empty[1:] == ["no routes configured for this sender",
                         "transport: direct delivery (default, no route matched)"]
    with pytest.raises(ValueError, match="^attempt counts from 1$"):
        explain(cfg, "a@example.org", "x@c.example", 0)


def test_explain_finds_the_account_of_the_sender_unless_given(cfg):
    assert explain(cfg, "alice@example.org", "x@acct.example", 1).context.account == "alice"
    assert explain(cfg, "nobody@example.org", "x@acct.example", 1).context.account is None
    assert explain(cfg, "", "x@acct.example", 1).context.account is None
    assert explain(cfg, "", "x@acct.example", 1, account="alice").context.account == "alice"
    given = explain(cfg, "alice@example.org", "x@acct.example", 1, account="bob")
    assert given.context.account == "bob" and given.resolution.source == "route"
    assert given.checks[0].route.where == "domain example.org"


def test_explain_checks_every_route_until_one_matches(cfg):
    e = explain(cfg, "nobody@example.org", "x@a.dom.example", 1)
    assert [(c.route.where, c.route.index, c.matched, c.considered, c.failed) for c in e.checks] == [
        ("domain example.org", 0, True, True, []),
        ("domain example.org", 1, False, False, []),
        ("global", 0, False, False, []),
        ("global", 1, False, False, []),
    ]
    assert e.checks[1].describe().endswith(": not considered, an earlier route matched")
    assert e.resolution.name == "backup" and e.resolution.source == "route"
