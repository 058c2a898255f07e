"""Postfix with the OpenDKIM milter, as a Postfix administrator signs and verifies: the peers
of ``bench/dkimcost.py``.

* :class:`OpenDKIM`: a private ``opendkim`` (Debian's package) in the foreground, listening on
  a unix socket in its directory as Debian configures it (``local:``; ``inet:PORT@127.0.0.1``
  with ``unix=False``), its config, pid and nothing else under the benchmark's directory.
  One instance per job, as OpenDKIM wants one ``SignatureAlgorithm`` per instance: a verifier
  (``Mode v``, keys from the benchmark's DNS responder), an RSA signer and an Ed25519 signer
  (``Mode s``, ``InternalHosts 127.0.0.0/8``: every loopback client is signed). Settings are
  Debian's ``/etc/opendkim.conf`` apart from what a private instance needs (socket, pid, no
  syslog, the key, ``RequireSafeKeys no`` for a key under /tmp) and ``Canonicalization
  relaxed/relaxed`` (Debian's file says relaxed/simple), which mox signs with by default, so
  that both sign alike. Stopped with SIGKILL: it
  keeps no state, and SIGTERM takes it 3-5 s.
* :class:`PostfixMilters`: the ``accept`` Postfix of ``common.PostfixBench`` with one more
  smtpd listener per milter (``-o smtpd_milters=`` the milter's socket; with AUTH for a signer,
  like the submission listener), and for each a twin whose cleanup logs (``header_checks``
  WARN) the header the milter adds, which the benchmark checks once before measuring. The
  measured listeners run the stock cleanup. ``milter_default_action`` stays ``tempfail``
  (Postfix's default): a milter that dies fails the run instead of letting mail through
  unsigned, which would look faster.

Signing domains of the benchmark: ``rsa.bench.test`` (selector ``rsa``) and ``ed.bench.test``
(selector ``ed``); the signers use no DNS. The verifier resolves through ``Nameservers`` only
(libunbound), so the signers of incoming mail are outside ``.test``, a zone libunbound
answers itself (NXDOMAIN) without asking a nameserver.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

from common import PostfixBench

from mox_testpeers import free_port, wait_banner, wait_for, wait_port
from mox_testpeers.lifecycle import PeerProcess
from mox_testpeers.postfix import backdate_config


def opendkim_path() -> str:
    exe = shutil.which("opendkim") or "/usr/sbin/opendkim"
    if not os.path.exists(exe):
        raise SystemExit("opendkim not found: apt-get install opendkim opendkim-tools")
    return exe


def opendkim_version() -> str:
    p = subprocess.run([opendkim_path(), "-V"], capture_output=True, text=True)
    m = re.search(r"OpenDKIM Filter v(\S+)", p.stdout + p.stderr)
    return m.group(1) if m else "?"


class OpenDKIM:
    """A private opendkim: ``mode`` "v" (verify) or "s" (sign ``domain`` with ``selector``'s
    ``key_file``, ``algorithm`` rsa-sha256 or ed25519-sha256)."""

    def __init__(self, base: Path, name: str, mode: str, *, nameserver: str | None = None,
                 domain: str = "", selector: str = "", key_file: Path | None = None, algorithm: str = "",
                 unix: bool = False):
        self.dir = base / f"opendkim-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.unix = self.dir / "opendkim.sock" if unix else None
        if unix:  # opendkim creates its socket after dropping to its user
            shutil.chown(self.dir, "opendkim", "opendkim")
        lines = [
            f"Mode                    {mode}",
            "Syslog                  no",
            f"UMask                   {'000' if unix else '007'}",
            "UserID                  opendkim:opendkim",
            f"Socket                  {'local:' + str(self.unix) if unix else f'inet:{self.port}@127.0.0.1'}",
            f"PidFile                 {self.dir}/opendkim.pid",
            "Canonicalization        relaxed/relaxed",
            "OversignHeaders         From",
        ]
        if nameserver:  # host:port -> libunbound's forwarder syntax host@port
            lines.append(f"Nameservers             {nameserver.replace(':', '@')}")
        if mode == "s":
            assert key_file is not None
            key = self.dir / key_file.name  # readable by the opendkim user only
            shutil.copyfile(key_file, key)
            shutil.chown(key, "opendkim", "opendkim")
            os.chmod(key, 0o600)
            lines += [f"Domain                  {domain}", f"Selector                {selector}",
                      f"KeyFile                 {key}", f"SignatureAlgorithm      {algorithm}",
                      "RequireSafeKeys         no", "InternalHosts           127.0.0.0/8"]
        self.conf = self.dir / "opendkim.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.process = PeerProcess([opendkim_path(), "-f", "-x", str(self.conf)],
                                   log_file=self.dir / "opendkim.log", stop_timeout=0.1, kill_timeout=5)

    @property
    def milter(self) -> str:
        return f"unix:{self.unix}" if self.unix else f"inet:127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.running

    def start(self) -> OpenDKIM:
        subprocess.run([opendkim_path(), "-n", "-x", str(self.conf)], check=True)  # config check
        if self.unix:
            def ready(proc: subprocess.Popen) -> None:
                wait_for(lambda: proc.poll() is not None or self.unix.exists(), timeout=10, what="opendkim socket")
                if proc.poll() is not None:
                    raise RuntimeError(f"opendkim exited: see {self.dir}/opendkim.log")

            self.process.start(ready)
        else:
            self.process.start(lambda proc: wait_port("127.0.0.1", self.port, timeout=10, proc=proc))
        return self

    def stop(self) -> None:
        if self.process.running:
            self.process.proc.send_signal(signal.SIGKILL)
        self.process.stop()


# header a milter adds -> the WARN text its check listener logs for it
CHECKS = {"verify": ("Authentication-Results", "dkim=pass"), "sign": ("DKIM-Signature", "")}


class PostfixMilters(PostfixBench):
    """``PostfixBench("accept")`` plus, per ``milters`` entry NAME -> (auth, milter, job),
    a listener ``ports[NAME]`` through that milter (AUTH CRAM-MD5 required if ``auth``) and
    its check twin ``check_ports[NAME]``. ``job`` is "verify" or "sign"."""

    def __init__(self, milters: dict[str, tuple[bool, str, str]], *, base: Path):
        super().__init__("accept", base=base)
        self.milters = milters
        self.ports = {name: free_port() for name in milters}
        self.check_ports = {name: free_port() for name in milters}

    def configure(self) -> None:
        super().configure()
        conf = self.conf
        checks = "".join(f"/^{header}:.*{text}/ WARN bench-check-{job}\n" for job, (header, text) in CHECKS.items())
        (conf / "header_checks").write_text(checks)
        lines = [f"cleanup-check unix n - n - 0 cleanup -o milter_header_checks=regexp:{conf}/header_checks"]
        for name, (auth, milter, _job) in self.milters.items():
            opts = f" -o smtpd_milters={milter}"
            if auth:
                opts += (" -o smtpd_sasl_auth_enable=yes -o mynetworks="
                         " -o smtpd_relay_restrictions=permit_sasl_authenticated,reject")
            lines.append(f"127.0.0.1:{self.ports[name]} inet n - n - - smtpd{opts}")
            lines.append(f"127.0.0.1:{self.check_ports[name]} inet n - n - - smtpd{opts}"
                         " -o cleanup_service_name=cleanup-check")
        with open(conf / "master.cf", "a") as f:
            f.write("\n".join(lines) + "\n")
        with open(conf / "main.cf", "a") as f:
            f.write(textwrap.dedent("""\
                milter_default_action = tempfail
                milter_connect_timeout = 5s
                """))
        backdate_config(conf)

    def start(self) -> PostfixMilters:
        super().start()
        for port in (*self.ports.values(), *self.check_ports.values()):
            wait_banner("127.0.0.1", port, timeout=15)
        return self

    @property
    def master_pid(self) -> int:
        return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])

    def maillog(self) -> str:
        try:
            return (self.dir / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def milter_warnings(self) -> int:
        """maillog lines about a milter failing (a dead milter shows only there)."""
        return sum(1 for line in self.maillog().splitlines()
                   if "warning:" in line and "milter" in line.lower() and "milter-header-warning" not in line)

    def check_count(self, job: str) -> int:
        return self.maillog().count(f"bench-check-{job}")
