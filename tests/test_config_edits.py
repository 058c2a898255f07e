"""The edits of domains.toml as a document (``mox_core.config.edits``), each on its own: the
exact text it leaves (comments, order, blank lines) and the exact refusal. Through the writer
(lock, validation, stale saves, the running server): tests/test_config_writer.py."""

from __future__ import annotations

import pytest
import tomlkit

from mox_core.config.edits import (
    EditError,
    add_account,
    add_address,
    add_domain,
    remove_account,
    remove_address,
    remove_domain,
    set_values,
    table,
)

DOC = """\
# domains of this server
[domains."example.org"]
localpart_catchall_separators = ["+"]

[domains."bücher.example"]

# the people
[accounts.alice]
domain = "example.org"
[accounts.alice.destinations."alice@example.org"]
[accounts.alice.destinations."al@bücher.example"]

[accounts.bob]
domain = "bücher.example"
[accounts.bob.destinations."bob@bücher.example"]

# routes come last
[[routes]]
transport = "relay"
"""


def doc():
    return tomlkit.parse(DOC)


def refused(fn, *args, **kw) -> str:
    with pytest.raises(EditError) as exc:
        fn(*args, **kw)
    return str(exc.value)


# --------------------------------------------------------------------------------------------
# table


def test_table_finds_and_creates():
    d = doc()
    assert table(d, "accounts", "alice")["domain"] == "example.org"
    assert refused(table, d, "accounts", "carol") == "no accounts.carol in domains.toml"
    assert refused(table, d, "nothing", "x") == "no nothing in domains.toml"
    t = table(d, "web", "handlers", create=True)
    t["x"] = 1
    assert "[web.handlers]\nx = 1\n" in tomlkit.dumps(d)
    assert "[web]\n" not in tomlkit.dumps(d)  # the level in between is a super table


# --------------------------------------------------------------------------------------------
# domains


def test_add_domain_appends_after_the_last_domain_with_blank_lines():
    d = doc()
    assert add_domain(d, "New.EXAMPLE", separators=["+", "-"], description="the new one") == "new.example"
    text = tomlkit.dumps(d)
    assert text.startswith(DOC.split("# the people")[0].rstrip("\n") + (
        '\n\n[domains."new.example"]\ndescription = "the new one"\n'
        'localpart_catchall_separators = ["+", "-"]\n\n# the people\n'))


def test_add_domain_stores_the_unicode_form():
    d = doc()
    assert add_domain(d, "xn--mnchen-3ya.example") == "münchen.example"
    assert '[domains."münchen.example"]\n' in tomlkit.dumps(d)
    assert "description" not in tomlkit.dumps(d).split('"münchen.example"]')[1].split("#")[0]


def test_add_domain_refusals():
    assert refused(add_domain, doc(), "Example.ORG") == "domain example.org already exists"
    assert refused(add_domain, doc(), "xn--bcher-kva.example") == "domain bücher.example already exists"
    text = refused(add_domain, doc(), "bad..example")
    assert text.startswith("invalid domain 'bad..example': ")


def test_add_domain_to_a_document_without_domains():
    d = tomlkit.parse("# nothing yet\n")
    add_domain(d, "a.example")
    text = tomlkit.dumps(d)
    assert text.startswith("# nothing yet\n") and text.endswith('[domains."a.example"]\n\n')
    assert tomlkit.parse(text).unwrap() == {"domains": {"a.example": {}}}


def test_remove_domain():
    d = doc()
    add_domain(d, "spare.example")
    remove_domain(d, "SPARE.example")
    assert "spare" not in tomlkit.dumps(d)
    assert refused(remove_domain, doc(), "gone.example") == "no domain gone.example"
    assert refused(remove_domain, doc(), "bücher.example") == (
        "domain bücher.example is still used by: address al@bücher.example of account alice, "
        "account bob (its default domain), address bob@bücher.example of account bob; "
        "remove or change those first")
    assert refused(remove_domain, doc(), "example.org") == (
        "domain example.org is still used by: account alice (its default domain), "
        "address alice@example.org of account alice; remove or change those first")
    assert refused(remove_domain, tomlkit.parse("x = 1\n"), "a.example") == "no domains in domains.toml"


# --------------------------------------------------------------------------------------------
# accounts


def test_add_account():
    d = doc()
    add_account(d, "carol", "carol@example.org")
    text = tomlkit.dumps(d)
    assert ('[accounts.bob.destinations."bob@bücher.example"]\n\n[accounts.carol]\ndomain = "example.org"\n\n'
            '[accounts.carol.destinations."carol@example.org"]\n\n# routes come last\n') in text
    assert tomlkit.parse(text).unwrap()["accounts"]["carol"] == {
        "domain": "example.org", "destinations": {"carol@example.org": {}}}


def test_add_account_refusals():
    assert refused(add_account, doc(), "alice", "x@example.org") == "account alice already exists"
    assert refused(add_account, doc(), "carol", "carol") == "'carol' is not an address (localpart@domain)"
    assert refused(add_account, doc(), "carol", "@example.org") == (
        "'@example.org' is not an address (localpart@domain)")
    assert refused(add_account, doc(), "carol", "bob@bücher.example") == (
        "address bob@bücher.example already belongs to account bob")


def test_remove_account():
    d = doc()
    remove_account(d, "alice")
    assert "alice" not in tomlkit.dumps(d) and "[accounts.bob]" in tomlkit.dumps(d)
    assert refused(remove_account, doc(), "carol") == "no account carol"


# --------------------------------------------------------------------------------------------
# addresses


def test_add_address_after_the_last_one():
    d = doc()
    add_address(d, "alice", "a2@example.org")
    assert ('[accounts.alice.destinations."al@bücher.example"]\n\n'
            '[accounts.alice.destinations."a2@example.org"]\n\n[accounts.bob]') in tomlkit.dumps(d)


def test_add_a_catchall_to_an_account_without_destinations():
    d = tomlkit.parse('[accounts.carol]\ndomain = "example.org"\n')
    add_address(d, "carol", "@example.org")
    text = tomlkit.dumps(d)
    assert text.startswith('[accounts.carol]\ndomain = "example.org"\n\n')
    assert text.endswith('\n[accounts.carol.destinations."@example.org"]\n\n')
    assert tomlkit.parse(text).unwrap() == {"accounts": {"carol": {
        "domain": "example.org", "destinations": {"@example.org": {}}}}}


def test_add_address_refusals():
    assert refused(add_address, doc(), "alice", "nope") == (
        "'nope' is not an address (localpart@domain, or @domain for a catch-all)")
    assert refused(add_address, doc(), "alice", "bob@bücher.example") == (
        "address bob@bücher.example already belongs to account bob")
    assert refused(add_address, doc(), "carol", "c@example.org") == "no accounts.carol in domains.toml"


def test_remove_address():
    d = doc()
    assert remove_address(d, "al@bücher.example") == "alice"
    assert "al@bücher" not in tomlkit.dumps(d)
    assert refused(remove_address, doc(), "nobody@example.org") == "no account has address nobody@example.org"
    assert refused(remove_address, doc(), "bob@bücher.example") == (
        "bob@bücher.example is the last address of account bob; remove the account instead")


# --------------------------------------------------------------------------------------------
# values


def test_set_values_keeps_places_and_comments():
    d = tomlkit.parse('[t]\na = 1  # one\nb = 2\n# about c\nc = 3\n')
    set_values(d["t"], {"a": 10, "d": 4}, remove=frozenset({"b", "missing"}))
    assert tomlkit.dumps(d) == '[t]\na = 10  # one\n# about c\nc = 3\nd = 4\n'
    set_values(d["t"], {})
    assert tomlkit.dumps(d) == '[t]\na = 10  # one\n# about c\nc = 3\nd = 4\n'


def test_comments_above_the_next_table_stay_above_it():
    """tomlkit keeps "# routes come last" at the end of the last account's table: a table
    appended there carries it along, so it stays above [[routes]]."""
    d = doc()
    add_account(d, "dave", "dave@example.org")
    text = tomlkit.dumps(d)
    assert text.index("[accounts.dave]") < text.index("# routes come last") < text.index("[[routes]]")
    assert text.endswith('\n\n# routes come last\n[[routes]]\ntransport = "relay"\n')


def test_a_created_table_without_keys_still_has_its_header():
    d = tomlkit.parse("x = 1\n")
    table(d, "a", "b", create=True)
    assert tomlkit.dumps(d) == "x = 1\n\n[a.b]\n"
    assert tomlkit.parse(tomlkit.dumps(d)).unwrap() == {"x": 1, "a": {"b": {}}}


def test_append_table_moves_a_comment_that_follows_directly():
    from mox_core.config.edits import append_table

    d = tomlkit.parse("[a.x]\nk = 1\n# about b\n[b]\nv = 2\n")
    append_table(d["a"], "y", tomlkit.table())
    assert tomlkit.dumps(d) == "[a.x]\nk = 1\n\n[a.y]\n\n# about b\n[b]\nv = 2\n"
    top = tomlkit.parse("k = 1\n")
    append_table(top, "z", tomlkit.table())  # to the document itself
    assert tomlkit.dumps(top) == "k = 1\n\n[z]\n\n"


def test_edits_of_a_document_without_accounts():
    d = tomlkit.parse('[domains."a.example"]\n')
    remove_domain(d, "a.example")
    assert "a.example" not in tomlkit.dumps(d)
    assert refused(remove_address, tomlkit.parse("x = 1\n"), "a@b.example") == "no account has address a@b.example"
    d = tomlkit.parse('[domains."a.example"]\n')
    add_account(d, "first", "first@a.example")
    assert tomlkit.parse(tomlkit.dumps(d)).unwrap()["accounts"] == {
        "first": {"domain": "a.example", "destinations": {"first@a.example": {}}}}


def test_an_account_without_destinations_does_not_use_a_domain():
    d = tomlkit.parse('[domains."a.example"]\n\n[accounts.x]\ndomain = "b.example"\n')
    remove_domain(d, "a.example")
    assert "a.example" not in tomlkit.dumps(d)


def test_a_quoted_localpart_with_at_signs():
    d = doc()
    add_account(d, "q", '"a@b"@example.org')
    assert tomlkit.parse(tomlkit.dumps(d)).unwrap()["accounts"]["q"]["domain"] == "example.org"
    add_domain(d, "c.example")
    add_address(d, "q", '"x@c.example"@example.org')
    remove_domain(d, "c.example")  # the localpart names c.example, the address is not in it
    assert "c.example" not in tomlkit.dumps(d).split("[accounts")[0]
    # and an address with an @ in its localpart is in the domain after the last @
    d = tomlkit.parse('[domains."a.example"]\n[domains."d.example"]\n\n[accounts.x]\ndomain = "a.example"\n')
    add_address(d, "x", '"p@q"@d.example')
    assert refused(remove_domain, d, "d.example") == (
        'domain d.example is still used by: address "p@q"@d.example of account x; remove or change those first')


def test_a_new_destinations_table_has_no_header_of_its_own():
    d = tomlkit.parse('[accounts.carol]\ndomain = "example.org"\n')
    add_address(d, "carol", "c@example.org")
    assert "[accounts.carol.destinations]\n" not in tomlkit.dumps(d)
