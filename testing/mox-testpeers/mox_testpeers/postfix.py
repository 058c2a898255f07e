"""Private Postfix instances on loopback: a submission smarthost and a plain MX.

* :class:`PostfixSmarthost` -- STARTTLS submission smarthost on 127.0.0.1:PORT with Cyrus SASL
  against a private sasldb (SCRAM-SHA-256, SCRAM-SHA-1, CRAM-MD5, PLAIN, LOGIN; offered only after
  STARTTLS), optional implicit-TLS port, a throwaway CA (``cafile``); every accepted message lands
  in the Maildir ``maildir``.
* :class:`PostfixMX` -- plain MX for a domain on 127.0.0.x:25 (STARTTLS offered, relaying
  refused), mail in the Maildir ``maildir`` (``DIR/mail/inbox``).

Each instance lives in its own ``mkdtemp`` directory under /tmp (mode 755, since the Postfix
daemons run as ``postfix`` and ``nobody``), is configured by the shell scripts in ``scripts/``,
started with ``postfix -c DIR/conf start`` and stopped with ``postfix -c DIR/conf stop``.
Nothing is forwarded off the host: ``default_transport``/``relay_transport`` are ``error:`` and
DNS is disabled. Must run as root.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import os
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import (
    SCRIPTS_DIR,
    PeerError,
    make_private_dir,
    remove_private_dir,
    require_file,
    require_root,
    require_tool,
    run,
    wait_banner,
    wait_for,
)
from .lifecycle import Peer

__all__ = ["PostfixSmarthost", "PostfixMX", "MaildirMessage", "backdate_config", "check_postfix_tools",
           "postfix_command", "postfix_running"]

DEFAULT_USERS = {"alice": "secret-pw"}
SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN")


def check_postfix_tools(sasl: bool = False) -> None:
    """Raise :class:`MissingToolError` (naming the Debian package) if something is missing."""
    require_tool("postfix", "postfix")
    require_tool("postconf", "postfix")
    require_tool("openssl", "openssl")
    if sasl:
        require_tool("saslpasswd2", "sasl2-bin")
        require_file(["/usr/lib/*/sasl2/libscram.so*", "/usr/lib/sasl2/libscram.so*"],
                     "libsasl2-modules", "Cyrus SASL SCRAM plugin (libscram.so)")
        require_file(["/usr/lib/*/sasl2/libcrammd5.so*", "/usr/lib/sasl2/libcrammd5.so*"],
                     "libsasl2-modules", "Cyrus SASL CRAM-MD5 plugin (libcrammd5.so)")
        require_file(["/usr/lib/*/sasl2/libsasldb.so*", "/usr/lib/sasl2/libsasldb.so*"],
                     "libsasl2-modules-db", "Cyrus SASL sasldb plugin (libsasldb.so)")
    require_root("a private Postfix instance")


def postfix_command(conf_dir: Path, *cmd: str, log_file: Path) -> subprocess.CompletedProcess:
    """``postfix -c CONF_DIR CMD...`` (start, stop, reload, ...); its output is written to
    *log_file* (a file, not a pipe: the master daemonizes and must not hold our pipe open) and
    returned as ``.stdout``."""
    with open(log_file, "wb") as f:
        p = subprocess.run([require_tool("postfix", "postfix"), "-c", str(conf_dir), *cmd],
                           stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, timeout=60)
    p.stdout = Path(log_file).read_bytes()
    return p


def postfix_running(queue_dir: Path) -> bool:
    """Whether the instance with this ``queue_directory`` has a master running (its pid file)."""
    return (Path(queue_dir) / "pid" / "master.pid").exists()


def backdate_config(conf_dir: Path) -> None:
    """Date main.cf and master.cf a minute back: Postfix sleeps in 300 ms steps while main.cf
    is younger than about 2 s."""
    past = time.time() - 60
    for name in ("main.cf", "master.cf"):
        os.utime(Path(conf_dir) / name, (past, past))


_server_key_path: Path | None = None


def _server_key() -> str:
    """An RSA 2048 server key generated once per process and shared by all instances (the
    certificates and CAs are still per instance); RSA key generation costs up to 0.5 s."""
    global _server_key_path
    if _server_key_path is None or not _server_key_path.exists():
        import atexit

        d = make_private_dir("pf-key-")
        key = d / "server.key"
        run([require_tool("openssl", "openssl"), "genpkey", "-algorithm", "RSA",
             "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)])
        os.chmod(key, 0o600)
        atexit.register(remove_private_dir, d)
        _server_key_path = key
    return str(_server_key_path)


@dataclass
class MaildirMessage:
    """One message delivered into a Maildir by virtual(8)."""

    path: Path
    data: bytes = field(repr=False)

    @property
    def message(self) -> email.message.EmailMessage:
        return email.parser.BytesParser(policy=email.policy.default).parsebytes(self.data)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    @property
    def return_path(self) -> str:
        """Envelope sender from the Return-Path header, without angle brackets."""
        return _header(self.data, b"Return-Path").strip().strip("<>")

    @property
    def delivered_to(self) -> str:
        """Envelope recipient (Delivered-To)."""
        return _header(self.data, b"Delivered-To").strip()

    @property
    def original_to(self) -> str:
        """Envelope recipient as given in RCPT TO (X-Original-To)."""
        return _header(self.data, b"X-Original-To").strip()


def _header(data: bytes, name: bytes) -> str:
    prefix = name.lower() + b":"
    for line in data.split(b"\n"):
        if not line.strip():
            break
        if line.lower().startswith(prefix):
            return line[len(prefix):].decode("utf-8", errors="replace")
    return ""


class _PostfixInstance(Peer):
    kind = "postfix"
    start_timeout = 15.0

    @property
    def description(self) -> str:
        return f"Postfix {self.kind}"

    def __init__(self, host: str, port: int, main_cf: dict[str, str] | None = None,
                 master_cf_extra: list[str] | None = None):
        super().__init__()
        self._want_host = host
        self._want_port = port
        self.host = host or ""
        self.port = port or 0
        self.main_cf_overrides = dict(main_cf or {})
        self.master_cf_extra = list(master_cf_extra or [])

    # ------------------------------------------------------------------ paths

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def conf_dir(self) -> Path:
        return self.dir / "conf"

    @property
    def queue_dir(self) -> Path:
        return self.dir / "queue"

    @property
    def maillog(self) -> Path:
        """Postfix's log file (maillog_file via postlogd)."""
        return self.dir / "maillog"

    @property
    def cafile(self) -> str:
        """PEM file of the throwaway CA that signed the server certificate."""
        return str(self.dir / "tls" / "ca.crt")

    @property
    def mail_dir(self) -> Path:
        """``virtual_mailbox_base``: each Maildir is a subdirectory."""
        return self.dir / "mail"

    def ssl_context(self) -> ssl.SSLContext:
        """Client context trusting only this instance's CA (verifies 127.0.0.1 / localhost)."""
        return ssl.create_default_context(cafile=self.cafile)

    # ------------------------------------------------------------------ lifecycle

    def _configure(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _choose_address(self, used: set[str]) -> None:
        raise NotImplementedError

    def _start_tries(self) -> int:
        return 1 if (self._want_host and self._want_port) else 10

    def _setup(self) -> None:
        check_postfix_tools(sasl=isinstance(self, PostfixSmarthost))

    def _begin_attempt(self, used: set[str]) -> None:
        self._choose_address(used)
        self.dir = make_private_dir(f"pf-{self.kind}-")
        self._configure()
        if self.main_cf_overrides:
            self._postconf_e(self.main_cf_overrides)
        if self.master_cf_extra:
            with open(self.conf_dir / "master.cf", "a") as f:
                for line in self.master_cf_extra:
                    f.write(line.rstrip("\n") + "\n")
        self._backdate()

    def _launch(self, timeout: float) -> None:
        """``postfix -c DIR/conf start`` (the master daemonizes), then wait for the 220."""
        proc = self._postfix("start", check=False)
        if proc.returncode != 0:
            raise PeerError(proc.stdout.decode(errors="replace"))
        wait_banner(self.host, self.port, timeout)

    def _failure_details(self, error: BaseException) -> str:
        return self._diagnose(str(error))

    def _reset_attempt(self) -> None:
        remove_private_dir(self.dir)
        self.dir = None

    def _diagnose(self, first: str) -> str:
        out = [first.strip()]
        try:
            out.append("maillog:\n" + self.maillog.read_text(errors="replace")[-4000:])
        except OSError:
            pass
        # early fatal errors go nowhere when stderr is not a tty: run "postfix check" under script(1)
        script = shutil.which("script")
        if script:
            p = subprocess.run([script, "-qec", f"postfix -c {self.conf_dir} check", "/dev/null"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
            text = p.stdout.decode(errors="replace").strip()
            if text:
                out.append("postfix check:\n" + text)
        return "\n".join(x for x in out if x)

    def _postfix(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        p = postfix_command(self.conf_dir, *cmd, log_file=self.dir / "postfix-cmd.log")
        if check and p.returncode != 0:
            raise PeerError(f"postfix {' '.join(cmd)} failed (exit {p.returncode}):\n"
                            f"{self._diagnose(p.stdout.decode(errors='replace'))}")
        return p

    def _backdate(self) -> None:
        backdate_config(self.conf_dir)

    def _postconf_e(self, params: dict[str, str]) -> None:
        args = [require_tool("postconf", "postfix"), "-c", str(self.conf_dir), "-e"]
        args += [f"{k} = {v}" for k, v in params.items()]
        run(args)

    def postconf(self, reload: bool = True, **params: str) -> None:
        """Change main.cf parameters (``postconf -e``) and, if running, ``postfix reload``."""
        self._postconf_e(params)
        self._backdate()
        if self.started and reload:
            self.reload()

    def reload(self) -> None:
        self._postfix("reload")

    def _halt(self) -> None:
        """``postfix -c DIR/conf stop`` (the directory stays until :meth:`cleanup`)."""
        if self.dir is not None and postfix_running(self.queue_dir):
            self._postfix("stop", check=False)

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------ delivered mail

    def _maildir_files(self, mailbox: str | None) -> list[Path]:
        if self.dir is None:
            return []
        boxes = [self.mail_dir / mailbox] if mailbox else [p for p in self.mail_dir.glob("*") if p.is_dir()]
        files = []
        for box in boxes:
            for sub in ("new", "cur"):
                d = box / sub
                if d.is_dir():
                    for p in d.iterdir():
                        try:
                            files.append((p.stat().st_mtime_ns, p.name, p))
                        except FileNotFoundError:
                            pass
        return [p for _, _, p in sorted(files)]

    def messages(self, mailbox: str | None = None) -> list[MaildirMessage]:
        """Delivered messages, oldest first (default: of the instance's main Maildir)."""
        out = []
        for p in self._maildir_files(mailbox or self.default_mailbox):
            try:
                out.append(MaildirMessage(p, p.read_bytes()))
            except FileNotFoundError:
                pass
        return out

    def all_messages(self) -> list[MaildirMessage]:
        """Delivered messages of every Maildir under :attr:`mail_dir`."""
        return [MaildirMessage(p, p.read_bytes()) for p in self._maildir_files(None)]

    def wait_for_messages(self, n: int = 1, timeout: float = 10.0, mailbox: str | None = None) -> list[MaildirMessage]:
        """Delivery into the Maildir is asynchronous (about 10 ms after the 250): poll."""
        box = mailbox or self.default_mailbox
        wait_for(lambda: len(self._maildir_files(box)) >= n, timeout,
                 what=f"{n} message(s) in Maildir {box} of {self.kind} {self.host}:{self.port}")
        return self.messages(box)

    default_mailbox = "sink"

    @property
    def maildir(self) -> Path:
        """The Maildir that receives the mail."""
        return self.mail_dir / self.default_mailbox


class PostfixSmarthost(_PostfixInstance):
    """STARTTLS submission smarthost with Cyrus SASL (sasldb).

    users: ``{name: password}`` (default ``{"alice": "secret-pw"}``); change later with
        :meth:`add_user` / :meth:`remove_user`. Users log in with the bare name; the SASL realm
        (``smarthost.test``) is appended by Postfix.
    implicit_tls: also listen with implicit TLS (465 style) on :attr:`tls_port`.
    main_cf: extra main.cf parameters (e.g. ``{"smtpd_tls_auth_only": "no"}``).
    """

    kind = "smarthost"
    default_mailbox = "sink"

    def __init__(self, users: dict[str, str] | None = None, *, port: int | None = None,
                 implicit_tls: bool = False, tls_port: int | None = None, host: str = "127.0.0.1",
                 realm: str = "smarthost.test", mechanisms: tuple[str, ...] | list[str] = SASL_MECHANISMS,
                 main_cf: dict[str, str] | None = None, master_cf_extra: list[str] | None = None):
        super().__init__(host, port or 0, main_cf, master_cf_extra)
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.implicit_tls = implicit_tls or tls_port is not None
        self._want_tls_port = tls_port
        self.tls_port: int | None = None
        self.realm = realm
        self.mechanisms = tuple(mechanisms)

    def _choose_address(self, used: set[str]) -> None:
        res = self._reserve(self._want_host, self._want_port)
        self.host, self.port = res.host, res.port
        if self.implicit_tls:
            res = self._reserve(self.host, self._want_tls_port)
            self.tls_port = res.port

    def _configure(self) -> None:
        env = dict(os.environ, LISTEN_ADDR=self.host, REALM=self.realm, SASL_USER="",
                   MECH_LIST=" ".join(self.mechanisms), SERVER_KEY=_server_key())
        args = ["bash", str(SCRIPTS_DIR / "pf-submission.sh"), str(self.dir), str(self.port)]
        if self.implicit_tls:
            args.append(str(self.tls_port))
        run(args, env=env)
        for name, pw in self.users.items():
            self._saslpasswd(name, pw)

    @property
    def sasldb(self) -> Path:
        return self.conf_dir / "sasl" / "sasldb2"

    def _saslpasswd(self, name: str, password: str, delete: bool = False) -> None:
        exe = require_tool("saslpasswd2", "sasl2-bin")
        if delete:
            run([exe, "-f", str(self.sasldb), "-u", self.realm, "-d", name])
        else:
            run([exe, "-p", "-f", str(self.sasldb), "-u", self.realm, "-c", name],
                input=password.encode() + b"\n")
        shutil.chown(self.sasldb, "root", "postfix")
        os.chmod(self.sasldb, 0o640)

    def add_user(self, name: str, password: str) -> None:
        """Create or change a SASL user (takes effect for the next AUTH, no reload needed)."""
        self._saslpasswd(name, password)
        self.users[name] = password

    def remove_user(self, name: str) -> None:
        self._saslpasswd(name, "", delete=True)
        self.users.pop(name, None)

    def __repr__(self) -> str:
        return f"<PostfixSmarthost {self.host}:{self.port} tls_port={self.tls_port} dir={self.dir}>"


class PostfixMX(_PostfixInstance):
    """Plain MX for *domain* (any local part) on *host*:*port* (default a free 127.0.0.x:25).

    host: ``None`` (default) picks 127.0.0.2 if nothing listens on *port* there, else another
        free 127.0.0.x; put ``mx.host`` into the test DNS.
    Mail lands in the Maildir :attr:`maildir` (``DIR/mail/inbox``). For per-recipient outcomes
    use :meth:`postconf`, e.g.::

        mx.postconf(virtual_mailbox_maps="inline:{ bob@dest.test=bob/ }",
                    smtpd_recipient_restrictions="check_recipient_access inline:{ "
                    "{ tempfail@dest.test = 451 4.2.0 try again later } }")
        mx.messages("bob")
    """

    kind = "mx"
    default_mailbox = "inbox"

    def __init__(self, domain: str = "dest.test", *, host: str | None = None, port: int = 25,
                 main_cf: dict[str, str] | None = None, master_cf_extra: list[str] | None = None):
        super().__init__(host, port, main_cf, master_cf_extra)
        self.domain = domain

    def _choose_address(self, used: set[str]) -> None:
        res = self._reserve(self._want_host, self._want_port, exclude=used)
        self.host, self.port = res.host, res.port
        used.add(self.host)

    def _configure(self) -> None:
        run(["bash", str(SCRIPTS_DIR / "pf-mx.sh"), str(self.dir), self.host, self.domain, str(self.port)],
            env=dict(os.environ, SERVER_KEY=_server_key()))

    @property
    def hostname(self) -> str:
        """myhostname, also the certificate's DNS name: ``mx.<domain>``."""
        return f"mx.{self.domain}"

    def __repr__(self) -> str:
        return f"<PostfixMX {self.domain} {self.host}:{self.port} dir={self.dir}>"
