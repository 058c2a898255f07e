"""SOCKS5 proxies (RFC 1928) on loopback: dante-server and microsocks.

::

    proxy = DanteProxy().start()                                   # no authentication
    proxy = DanteProxy(username="sockuser", password="socks-pw").start()   # RFC 1929 via pam_pwdfile
    proxy = MicroSocksProxy(username="u", password="p").start()
    proxy.url                      # "socks5://u:p@127.0.0.1:PORT"
    sock = proxy.connect("127.0.0.1", sink.port)                  # python-socks, through the proxy
    proxy.cleanup()

Both listen on 127.0.0.1 only and reach loopback destinations only: dante through its
``socks pass { ... to: 127.0.0.0/8 }`` rule (everything else is blocked), microsocks (which has
no ACL) because its outgoing sockets are bound to 127.0.0.1 (``-b``), from where the kernel has
no route to any non-loopback address.

How failures look to a client (python-socks):

* no credentials offered to an auth-requiring proxy: "No acceptable authentication methods";
* wrong password, microsocks: "Username and password authentication failure" (RFC 1929 reply);
* wrong password, dante ``pam.username``: the RFC 1929 exchange *succeeds* and the CONNECT is
  refused with reply 0x02 "Connection not allowed by ruleset";
* destination refused: reply 0x05 "Connection refused by destination host".

Dante's username method uses PAM with a private password file (libpam-pwdfile); this needs a
service file in /etc/pam.d (``mox-danted-<random>``), which is removed again by :meth:`cleanup`.
Must run as root.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path
from urllib.parse import quote

from . import (
    make_private_dir,
    require_file,
    require_root,
    require_tool,
    run,
    wait_port,
)
from .lifecycle import Peer, PeerProcess

__all__ = ["SocksProxy", "DanteProxy", "MicroSocksProxy", "DEFAULT_USERNAME", "DEFAULT_PASSWORD"]

DEFAULT_USERNAME = "sockuser"
DEFAULT_PASSWORD = "socks-pw"

PAM_DIR = Path("/etc/pam.d")


class SocksProxy(Peer):
    """A running SOCKS5 proxy. ``username``/``password`` are None for no authentication."""

    kind = "socks"

    def __init__(self, username: str | None = None, password: str | None = None, *,
                 host: str = "127.0.0.1", port: int | None = None):
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        super().__init__()
        self.username = username
        self.password = password
        self._want_host = host
        self._want_port = port
        self.host = host
        self.port = port or 0
        self.process: PeerProcess | None = None

    @property
    def auth(self) -> bool:
        return self.username is not None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        """``socks5://[user:password@]host:port`` with this proxy's credentials."""
        return self.proxy_url()

    def proxy_url(self, username: str | None = None, password: str | None = None) -> str:
        """The proxy URL with other credentials (e.g. a wrong password), or none if both None."""
        if username is None and password is None:
            username, password = self.username, self.password
        cred = ""
        if username is not None:
            cred = f"{quote(username, safe='')}:{quote(password or '', safe='')}@"
        return f"socks5://{cred}{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.dir / f"{self.kind}.log"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except (FileNotFoundError, TypeError):
            return ""

    # ------------------------------------------------------------------ lifecycle

    def _command(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _prepare(self) -> None:
        pass

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.process.proc if self.process is not None else None

    def _start_tries(self) -> int:
        return 1 if self._want_port else 10

    def _setup(self) -> None:
        require_root(f"the {self.kind} SOCKS5 proxy fixture")
        if self.dir is None:
            self.dir = make_private_dir(f"socks-{self.kind}-")

    def _begin_attempt(self, used: set[str]) -> None:
        res = self._reserve(self._want_host, self._want_port)
        self.host, self.port = res.host, res.port
        self._prepare()
        self.args = self._command()

    def _launch(self, timeout: float) -> None:
        self.process = PeerProcess(self.args, log_file=self.log_file)
        self.process.start(lambda proc: wait_port(self.host, self.port, timeout, proc=proc))

    def _failure_details(self, error: BaseException) -> str:
        return f"{error}\ncommand: {' '.join(self.args)}\nlog:\n{self.log_text()}"

    def _halt(self) -> None:
        """SIGTERM the proxy by its PID (dante's mother process takes its children along)."""
        if self.process is not None:
            self.process.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    # ------------------------------------------------------------------ client side

    def connect(self, dest_host: str, dest_port: int, *, timeout: float = 5.0, rdns: bool = True,
                username: str | None = None, password: str | None = None):
        """Open a TCP connection to dest through the proxy (python-socks, sync); returns a socket.

        Raises ``python_socks.ProxyError`` when the proxy refuses. Only loopback destinations.
        """
        from python_socks.sync import Proxy

        proxy = Proxy.from_url(self.proxy_url(username, password), rdns=rdns)
        return proxy.connect(dest_host=dest_host, dest_port=dest_port, timeout=timeout)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


class DanteProxy(SocksProxy):
    """dante-server (``danted``): no authentication, or username/password via pam_pwdfile."""

    kind = "dante"

    def _prepare(self) -> None:
        danted = require_tool("danted", "dante-server")
        self._danted = danted
        if self.auth and getattr(self, "pam_service", None) is None:
            require_file(["/lib/*/security/pam_pwdfile.so", "/usr/lib/*/security/pam_pwdfile.so",
                          "/lib/security/pam_pwdfile.so", "/usr/lib/security/pam_pwdfile.so"],
                         "libpam-pwdfile", "PAM module pam_pwdfile.so")
            openssl = require_tool("openssl", "openssl")
            crypted = run([openssl, "passwd", "-6", "-stdin"], input=self.password.encode() + b"\n")
            pwfile = self.dir / "pwfile"
            pwfile.write_text(f"{self.username}:{crypted.stdout.decode().strip()}\n")
            os.chmod(pwfile, 0o600)
            self.pam_service = f"mox-danted-{secrets.token_hex(6)}"
            (PAM_DIR / self.pam_service).write_text(
                f"# temporary, for a test SOCKS5 proxy in {self.dir}\n"
                f"auth required pam_pwdfile.so pwdfile={pwfile} nodelay\n"
                "account required pam_permit.so\n")
        conf = self.dir / "danted.conf"
        # pam.servicename is a rule option: a syntax error at top level and at the end of a
        # one-line rule after "command: connect"; on its own line inside the block it works
        rule_extra = f"\n  pam.servicename: {self.pam_service}" if self.auth else ""
        conf.write_text(f"""\
logoutput: {self.dir / 'danted.log'}
internal: {self.host} port = {self.port}
external: 127.0.0.1
clientmethod: none
socksmethod: {'pam.username' if self.auth else 'none'}
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{
  from: 127.0.0.0/8 to: 127.0.0.0/8
  command: connect{rule_extra}
}}
socks block {{ from: 0.0.0.0/0 to: 0.0.0.0/0 log: connect error }}
""")
        self.conf_file = conf

    def _command(self) -> list[str]:
        return [self._danted, "-f", str(self.conf_file), "-p", str(self.dir / "danted.pid")]

    def log_text(self) -> str:
        text = super().log_text()
        try:
            text += (self.dir / "danted.log").read_text(errors="replace")
        except (FileNotFoundError, TypeError):
            pass
        return text

    def cleanup(self) -> None:
        super().cleanup()
        svc = getattr(self, "pam_service", None)
        if svc:
            (PAM_DIR / svc).unlink(missing_ok=True)
            self.pam_service = None


class MicroSocksProxy(SocksProxy):
    """microsocks on 127.0.0.1, outgoing connections bound to 127.0.0.1 (loopback only)."""

    kind = "microsocks"

    def _command(self) -> list[str]:
        exe = require_tool("microsocks", "microsocks")
        args = [exe, "-i", self.host, "-p", str(self.port), "-b", "127.0.0.1"]
        if self.auth:
            args += ["-u", self.username, "-P", self.password]
        return args
