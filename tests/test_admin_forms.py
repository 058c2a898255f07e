"""The admin pages' form generator (mox_core.admin.forms), the mapping of config problems to
its fields (mox_core.admin.saving) and the comment-keeping edits of arrays of tables
(mox_core.config.arrays), without a server."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Literal

import pytest
import tomlkit
from pydantic import BaseModel, Field

from mox_core.admin.forms import Field as FormField
from mox_core.admin.forms import build, parse, spec_for, specs_from_model
from mox_core.admin.saving import apply_changes, field_errors, keys_of
from mox_core.config.arrays import append_entry, move_entry, remove_entry
from mox_core.config.models import Account, Destination, DKIMSelector, Domain, WebHandlerCommon
from mox_core.errors import ConfigProblem


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Inner(BaseModel):
    policy: str = Field(description="Required inside.")
    max_age: int = Field(86400, ge=1, le=31557600)


class Sample(BaseModel):
    name: str = Field(description="A name.")
    count: int = Field(3, ge=0, le=10, description="How many.")
    ratio: float = 0.5
    enabled: bool = False
    key_file: Path = Path("keys/a.pem")
    mode: Literal["enforce", "testing"] = "enforce"
    color: Color = Color.RED
    hosts: list[str] = Field(default_factory=list)
    intervals: list[float] = Field(default_factory=lambda: [450.0, 900.0])
    headers: dict[str, str] = Field(default_factory=dict)
    limit: int | None = None
    note: str | None = None
    inner: Inner | None = None
    anything: dict[str, Any] = Field(default_factory=dict)


def answers_of(fields: list[FormField]) -> dict[str, str]:
    """What a browser sends for these fields as shown (checked boxes "true", others their
    hidden "false")."""
    out: dict[str, str] = {}
    for f in fields:
        if f.spec.kind == "group":
            if f.spec.optional and f.checked:
                out[f.key + "._present"] = "true"
            out.update(answers_of(f.children))
        elif f.spec.kind == "bool":
            out[f.key] = "true" if f.checked else "false"
        else:
            out[f.key] = f.text
    return out


def test_every_supported_type_gets_its_input():
    kinds = {s.name: (s.kind, s.optional, s.item.kind if s.item else None) for s in specs_from_model(Sample)}
    assert kinds == {
        "name": ("text", False, None), "count": ("int", False, None), "ratio": ("float", False, None),
        "enabled": ("bool", False, None), "key_file": ("path", False, None), "mode": ("choice", False, None),
        "color": ("choice", False, None), "hosts": ("lines", False, "text"), "intervals": ("lines", False, "float"),
        "headers": ("pairs", False, "text"), "limit": ("int", True, None), "note": ("text", True, None),
        "inner": ("group", True, None), "anything": ("toml", False, None),
    }
    specs = {s.name: s for s in specs_from_model(Sample)}
    assert (specs["count"].minimum, specs["count"].maximum) == (0, 10)
    assert specs["color"].options == ("red", "blue")
    assert specs["name"].required and not specs["limit"].required
    assert [c.name for c in specs["inner"].children] == ["policy", "max_age"]
    assert specs["count"].description == "How many."
    assert spec_for("mta_sts", Inner | None).title == "MTA-STS"


def test_the_form_shows_the_file_values_and_the_defaults():
    specs = specs_from_model(Sample)
    fields = {f.key: f for f in build(specs, {"name": "x", "hosts": ["a.example", "b.example"],
                                              "headers": {"X-A": "1"}, "inner": {"policy": "p1"}})}
    assert fields["name"].text == "x" and fields["name"].set_in_file
    assert fields["count"].text == "3" and not fields["count"].set_in_file and fields["count"].default_text == "3"
    assert fields["hosts"].text == "a.example\nb.example"
    assert fields["intervals"].text == "450\n900" and fields["intervals"].default_text == "450, 900"
    assert fields["headers"].text == "X-A = 1"
    assert fields["inner"].checked and [c.text for c in fields["inner"].children] == ["p1", "86400"]
    assert fields["limit"].text == "" and fields["limit"].default_text == ""
    assert fields["enabled"].checked is False and fields["enabled"].default_text == "off"


def test_a_form_sent_back_unchanged_changes_nothing():
    current = {"name": "x", "count": 3, "hosts": ["a"], "intervals": [450.0, 900.0], "inner": {"policy": "p"}}
    specs = specs_from_model(Sample)
    changes = parse(specs, answers_of(build(specs, current)), current)
    assert not changes and changes.errors == {}


@pytest.mark.parametrize("model, current", [
    (Domain, {"description": "Main", "localpart_catchall_separators": ["+"],
              "mta_sts": {"policy_id": "2026", "mx": ["mx.example.org"]}}),
    (Account, {"domain": "example.org", "max_outgoing_messages_per_day": 10, "rate_limiters": ["messages_per_day"]}),
    (Destination, {"mailbox": "Lists"}),
    (DKIMSelector, {"private_key_file": "dkim/a.pem", "headers": ["From", "To"]}),
    (WebHandlerCommon, {"kind": "static", "domain": "www.example.org", "compress": True}),
])
def test_the_config_models_forms_round_trip_without_changes(model, current):
    specs = specs_from_model(model, skip=("dkim", "routes", "destinations"))
    changes = parse(specs, answers_of(build(specs, current)), current)
    assert not changes and changes.errors == {}


def test_only_changed_keys_are_written_and_defaults_are_not_added():
    specs = specs_from_model(Sample)
    current = {"name": "x", "note": "old"}
    answers = answers_of(build(specs, current))
    answers.update({"count": "7", "note": "", "hosts": "a.example\n\n b.example \n", "headers": "X-A = 1\nX-B=two",
                    "enabled": "true", "intervals": "450\n900"})
    ch = parse(specs, answers, current)
    assert ch.values == {"count": 7, "hosts": ["a.example", "b.example"], "headers": {"X-A": "1", "X-B": "two"},
                      "enabled": True}
    assert ch.remove == {"note"}  # an optional key emptied is removed from the file
    assert "intervals" not in ch.values  # equal to its default, not in the file: not added


def test_answers_that_are_not_of_their_type_are_errors_of_their_field():
    specs = specs_from_model(Sample)
    answers = answers_of(build(specs, {"name": "x"}))
    answers.update({"count": "many", "ratio": "half", "mode": "strict", "headers": "no equals sign",
                    "anything": "{not toml", "inner._present": "true", "inner.max_age": "soon"})
    errors = parse(specs, answers, {"name": "x"}).errors
    assert errors["count"] == "'many' is not a whole number"
    assert errors["ratio"] == "'half' is not a number"
    assert errors["mode"] == "'strict' is not one of enforce, testing"
    assert errors["headers"] == "line 1: write key = value"
    assert errors["anything"].startswith("not a TOML value")
    assert errors["inner.max_age"] == "'soon' is not a whole number"
    assert errors["inner.policy"] == "a value is required"


def test_an_optional_table_is_added_with_its_values_and_removed_by_its_box():
    specs = specs_from_model(Sample)
    doc = tomlkit.parse('# keep me\nname = "x"  # and me\n')
    answers = answers_of(build(specs, doc.unwrap()))
    answers.update({"inner._present": "true", "inner.policy": "p1"})
    ch = parse(specs, answers, doc.unwrap())
    assert ch.groups["inner"].values == {"policy": "p1"}  # max_age keeps its default: not written
    apply_changes(doc, ch)
    text = tomlkit.dumps(doc)
    assert text.rstrip() == '# keep me\nname = "x"  # and me\n\n[inner]\npolicy = "p1"'
    answers = answers_of(build(specs, doc.unwrap()))
    del answers["inner._present"]
    ch = parse(specs, answers, doc.unwrap())
    assert ch.remove == {"inner"}
    apply_changes(doc, ch)
    assert tomlkit.dumps(doc).startswith('# keep me\nname = "x"  # and me\n')
    assert "inner" not in doc


def test_a_changed_value_keeps_its_place_and_its_comment():
    doc = tomlkit.parse('[t]\n# above\ncount = 3  # beside\nname = "x"\n')
    specs = specs_from_model(Sample)
    t = doc["t"]
    answers = answers_of(build(specs, t.unwrap()))
    answers["count"] = "9"
    apply_changes(t, parse(specs, answers, t.unwrap()))
    assert tomlkit.dumps(doc) == '[t]\n# above\ncount = 9  # beside\nname = "x"\n'


def test_problems_go_to_the_field_their_key_path_names():
    fields = build(specs_from_model(Domain, skip=("dkim", "routes")), {})
    keys = keys_of(fields)
    problems = [
        ConfigProblem("d.toml", "domains.example.org.mta_sts.policy_id", "policy_id must be 1 to 32 letters"),
        ConfigProblem("d.toml", 'domains."example.org".mta_sts', "MTA-STS policy configured but no listener"),
        ConfigProblem("d.toml", "domains.example.org.localpart_catchall_separators[1]", "Input should be a string"),
        ConfigProblem("d.toml", "domains.example.org", "Value error, cannot have both"),
        ConfigProblem("d.toml", "domains.example.orgx.description", "another domain"),
        ConfigProblem("d.toml", "accounts", "postmaster account 'admin' is not defined"),
    ]
    errors, summary = field_errors(problems, ("domains", "example.org"), keys)
    assert errors == {"mta_sts.policy_id": "policy_id must be 1 to 32 letters",
                      "mta_sts": "MTA-STS policy configured but no listener",
                      "localpart_catchall_separators": "Input should be a string"}
    assert str(summary[3]) == "domains.example.org: cannot have both" and summary[3].key is None
    assert summary[0].key == "mta_sts.policy_id"  # the summary links to the field
    assert len(summary) == 6  # every problem is in the summary


def test_problems_of_an_entry_of_an_array_go_to_its_fields():
    keys = keys_of(build(specs_from_model(WebHandlerCommon), {}))
    errors, _ = field_errors([ConfigProblem("d", "web_handlers[2].path_regexp", "must start with a ^"),
                              ConfigProblem("d", "web_handlers[1].domain", "not this one")], ("web_handlers", 2), keys)
    assert errors == {"path_regexp": "must start with a ^"}


ROUTES = """\
# top
[accounts.alice]
domain = "example.org"
[accounts.alice.destinations."alice@example.org"]

# Global routes.

# first route
[[routes]]
to_domain = ["a.example"]  # inline
transport = "t1"

# second route
[[routes]]
transport = "t2"

# a free comment

# third route
[[routes]]
transport = "t3"

# the end of the file
"""


def _transports(doc) -> list[str]:
    return [r["transport"] for r in doc["routes"]]


def test_moving_an_entry_moves_the_comment_above_it():
    doc = tomlkit.parse(ROUTES)
    move_entry(doc, "routes", 2, 0)
    text = tomlkit.dumps(doc)
    assert _transports(tomlkit.parse(text)) == ["t3", "t1", "t2"]
    assert "# third route\n[[routes]]\ntransport = \"t3\"" in text
    assert "# first route\n[[routes]]\nto_domain = [\"a.example\"]  # inline" in text
    for comment in ("# top", "# Global routes.", "# a free comment", "# the end of the file"):
        assert comment in text
    assert text.index("# Global routes.") < text.index("# third route")


def test_removing_an_entry_removes_only_its_own_comment():
    doc = tomlkit.parse(ROUTES)
    remove_entry(doc, "routes", 1)
    text = tomlkit.dumps(doc)
    assert _transports(tomlkit.parse(text)) == ["t1", "t3"]
    assert "# second route" not in text
    for comment in ("# top", "# Global routes.", "# first route", "# a free comment", "# third route", "# the end"):
        assert comment in text
    for _ in range(2):
        remove_entry(doc, "routes", 0)
    text = tomlkit.dumps(doc)
    assert "routes" not in tomlkit.parse(text) and "# the end of the file" in text and "# a free comment" in text


def test_appending_an_entry_and_a_first_entry_of_a_table():
    doc = tomlkit.parse(ROUTES)
    assert append_entry(doc, "routes", {"transport": "t4"}) == 3
    assert append_entry(doc["accounts"]["alice"], "routes", {"transport": "mine"}) == 0
    text = tomlkit.dumps(doc)
    again = tomlkit.parse(text)
    assert _transports(again) == ["t1", "t2", "t3", "t4"]
    assert again["accounts"]["alice"]["routes"][0]["transport"] == "mine"
    assert text.index('transport = "mine"') < text.index("# Global routes.")  # the comment stays above its routes
    assert text.rstrip().endswith("# the end of the file")


def test_entries_right_after_the_keys_of_their_table_are_moved_and_removed():
    """The comments above the first entry are in the parent table's own body here, among its
    keys (tomlkit indexes those by position)."""
    doc = tomlkit.parse('[domains."example.org"]\ndescription = "x"\n\n# first\n[[domains."example.org".routes]]\n'
                        'transport = "a"\n\n# second\n[[domains."example.org".routes]]\ntransport = "b"\n\n'
                        '[accounts.admin]\ndomain = "example.org"\n')
    dom = doc["domains"]["example.org"]
    move_entry(dom, "routes", 1, 0)
    text = tomlkit.dumps(doc)
    assert '# second\n[[domains."example.org".routes]]\ntransport = "b"\n\n# first\n' in text
    doc = tomlkit.parse(text)
    dom = doc["domains"]["example.org"]
    dom["description"] = "changed"  # the keys are still found where they are
    remove_entry(dom, "routes", 0)
    remove_entry(dom, "routes", 0)
    text = tomlkit.dumps(doc)
    assert text == '[domains."example.org"]\ndescription = "changed"\n\n[accounts.admin]\ndomain = "example.org"\n'
