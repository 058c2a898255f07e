"""Which account receives mail for an address (``mox_core.accounts.addresses.lookup``) and the
canonical localpart of a domain (``Domain.canonical_localpart``), without a server.

Expected accounts, mailboxes and canonical addresses are written out here, never computed
with the code under test. The same rules through a real ``mox serve`` are in
tests/test_receive.py (``test_recipient_resolution``).
"""

from __future__ import annotations

import pytest

from mox_core.accounts import addresses
from mox_core.accounts.addresses import AddressNotFound, is_local_domain, lookup, split_address
from mox_core.config.models import Domain
from mox_core.testing import load

STATIC = """\
hostname = "mail.example.org"
data_dir = "data"

[postmaster]
account = "admin"
mailbox = "Postmaster"

[listeners.local]
ips = ["127.0.0.1"]
hostname = "MX.Example.NET"
[listeners.local.smtp]
enabled = true

[listeners.other]
ips = ["127.0.0.2"]
[listeners.other.smtp]
enabled = true
"""

DOMAINS = """\
[domains."example.org"]
localpart_catchall_separators = ["+", "-"]

[domains."one.example"]
localpart_catchall_separator = "+"

[domains."case.example"]
localpart_case_sensitive = true

[domains."catch.example"]

[domains."off.example"]
disabled = true

[accounts.admin]
domain = "example.org"
[accounts.admin.destinations."admin@example.org"]

[accounts.alice]
[accounts.alice.destinations."alice@example.org"]
mailbox = "Alice"
[accounts.alice.destinations."alice@one.example"]
[accounts.alice.destinations."Alice@case.example"]

[accounts.bob]
[accounts.bob.destinations."bob@catch.example"]

[accounts.catcher]
[accounts.catcher.destinations."@catch.example"]
mailbox = "Caught"
"""


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return load(tmp_path_factory.mktemp("addresses"), STATIC, DOMAINS, base=False)


def resolved(cfg, address: str) -> tuple[str, str, str, bool]:
    r = lookup(cfg, address)
    return (r.account, r.mailbox, r.canonical, r.catchall)


# --------------------------------------------------------------------------------------------
# separators


@pytest.mark.parametrize("address, expected", [
    ("alice@example.org", ("alice", "Alice", "alice@example.org", False)),
    ("alice+tag@example.org", ("alice", "Alice", "alice@example.org", False)),
    # the same separator twice: cut at the first one, not the last
    ("alice+a+b@example.org", ("alice", "Alice", "alice@example.org", False)),
    ("alice-a-b@example.org", ("alice", "Alice", "alice@example.org", False)),
    ("alice+a-b+c@example.org", ("alice", "Alice", "alice@example.org", False)),
    ("alice-x+y-z@example.org", ("alice", "Alice", "alice@example.org", False)),
    ("alice+a+b@one.example", ("alice", "Inbox", "alice@one.example", False)),
    ("alice+@one.example", ("alice", "Inbox", "alice@one.example", False)),
])
def test_localpart_is_cut_at_the_first_separator(cfg, address, expected):
    assert resolved(cfg, address) == expected


@pytest.mark.parametrize("address", [
    "alice-x@one.example",   # "-" is not a separator of one.example
    "aliceplus@one.example",
    "+alice@one.example",    # cut at the first separator: the localpart is empty
])
def test_only_the_domains_separators_cut(cfg, address):
    with pytest.raises(AddressNotFound) as exc:
        lookup(cfg, address)
    assert exc.value.reason == "address_not_found"


@pytest.mark.parametrize("separators, localpart, expected", [
    (["+"], "alice+a+b", "alice"),
    (["+"], "Alice+A+B", "alice"),
    (["+", "-"], "bob-x+y-z", "bob"),
    (["-", "+"], "bob+x-y+z", "bob"),
    (["+"], "x", "x"),
    ([], "carol+a+b", "carol+a+b"),
    (["++"], "dave++a++b", "dave"),
])
def test_canonical_localpart(separators, localpart, expected):
    assert Domain(localpart_catchall_separators=separators).canonical_localpart(localpart) == expected


def test_canonical_localpart_with_the_single_separator_form():
    assert Domain(localpart_catchall_separator="+").canonical_localpart("eve+a+b") == "eve"
    assert Domain(localpart_catchall_separator="+", localpart_case_sensitive=True).canonical_localpart(
        "Eve+a+b") == "Eve"
    assert Domain(localpart_catchall_separator="+").canonical_localpart("Eve+a+b", strip_separators=False) == "eve+a+b"


# --------------------------------------------------------------------------------------------
# case


def test_case_insensitive_domain_lower_cases_the_localpart(cfg):
    assert resolved(cfg, "ALICE+X+Y@Example.ORG") == ("alice", "Alice", "alice@example.org", False)


def test_case_sensitive_domain_keeps_the_case(cfg):
    assert resolved(cfg, "Alice@case.example") == ("alice", "Inbox", "Alice@case.example", False)
    with pytest.raises(AddressNotFound):
        lookup(cfg, "alice@case.example")
    with pytest.raises(AddressNotFound):
        lookup(cfg, "ALICE@case.example")


# --------------------------------------------------------------------------------------------
# postmaster


@pytest.mark.parametrize("address", [
    "postmaster",
    "postmaster@mail.example.org",
    "Postmaster@mail.example.org",
    "POSTMASTER@MAIL.EXAMPLE.ORG",
    "postmaster@Mail.Example.Org",
    "PostMaster@mx.example.net",   # a listener's host name, configured in mixed case
    "postmaster@MX.EXAMPLE.NET",
])
def test_postmaster_at_our_host_names_in_any_case(cfg, address):
    assert resolved(cfg, address) == ("admin", "Postmaster", "postmaster@mail.example.org", False)


def test_postmaster_without_domain_in_a_config_without_listeners(tmp_path):
    """No listener without a host name adds "" to the names: "postmaster" alone is ours anyway."""
    bare = load(tmp_path)
    assert lookup(bare, "postmaster").account == "admin"
    assert lookup(bare, "PostMaster").canonical == "postmaster@mail.example.org"


def test_postmaster_of_a_domain_falls_back_to_the_postmaster_account(cfg):
    assert resolved(cfg, "postmaster@example.org") == ("admin", "Postmaster", "postmaster@example.org", False)
    assert resolved(cfg, "PostMaster@Example.org") == ("admin", "Postmaster", "postmaster@example.org", False)
    # a catch-all domain: the catch-all wins over the fallback
    assert resolved(cfg, "postmaster@catch.example") == ("catcher", "Caught", "postmaster@catch.example", True)


def test_postmaster_at_another_host_is_not_ours(cfg):
    with pytest.raises(AddressNotFound) as exc:
        lookup(cfg, "postmaster@mail.example.com")
    assert exc.value.reason == "domain_not_found"


# --------------------------------------------------------------------------------------------
# catch-all, unknown and disabled domains


def test_exact_destination_beats_the_catchall(cfg):
    assert resolved(cfg, "bob@catch.example") == ("bob", "Inbox", "bob@catch.example", False)
    assert resolved(cfg, "BOB@catch.example") == ("bob", "Inbox", "bob@catch.example", False)
    assert resolved(cfg, "bob+x@catch.example") == ("catcher", "Caught", "bob+x@catch.example", True)
    assert resolved(cfg, "Else@catch.example") == ("catcher", "Caught", "else@catch.example", True)


@pytest.mark.parametrize("address, reason", [
    ("nobody@example.org", "address_not_found"),
    ("alice@other.example", "domain_not_found"),
    ("alice@off.example", "domain_disabled"),
    ("alice@", "domain_not_found"),
    ("alice@bad..example", "domain_not_found"),
])
def test_unknown_addresses(cfg, address, reason):
    with pytest.raises(AddressNotFound) as exc:
        lookup(cfg, address)
    assert (exc.value.reason, exc.value.address) == (reason, address)
    assert str(exc.value) == f"{reason.replace('_', ' ')}: {address}"


def test_address_not_found_text():
    assert str(AddressNotFound("domain_not_found", "a@b.example")) == "domain not found: a@b.example"
    assert str(AddressNotFound("address_not_found", "x@y.example")) == "address not found: x@y.example"


def test_the_destination_comes_with_the_account(cfg):
    exact = lookup(cfg, "alice+x@example.org")
    assert exact.destination is not None and exact.destination.mailbox == "Alice"
    caught = lookup(cfg, "anyone@catch.example")
    assert caught.destination is not None and caught.destination.mailbox == "Caught" and caught.catchall
    assert lookup(cfg, "postmaster@example.org").destination is None  # the fallback has none


@pytest.mark.parametrize("domain, local", [
    ("example.org", True),
    ("Example.ORG", True),
    ("off.example", True),       # disabled, but ours
    ("other.example", False),
    ("mail.example.org", False),  # our host name is not a mail domain
    ("bad..example", False),
    ("", False),
])
def test_is_local_domain(cfg, domain, local):
    assert is_local_domain(cfg, domain) is local


def test_a_listener_without_host_name_adds_no_name(cfg):
    """Listener "other" has no hostname: it names no host whose postmaster is ours."""
    for address in ("postmaster@xxxx", "postmaster@none"):
        with pytest.raises(AddressNotFound):
            lookup(cfg, address)


def test_our_host_names_are_kept_per_static_config(cfg, monkeypatch):
    """The host names are computed once per static config (id and identity), and used."""
    monkeypatch.setattr(addresses, "_hostnames", {})
    lookup(cfg, "postmaster")
    assert addresses._hostnames == {id(cfg.static): (cfg.static, frozenset({"mail.example.org", "mx.example.net", ""}))}
    # what is kept is what is used ...
    addresses._hostnames[id(cfg.static)] = (cfg.static, frozenset({"kept.example"}))
    assert lookup(cfg, "postmaster@kept.example").account == "admin"
    # ... unless it was kept for another config that had the same id
    addresses._hostnames[id(cfg.static)] = (object(), frozenset({"stale.example"}))
    with pytest.raises(AddressNotFound):
        lookup(cfg, "postmaster@stale.example")
    assert lookup(cfg, "postmaster@mx.example.net").account == "admin"


@pytest.mark.parametrize("address, expected", [
    ("a@b.example", ("a", "b.example")),
    ("a@b@c.example", ("a@b", "c.example")),
    ("plain", ("plain", "")),
    ('"a b"@c.example', ("a b", "c.example")),
    ('"a\\"b"@c.example', ('a"b', "c.example")),
    ('"a\\\\b"@c.example', ("a\\b", "c.example")),
    ('"a@b"', ("a@b", "")),
    ('""@c.example', ("", "c.example")),
    ('"x"', ("x", "")),
])
def test_split_address(address, expected):
    assert split_address(address) == expected


@pytest.mark.parametrize("address", ['"', '"abc', '"a"b@c.example'])
def test_split_address_refuses_broken_quoting(address):
    with pytest.raises(ValueError, match="^bad address "):
        split_address(address)
