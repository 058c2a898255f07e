"""The admin pages' queue (through the server's ctl socket), transports and plugins, through a
real ``mox serve`` over HTTP, with real peers: a DNS server, an MX that greylists (so
messages stay queued) and a smarthost (smtp-sink) behind the transport ``sink``. And a
third-party plugin's transport and web handler kind, whose settings the pages show and edit
without UI code of their own."""

from __future__ import annotations

import html
import json
import os
import re

import pytest

from mox_testpeers import wait_for
from mox_testpeers.dnsserver import DNSServer
from mox_testpeers.sink import SmtpSink
from tests.adminweb import AdminWeb, form_fields
from tests.conftest import ROOT

GREYLIST = "451 4.7.1 greylisted, please try again later"


@pytest.fixture(scope="module")
def peers():
    dns = DNSServer().start()
    mx = SmtpSink(reject_4xx="RCPT", soft_reply=GREYLIST).start()
    smarthost = SmtpSink().start()
    dns.add("sink.test", "A", "127.0.0.1")
    dns.add("remote.test", "MX", "10 mx.remote.test.")
    dns.add("mx.remote.test", "A", "127.0.0.1")
    try:
        yield dns, mx, smarthost
    finally:
        for peer in (smarthost, mx, dns):
            peer.stop()


@pytest.fixture(scope="module")
def web(tmp_path_factory, peers):
    dns, mx, smarthost = peers
    static = f"\n[testing]\nallow_private_targets = true\ndirect_smtp_port = {mx.port}\n"
    w = AdminWeb(tmp_path_factory.mktemp("admin-queue") / "mox", static=static, sink_port=smarthost.port,
                 nameserver=dns.nameserver)
    w.mox.set_password("alice", "alice-secret-1")
    yield w
    w.stop()


def queued(web: AdminWeb, to: str) -> list[int]:
    """Ids of the queued messages to ``to`` (as `mox queue list` shows them)."""
    out = web.mox.mox("queue", "list", "--to", to).stdout
    return [int(m) for m in re.findall(r"^\s*(\d+) ", out, re.M)]


def submit_and_wait(web: AdminWeb, *recipients: str, subject: str = "queued") -> list[int]:
    """Submit from alice to ``recipients``, wait for the MX's greylisting of the first attempt."""
    for to in recipients:
        web.submit("alice@example.org", "alice-secret-1", to, subject)
    for to in recipients:
        wait_for(lambda to=to: "greylisted" in web.mox.mox("queue", "list", "--to", to).stdout, 20,
                 what=f"the first attempt to {to}")
    return [i for to in recipients for i in queued(web, to)]


def post(web, client, data: dict[str, str]):
    return client.post(web.url("/admin/queue/act"), data=data, headers={"origin": web.origin()})


def row_ids(body: str) -> list[int]:
    return [int(i) for i in re.findall(r'name="m\.(\d+)"', body)]


def test_the_queue_is_listed_with_filters_and_a_message_shown(web):
    ids = submit_and_wait(web, "list1@remote.test", "list2@remote.test", subject="Quarterly numbers")
    with web.admin() as c:
        page = c.get(web.url("/admin/queue")).text
        assert set(ids) <= set(row_ids(page)) and "greylisted, please try again later" in page
        page = c.get(web.url("/admin/queue?to=list1%40remote&account=alice")).text
        assert row_ids(page) == [ids[0]] and "matching the filter" in page
        assert row_ids(c.get(web.url("/admin/queue?to=list1%40remote&held=yes")).text) == []
        assert sorted(row_ids(c.get(web.url("/admin/queue?to=list&from=%40example.org&transport=-")).text)) == ids
        assert row_ids(c.get(web.url("/admin/queue?to=list&transport=sink")).text) == []
        one = c.get(web.url(f"/admin/queue/{ids[0]}"))
        assert one.status_code == 200
        text = html.unescape(one.text)
        assert "list1@remote.test" in text and "Quarterly numbers" in text and "greylisted" in text
        assert re.search(r"<dt>Subject</dt><dd>Quarterly numbers</dd>", one.text)
        assert c.get(web.url("/admin/queue/999999")).status_code == 404


def test_a_message_is_held_released_and_kicked_through_a_transport(web, peers):
    smarthost = peers[2]
    [msg_id] = submit_and_wait(web, "kick@remote.test")
    with web.admin() as c:
        csrf = form_fields(c.get(web.url("/admin/queue")).text, "/admin/queue/act")["csrf"]
        r = post(web, c, {"csrf": csrf, "op": "hold", f"m.{msg_id}": "1"})
        assert r.status_code == 303
        assert "1 message held." in c.get(web.url(r.headers["location"])).text
        assert row_ids(c.get(web.url("/admin/queue?held=yes")).text) == [msg_id]
        assert queued(web, "kick@") == [msg_id] and "kick@" in web.mox.mox("queue", "list", "--hold", "true").stdout
        r = post(web, c, {"csrf": csrf, "op": "unhold", "target": "filter", "held": "yes", "to": "kick@"})
        assert "1 message released." in c.get(web.url(r.headers["location"])).text
        assert row_ids(c.get(web.url("/admin/queue?held=yes")).text) == []
        r = post(web, c, {"csrf": csrf, "op": "kick", "id": str(msg_id), "back": str(msg_id), "kick_transport": "sink"})
        assert r.status_code == 303
    [delivered] = [m for m in smarthost.wait_for_messages(1, timeout=20) if "kick@remote.test" in m.rcpt_to]
    assert delivered.mail_from == "alice@example.org"
    wait_for(lambda: queued(web, "kick@") == [], 20, what="the message to leave the queue")


def test_fail_and_drop_ask_first_then_act(web):
    [fail_id, drop_id] = submit_and_wait(web, "fail@remote.test", "drop@remote.test")
    dsns = len(web.mox.messages("alice"))
    with web.admin() as c:
        csrf = form_fields(c.get(web.url("/admin/queue")).text, "/admin/queue/act")["csrf"]
        r = post(web, c, {"csrf": csrf, "op": "fail", f"m.{fail_id}": "1"})
        assert r.status_code == 200 and f"Fail message {fail_id}?" in r.text
        assert queued(web, "fail@") == [fail_id]  # not yet
        r = post(web, c, {**form_fields(r.text, "/admin/queue/act")})
        assert "1 message failed (the sender gets a DSN)." in c.get(web.url(r.headers["location"])).text
        wait_for(lambda: len(web.mox.messages("alice")) > dsns, 20, what="the DSN in alice's Inbox")
        assert b"delivery canceled by admin" in web.mox.messages("alice")[-1]
        r = post(web, c, {"csrf": csrf, "op": "drop", "target": "filter", "to": "drop@remote"})
        assert r.status_code == 200 and "Drop every message the filter matches?" in r.text
        r = post(web, c, {**form_fields(r.text, "/admin/queue/act")})
        assert "1 message dropped (no DSN)." in c.get(web.url(r.headers["location"])).text
    assert queued(web, "fail@") == [] and queued(web, "drop@") == []


def test_an_action_for_no_message_changes_nothing(web):
    with web.admin() as c:
        csrf = form_fields(c.get(web.url("/admin/domains")).text, "/admin/domains/add")["csrf"]
        r = post(web, c, {"csrf": csrf, "op": "drop"})
        assert r.status_code == 303 and "none=1" in r.headers["location"]
        r = post(web, c, {"op": "drop", "target": "filter"})
        assert r.status_code == 403


def test_without_the_servers_ctl_socket_the_queue_page_says_so(web):
    ctl = web.mox.data_dir / "ctl"
    moved = ctl.with_name("ctl.moved")
    os.rename(ctl, moved)
    try:
        with web.admin() as c:
            r = c.get(web.url("/admin/queue"))
            assert r.status_code == 503 and "The server's control socket is not there." in r.text
            assert str(ctl) in r.text
            assert "does not seem to run" in c.get(web.url("/admin/")).text
            csrf = form_fields(c.get(web.url("/admin/domains")).text, "/admin/domains/add")["csrf"]
            r = post(web, c, {"csrf": csrf, "op": "kick", "target": "filter"})
            assert r.status_code == 503 and "control socket is not there" in r.text
    finally:
        os.rename(moved, ctl)
    with web.admin() as c:
        assert c.get(web.url("/admin/queue")).status_code == 200


# --------------------------------------------------------------------------------------------
# transports and plugins


def test_the_transports_page_shows_each_transport_with_its_kind_plugin_and_settings(web):
    with web.admin() as c:
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", c.get(web.url("/admin/transports")).text)))
    assert "sink kind smtp Plugin transport_smtp from mox-transport-smtp" in text
    assert "Used by global route 1" in text
    assert "host sink.test Smarthost DNS name" in text and "no_starttls true" in text
    assert "starttls_insecure_skip_verify default false" in text  # a default, not in mox.toml
    for kind in ("direct", "smtp", "socks", "submission"):
        assert f" {kind} plugin transport_" in text


def test_the_plugins_page_lists_what_mox_plugins_list_shows(web):
    listed = json.loads(web.mox.mox("plugins", "list", "--json", "--all").stdout)
    with web.admin() as c:
        body = c.get(web.url("/admin/plugins")).text
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]
    assert len(rows) == len(listed)
    for p in listed:
        [row] = [r for r in rows if f">{p['name']}<" in r or f">{p['name']} <" in r]
        text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row)))
        for value in [p["distribution"], p["version"], p["status"], *p["kinds"]]:
            assert value is None or value in text
        assert all(h.removeprefix("mox_") in text for h in p["hooks"])


# --------------------------------------------------------------------------------------------
# a third-party plugin


HELLO = '''
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mox_core import hookimpl
from mox_core.api import WebHandlerKind


class HelloSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    greeting: str = Field(description="What the page says.")
    shout: bool = Field(False, description="In capitals.")
    repeat: int = Field(1, ge=1, le=5, description="How many times.")
    style: Literal["plain", "fancy"] = Field("plain", description="How it looks.")


def factory(settings, ctx):
    async def app(scope, receive, send):
        text = settings.greeting.upper() if settings.shout else settings.greeting
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": " ".join([text] * settings.repeat).encode()})
    return app


@hookimpl
def mox_register_webhandlers():
    return [WebHandlerKind("hello", HelloSettings, factory, "Says hello (a third-party plugin).")]
'''


def test_a_third_party_transport_and_web_handler_kind_get_their_forms(tmp_path, fake_dist):
    """The transport plugin of tests/data (its own distribution) and a web handler kind made
    here are installed next to mox: their settings appear in the pages' forms, generated from
    their models; a handler of the new kind is added through its form and serves."""
    site = fake_dist("mox-transport-file", {"transport_file": "mox_transport_file.plugin"}, {}, version="1.0.0")
    fake_dist("mox-webhandler-hello", {"webhandler_hello": "mox_webhandler_hello"}, {"mox_webhandler_hello": HELLO})
    path = os.pathsep.join([str(site), str(ROOT / "tests" / "data" / "mox-transport-file"),
                            os.environ.get("PYTHONPATH", "")])
    outbox = tmp_path / "outbox"
    web = AdminWeb(tmp_path / "mox", env={"PYTHONPATH": path},
                   static=f'\n[transports.archive]\nkind = "file"\ndirectory = "{outbox}"\n')
    try:
        with web.admin() as c:
            text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", c.get(web.url("/admin/transports")).text)))
            assert "archive kind file Plugin transport_file from mox-transport-file 1.0.0" in text
            assert f"directory {outbox} Directory to write messages to." in text
            assert "file plugin transport_file · mox-transport-file Write messages to a directory." in text
            assert "transport:file" in c.get(web.url("/admin/plugins")).text

            page = c.get(web.url("/admin/web/add?kind=hello"))
            assert page.status_code == 200
            assert "Settings of kind hello (plugin webhandler_hello)" in page.text
            fields = form_fields(page.text, "/admin/web/add")
            assert {"greeting", "shout", "repeat", "style"} <= set(fields)
            assert "What the page says." in page.text and "How many times." in page.text
            assert re.search(r'<option value="fancy">fancy</option>', page.text)
            r = web.submit_form(c, "/admin/web/add?kind=hello", "/web/add", {
                "domain": "hi.example.org", "dont_redirect_plaintext": "true", "greeting": "hej", "shout": "true",
                "repeat": "9"})
            assert r.status_code == 400 and "Input should be less than or equal to 5" in r.text
            r = web.submit_form(c, "/admin/web/add?kind=hello", "/web/add", {
                "domain": "hi.example.org", "dont_redirect_plaintext": "true", "greeting": "hej", "shout": "true",
                "repeat": "2"})
            assert r.status_code == 303
            assert 'kind = "hello"\ndomain = "hi.example.org"' in web.domains_path.read_text()
            assert "style" not in web.domains_path.read_text()  # its default: not written
            got = web.client().get(web.url("/"), headers={"host": "hi.example.org"})
            assert got.status_code == 200 and got.text == "HEJ HEJ"

            assert '<option value="archive">archive</option>' in c.get(web.url("/admin/routes")).text
            r = web.submit_form(c, "/admin/routes", "/routes/add", {"transport": "archive", "to_domain": "x.example"})
            assert r.status_code == 303
            out = c.get(web.url("/admin/routes?from=admin%40example.org&to=a%40x.example&attempt=1")).text
            assert "transport: archive (kind file), from global route #2" in html.unescape(out)
    finally:
        web.stop()
