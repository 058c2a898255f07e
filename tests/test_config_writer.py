"""mox writing domains.toml itself: comments and layout kept, validated before anything is
written, refused when the file changed since it was read, atomic, and effective at once in
every process that watches the config generation."""

from __future__ import annotations

import os
import smtplib

import pytest

from mox_core.config import edits
from mox_core.config.generation import Generation
from mox_core.config.holder import ConfigHolder
from mox_core.config.loader import load_config
from mox_core.config.writer import DomainsWriter, StaleConfig
from mox_core.errors import ConfigError
from mox_core.plugins.host import PluginHost
from mox_core.testing import write_config
from mox_testpeers.moxserver import MoxServer
from tests.conftest import run_mox

COMMENTED = """\
# Our mail domains. Keep this comment.
[domains."example.org"]  # the main one
localpart_catchall_separators = ["+"]

# People, one table each.
[accounts.admin]
domain = "example.org"  # default domain

[accounts.admin.destinations."admin@example.org"]

# Routes come last.
[[routes]]
to_domain = [".example.net"]
transport = "relay"
"""

STATIC = """
[transports.relay]
kind = "smtp"
host = "localhost"  # never connected to (these tests only edit the config); loopback all the same
"""


def writer_for(tmp_path, domains=COMMENTED):
    """A writer of a config whose domains.toml is ``domains`` (with its comments)."""
    path = write_config(tmp_path, STATIC, "")
    (tmp_path / "domains.toml").write_text(domains)
    cfg = load_config(path, PluginHost.load())
    gen = Generation(cfg.data_dir)
    holder = ConfigHolder(cfg, generation=gen)
    return DomainsWriter(holder, gen), holder, gen


def test_comments_order_and_layout_survive_an_edit(tmp_path):
    writer, holder, _ = writer_for(tmp_path)
    writer.change(lambda doc: edits.add_account(doc, "alice", "alice@example.org"))
    text = (tmp_path / "domains.toml").read_text()
    assert text.startswith(COMMENTED.split("# Routes come last.")[0])  # everything before is byte for byte
    assert '[accounts.alice]\ndomain = "example.org"\n\n[accounts.alice.destinations."alice@example.org"]\n' in text
    assert text.index("[accounts.alice]") < text.index("# Routes come last.") < text.index("[[routes]]")
    assert "alice@example.org" in holder.get().dynamic.addresses


def test_an_invalid_change_writes_nothing_and_names_the_problem(tmp_path):
    writer, holder, _ = writer_for(tmp_path)
    before = (tmp_path / "domains.toml").read_bytes()
    with pytest.raises(ConfigError) as exc:
        writer.change(lambda doc: edits.add_account(doc, "bob", "bob@unknown.example"))
    assert [(p.path, p.message) for p in exc.value.problems] == [
        ("accounts.bob.domain", "unknown domain 'unknown.example'"),
        ('accounts.bob.destinations."bob@unknown.example"', "unknown domain for address")]
    assert (tmp_path / "domains.toml").read_bytes() == before
    assert "bob" not in holder.get().dynamic.model.accounts
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_stale_save_is_refused(tmp_path):
    writer, _, _ = writer_for(tmp_path)
    first, second = writer.read(), writer.read()  # two admins load the page
    writer.change(lambda doc: edits.add_domain(doc, "a.example"), version=first.version)
    before = (tmp_path / "domains.toml").read_bytes()
    with pytest.raises(StaleConfig, match="changed since you loaded it"):
        writer.change(lambda doc: edits.add_domain(doc, "b.example"), version=second.version)
    assert (tmp_path / "domains.toml").read_bytes() == before


def test_a_write_bumps_the_generation_and_other_holders_reload_at_once(tmp_path):
    writer, _, gen = writer_for(tmp_path)
    other = ConfigHolder(writer.holder.get(), interval=3600, generation=Generation(writer.holder.get().data_dir))
    assert "x.example" not in other.get().dynamic.domains
    n = gen.current()
    writer.change(lambda doc: edits.add_domain(doc, "x.example"))
    assert gen.current() == n + 1
    assert "x.example" in other.get().dynamic.domains  # the next get, not within a second


def test_the_file_is_replaced_by_rename_not_rewritten_in_place(tmp_path):
    writer, _, _ = writer_for(tmp_path)
    inode = os.stat(tmp_path / "domains.toml").st_ino
    writer.change(lambda doc: edits.add_domain(doc, "y.example"))
    assert os.stat(tmp_path / "domains.toml").st_ino != inode


def test_edits_refuse_what_does_not_apply(tmp_path):
    writer, _, _ = writer_for(tmp_path)
    with pytest.raises(edits.EditError, match="address admin@example.org already belongs to account admin"):
        writer.change(lambda doc: edits.add_address(doc, "admin", "admin@example.org"))
    with pytest.raises(edits.EditError, match="is the last address of account admin"):
        writer.change(lambda doc: edits.remove_address(doc, "admin@example.org"))
    with pytest.raises(edits.EditError, match="domain example.org is still used by: account admin"):
        writer.change(lambda doc: edits.remove_domain(doc, "example.org"))


def test_the_stale_text():
    assert str(StaleConfig()) == "domains.toml was changed since you loaded it; nothing was written, load it again"


def test_read_gives_the_document_and_the_sha256_of_the_bytes(tmp_path):
    import hashlib

    writer, _, _ = writer_for(tmp_path)
    f = writer.read()
    assert f.version == hashlib.sha256(COMMENTED.encode()).hexdigest()
    assert f.doc.unwrap()["accounts"]["admin"]["domain"] == "example.org"
    assert f.doc.as_string() == COMMENTED


def test_the_new_config_has_the_files_time_and_is_checked_against_mox_toml(tmp_path):
    writer, holder, _ = writer_for(tmp_path)
    new = writer.change(lambda doc: edits.add_domain(doc, "t.example"))
    assert new.dynamic.mtime == (tmp_path / "domains.toml").stat().st_mtime and holder.get() is new
    path = str(tmp_path / "domains.toml")
    # the postmaster account of mox.toml, and the transports of mox.toml, are checked too
    with pytest.raises(ConfigError) as exc:
        writer.change(lambda doc: edits.remove_account(doc, "admin"))
    assert [(p.file, p.path, p.message) for p in exc.value.problems] == [
        (path, "accounts", "postmaster account 'admin' (from mox.toml) is not defined")]

    def route_to_nowhere(doc):
        doc["routes"][0]["transport"] = "nowhere"

    with pytest.raises(ConfigError) as exc:
        writer.change(route_to_nowhere)
    assert [p.file for p in exc.value.problems] == [path]
    assert "nowhere" in str(exc.value.problems[0])


def test_an_edit_that_makes_bad_toml_writes_nothing(tmp_path, monkeypatch):
    import tomlkit

    writer, _, _ = writer_for(tmp_path)
    before = (tmp_path / "domains.toml").read_bytes()
    monkeypatch.setattr(tomlkit, "dumps", lambda doc: "[broken\n")
    with pytest.raises(ConfigError) as exc:
        writer.change(lambda doc: None)
    [problem] = exc.value.problems
    assert (problem.file, problem.path) == (str(tmp_path / "domains.toml"), "")
    assert problem.message.startswith("invalid TOML: ")
    assert (tmp_path / "domains.toml").read_bytes() == before


def test_the_file_keeps_its_mode(tmp_path):
    writer, _, _ = writer_for(tmp_path)
    os.chmod(tmp_path / "domains.toml", 0o640)
    writer.change(lambda doc: edits.add_domain(doc, "m.example"))
    assert os.stat(tmp_path / "domains.toml").st_mode & 0o777 == 0o640


def test_a_failing_chmod_does_not_stop_the_write(tmp_path, monkeypatch):
    writer, _, _ = writer_for(tmp_path)

    def no_chmod(path, mode):
        raise PermissionError(1, "not permitted", str(path))

    monkeypatch.setattr(os, "chmod", no_chmod)
    writer.change(lambda doc: edits.add_domain(doc, "c.example"))
    assert "c.example" in (tmp_path / "domains.toml").read_text()


def test_a_failing_write_leaves_the_file_and_no_temporary_file(tmp_path, monkeypatch):
    from mox_core.config import writer as writer_module

    writer, _, _ = writer_for(tmp_path)
    before = (tmp_path / "domains.toml").read_bytes()

    def no_open(path, mode):
        raise PermissionError(13, "denied", str(path))

    monkeypatch.setattr(writer_module, "open", no_open, raising=False)
    with pytest.raises(PermissionError, match="denied"):
        writer.change(lambda doc: edits.add_domain(doc, "w.example"))
    assert (tmp_path / "domains.toml").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_cli_adds_an_account_that_a_running_server_accepts_mail_for_at_once(tmp_path):
    server = MoxServer(tmp_path / "mox", static_top="smtp_workers = 2\n", domains=COMMENTED.split("# Routes")[0])
    server.start()
    try:
        r = run_mox("--config", str(server.config_path), "config", "account", "add", "carol", "carol@example.org")
        assert r.returncode == 0, r.stderr
        # the very next RCPT TO, in whichever worker, knows the new address
        for _ in range(4):
            with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as c:
                c.ehlo("client.example")
                c.mail("someone@remote.example")
                assert c.rcpt("carol@example.org")[0] == 250
        r = run_mox("--config", str(server.config_path), "config", "address", "add", "carol@unknown.example", "carol")
        assert r.returncode == 1
        assert 'accounts.carol.destinations."carol@unknown.example": unknown domain for address' in r.stderr
    finally:
        server.stop()


def test_a_temp_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    writer, _, _ = writer_for(tmp_path)
    stale = tmp_path / ".domains.toml.999999.tmp"
    stale.write_text("half a file")
    writer.change(lambda doc: edits.add_account(doc, "alice", "alice@example.org"))
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_temp_file_gone_before_its_removal_does_not_stop_the_write(tmp_path, monkeypatch):
    """Another process removed the stale temp file between the listing and the unlink (or
    it cannot be removed): the save still goes through."""
    writer, _, _ = writer_for(tmp_path)
    stale = tmp_path / ".domains.toml.999999.tmp"
    stale.write_text("half a file")
    real_unlink = type(stale).unlink

    def unlink(self, missing_ok=False):
        if self.name == stale.name:
            real_unlink(self)
            raise FileNotFoundError(2, "No such file or directory", str(self))
        real_unlink(self, missing_ok)

    monkeypatch.setattr(type(stale), "unlink", unlink)
    writer.change(lambda doc: edits.add_account(doc, "alice", "alice@example.org"))
    assert "[accounts.alice]" in (tmp_path / "domains.toml").read_text()
