"""``mox queue ...`` through the ctl socket of a running queue, and directly on the database."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import stat
import sys

import pytest

from mox_core.cli.queue import format_list, go_duration
from mox_core.errors import MoxError
from mox_core.queue import FakeClock, Queue
from mox_core.server.ctl import CtlError, CtlServer, CtlUnavailable, call, socket_path
from tests.conftest import ROOT
from tests.plugins.queue_helpers import MSG, cfg, maildir_new, reset_script, running  # noqa: F401 (fixtures)
from tests.plugins.queue_scripted import SCRIPT, T

WRAPPER = """\
import sys
from mox_core.cli.main import cli
from mox_core.cli.queue import register
from mox_core import logging as moxlog
from tests.plugins.queue_helpers import make_host

moxlog.configure(json=False)  # as mox_core.cli.main does: logs on stderr
register(cli)
cli.main(args=sys.argv[1:], obj=make_host(), prog_name="mox")
"""


@pytest.fixture
def mox(tmp_path, cfg):
    """Run the mox command (with the queue commands registered) in a subprocess, async."""
    wrapper = tmp_path / "moxcli.py"
    wrapper.write_text(WRAPPER)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MOX_CONFIG", None)

    async def run(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(wrapper), "--config", str(cfg.path), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode("utf-8", "replace"), err.decode()

    return run


async def wait_for(cond, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_queue_commands_act_on_the_running_server(cfg, mox):
    SCRIPT.default = (T, 451, "4.0.0", "try later")
    async with running(cfg) as q:
        ctl = CtlServer(socket_path(cfg.data_dir), q.ctl_handlers())
        await ctl.start()
        try:
            ida = (await q.add(account="alice", mail_from="alice@example.org",
                               recipients=["a@remote.example"], data=MSG))[0]
            idb = (await q.add(account="alice", mail_from="alice@example.org",
                               recipients=["b@other.example"], data=MSG))[0]
            await q.scheduler.settle()
            q.clock.advance(60)

            rc, out, err = await mox("queue", "list")
            assert rc == 0, err
            lines = out.splitlines()
            assert lines[0] == "messages:" and len(lines) == 3
            line_re = (r"^ +{id} \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d from:alice@example.org "
                       r"to:{to} next 6m30s last 1m0s error \"try later\"$")
            assert re.match(line_re.format(id=idb, to="b@other.example"), lines[1]), lines
            assert re.match(line_re.format(id=ida, to="a@remote.example"), lines[2]), lines
            assert "server not running" not in err

            rc, out, _ = await mox("queue", "list", "--to", "other.example")
            assert len(out.splitlines()) == 2 and "b@other.example" in out

            rc, out, _ = await mox("queue", "hold", "--to", "a@")
            assert (rc, out) == (0, "1 messages changed\n")
            rc, out, _ = await mox("queue", "list", "--hold", "true")
            assert out.splitlines()[1:] and all("a@remote" in line for line in out.splitlines()[1:])

            # kick: the server applies it and wakes its scheduler (no clock change here)
            calls = len(SCRIPT.calls)
            rc, out, _ = await mox("queue", "kick", "--ids", str(idb), "--transport", "relay")
            assert (rc, out) == (0, "1 messages scheduled\n")
            await wait_for(lambda: len(SCRIPT.calls) == calls + 1)
            assert SCRIPT.calls[-1].transport == "relay" and SCRIPT.calls[-1].recipients == ["b@other.example"]

            rc, out, err = await mox("queue", "kick", "--transport", "nosuch")
            assert rc != 0 and "unknown transport 'nosuch'" in err

            rc, out, _ = await mox("queue", "list", "--transport", "relay")
            assert len(out.splitlines()) == 2 and "b@other.example" in out

            rc, out, _ = await mox("queue", "dump", str(ida))
            assert rc == 0 and out.encode() == MSG
            rc, _, err = await mox("queue", "dump", "9999")
            assert rc != 0 and "no message with id 9999" in err

            rc, out, _ = await mox("queue", "unhold")
            assert out == "1 messages changed\n"
            rc, out, _ = await mox("queue", "fail", "--to", "a@remote")
            assert out == "1 message(s) marked as failed\n"
            [dsn] = maildir_new(cfg, "alice")
            assert b"delivery canceled by admin" in dsn.read_bytes()
            rc, out, _ = await mox("queue", "drop", "--from", "@example.org")
            assert out == "1 messages dropped\n"
            rc, out, _ = await mox("queue", "list")
            assert out == "messages:\n(none)\n"
            assert len(maildir_new(cfg, "alice")) == 1  # drop sends no DSN
        finally:
            await ctl.close()
    assert not socket_path(cfg.data_dir).exists()


async def test_without_a_server_commands_use_the_database(cfg, mox):
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    await q.add(account="alice", mail_from="alice@example.org", recipients=["a@remote.example"], data=MSG)
    await q.add(account="alice", mail_from="alice@example.org", recipients=["b@remote.example"], data=MSG)
    # while a process holds the queue but answers no ctl socket, refuse
    rc, _, err = await mox("queue", "list")
    assert rc != 0 and "in use by a running mox" in err
    await q.close()

    rc, out, err = await mox("queue", "list")
    assert rc == 0 and "server not running" in err
    assert len(out.splitlines()) == 3
    rc, out, _ = await mox("queue", "drop", "--to", "a@")
    assert out == "1 messages dropped\n"
    rc, out, _ = await mox("queue", "kick")
    assert out == "1 messages scheduled\n"
    q = Queue(cfg, clock=FakeClock())
    await q.open()
    try:
        [m] = await q.list_messages()
        assert m.recipient == "b@remote.example" and m.next_attempt > 1_700_000_000 + 86400
    finally:
        await q.close()


async def test_commands_on_a_data_dir_without_queue(cfg, mox):
    rc, out, _ = await mox("queue", "list")
    assert (rc, out) == (0, "messages:\n(none)\n")
    assert not (cfg.data_dir / "queue").exists()


async def test_ctl_socket_is_private_and_answers_errors(tmp_path):
    path = tmp_path / "ctl"
    seen = []

    async def echo(args):
        seen.append(args)
        if args.get("fail"):
            raise MoxError("refused for a reason")
        return {"echo": args}

    server = CtlServer(path, {"echo": echo})
    await server.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert await asyncio.to_thread(call, path, "ping") == "pong"
        assert await asyncio.to_thread(call, path, "echo", {"x": [1, "é"]}) == {"echo": {"x": [1, "é"]}}
        with pytest.raises(CtlError, match="refused for a reason"):
            await asyncio.to_thread(call, path, "echo", {"fail": True})
        with pytest.raises(CtlError, match="unknown command 'nope'"):
            await asyncio.to_thread(call, path, "nope")

        def raw(data: bytes) -> list[dict]:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                return [json.loads(line) for line in s.makefile("rb")]

        got = await asyncio.to_thread(raw, b'not json\n{"command":"ping"}\n')
        assert got[0]["ok"] is False and "bad request" in got[0]["error"]
        assert got[1] == {"ok": True, "result": "pong"}
        with pytest.raises(MoxError, match="another mox is running"):
            await CtlServer(path, {}).start()
    finally:
        await server.close()
    with pytest.raises(CtlUnavailable):
        call(path, "ping")
    # a socket file left by a crashed server is replaced
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(CtlUnavailable):
        call(path, "ping")
    server = CtlServer(path, {})
    await server.start()
    try:
        assert await asyncio.to_thread(call, path, "ping") == "pong"
    finally:
        await server.close()


def test_list_format_and_go_durations():
    assert [go_duration(s) for s in (0, 5, 450, 3600, 3661, -90)] == [
        "0s", "5s", "7m30s", "1h0m0s", "1h1m1s", "-1m30s"]
    assert format_list([], 0) == ["messages:", "(none)"]
