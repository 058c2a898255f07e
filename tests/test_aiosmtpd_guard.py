"""Guard for MoxSMTP's dependence on aiosmtpd's private parts.

:class:`mox_core.smtpserver.protocol.MoxSMTP` subclasses ``aiosmtpd.smtp.SMTP``, does not call
its ``__init__`` and sets aiosmtpd's private attributes itself, and inherits its connection
lifecycle, STARTTLS upgrade and simple commands (protocol.py's docstring says why). None of
that is aiosmtpd's public API, so pyproject.toml pins aiosmtpd, and these tests fail, naming
what changed, when the installed aiosmtpd differs from the one MoxSMTP was written against:

* every attribute ``SMTP.__init__`` assigns (read from its source) must be set by
  ``MoxSMTP.__init__``;
* every ``self.NAME`` that MoxSMTP's modules use must exist on a new MoxSMTP (or be one of the
  two set when a connection is made);
* every function and value of ``SMTP`` (inherited or overridden by MoxSMTP), of ``Session``
  and ``Envelope``, and every name MoxSMTP imports from ``aiosmtpd.smtp``, must have the
  signature and code recorded below (a fingerprint of its source); an override must still
  accept the call aiosmtpd makes.

Moving to another aiosmtpd: change the pin, run this file, read each change it names in
aiosmtpd's source and adapt MoxSMTP, then print the new records with
``.venv/bin/python tests/test_aiosmtpd_guard.py`` and paste them over ``RECORDED``.
"""

from __future__ import annotations

import ast
import asyncio
import enum
import hashlib
import importlib.metadata
import inspect
import re
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, Envelope, Session

from mox_core.smtpserver import auth, datareader, mailrcpt, protocol
from mox_core.smtpserver.protocol import MoxSMTP

RECORDED_VERSION = "1.4.6"

# Assigned by SMTP.__init__ but deliberately not by MoxSMTP.__init__, and why.
NOT_SET = {
    "_call_limit_base": "set by aiosmtpd only with command_call_limit; read only in its _handle_client",
    "_call_limit_default": "set by aiosmtpd only with command_call_limit; read only in its _handle_client",
}
# Set when the connection is made, by aiosmtpd's _cb_client_connected (recorded below).
SET_ON_CONNECTION = {"_reader", "_writer"}
# Functions of aiosmtpd.smtp (not methods) that MoxSMTP's modules import; constants are
# compared by value in RECORDED.
IMPORTED = ("login_always_fail", "make_loop", "sanitize", "syntax")
IMPORTED_VALUES = ("ALLOWED_BEFORE_STARTTLS", "BOGUS_LIMIT", "MISSING")
MOX_MODULES = (protocol, mailrcpt, datareader, auth)

# What aiosmtpd 1.4.6 has. Functions: signature and sha256 of the source (first 12 digits);
# values: their repr.
RECORDED = {
    'Envelope.__init__': '(self) 8a8b47936657',
    'SMTP.AuthLoginPasswordChallenge': "'Password\\x00'",
    'SMTP.AuthLoginUsernameChallenge': "'User Name\\x00'",
    'SMTP._334_PREFIX': "re.compile('^334 ')",
    'SMTP.__del__': '(self) b36e055d37ce',
    'SMTP.__init__': '(self, handler, *, data_size_limit=33554432, enable_SMTPUTF8=False, decode_data=False, hostname=None, ident=None, tls_context=None, require_starttls=False, timeout=300, auth_required=False, auth_require_tls=True, auth_exclude_mechanism=None, auth_callback=None, command_call_limit=None, authenticator=None, proxy_protocol_timeout=None, loop=None) 09553bcb94a7',
    'SMTP._auth_interact': '(self, server_message) 5565eece88fd',
    'SMTP._authenticate': '(self, mechanism, auth_data) 2e0709df1acf',
    'SMTP._call_handler_hook': '(self, command, *args) ba0ae3757b24',
    'SMTP._cb_client_connected': '(self, reader, writer) 5207c86ab3e6',
    'SMTP._create_envelope': '(self) 070f28a6ba3f',
    'SMTP._create_session': '(self) fa0a38942ef7',
    'SMTP._getaddr': '(self, arg) c9f8dc386b41',
    'SMTP._getparams': '(self, params) bfbddb73f8a7',
    'SMTP._handle_client': '(self) 49324c69de99',
    'SMTP._reset_timeout': '(self, duration=None) a6ee240dba07',
    'SMTP._set_post_data_state': '(self) 5ba57233145a',
    'SMTP._set_rset_state': '(self) 9737e90e5ad7',
    'SMTP._strip_command_keyword': '(self, keyword, arg) deb758514772',
    'SMTP._syntax_available': '(self, method) 65fe4fd72b24',
    'SMTP._timeout_cb': '(self) 2fed1205429f',
    'SMTP.auth_LOGIN': '(self, _, args) 876a6696fa86',
    'SMTP.auth_PLAIN': '(self, _, args) 5a67c931c1ba',
    'SMTP.challenge_auth': '(self, challenge, encode_to_b64=True, log_client_response=False) 1593bb9654f6',
    'SMTP.check_auth_needed': '(self, caller_method) afb8328b683d',
    'SMTP.check_helo_needed': "(self, helo='HELO') ca1f70c86e07",
    'SMTP.command_size_limit': '512',
    'SMTP.command_size_limits': 'defaultdict(default=512)',
    'SMTP.connection_lost': '(self, error) 113bdb9e32d6',
    'SMTP.connection_made': '(self, transport) 0096cde9fccd',
    'SMTP.eof_received': '(self) 48498c9c41ba',
    'SMTP.handle_exception': '(self, error) 7651049ad47b',
    'SMTP.line_length_limit': '1001',
    'SMTP.local_part_limit': '0',
    'SMTP.max_command_size_limit': '(self) 1431cf975ece',
    'SMTP.push': '(self, status) fdd67c2de32a',
    'SMTP.smtp_AUTH': '(self, arg) dfb009baf47b',
    'SMTP.smtp_DATA': '(self, arg) 025c94766a3c',
    'SMTP.smtp_EHLO': '(self, hostname) f18141b04b05',
    'SMTP.smtp_EXPN': '(self, arg) 3232bcbc3eb8',
    'SMTP.smtp_HELO': '(self, hostname) a4c0d6ec6d20',
    'SMTP.smtp_HELP': '(self, arg) 13daddd8a845',
    'SMTP.smtp_MAIL': '(self, arg) d427adba5ad6',
    'SMTP.smtp_NOOP': '(self, arg) 7392a447a2ab',
    'SMTP.smtp_QUIT': '(self, arg) b791a43ab53e',
    'SMTP.smtp_RCPT': '(self, arg) c708a3b58424',
    'SMTP.smtp_RSET': '(self, arg) 24eb853d5a86',
    'SMTP.smtp_STARTTLS': '(self, arg) 96f0e61d7528',
    'SMTP.smtp_VRFY': '(self, arg) d3c7435f2ec6',
    'Session.__init__': '(self, loop) 2bf0ad37b93f',
    'Session.login_data': '(self) 6aa52a0108c4',
    'aiosmtpd.smtp.ALLOWED_BEFORE_STARTTLS': "['EHLO', 'NOOP', 'QUIT', 'STARTTLS']",
    'aiosmtpd.smtp.BOGUS_LIMIT': '5',
    'aiosmtpd.smtp.MISSING': '_Missing.MISSING',
    'aiosmtpd.smtp.login_always_fail': '(mechanism, login, password) 299433326de9',
    'aiosmtpd.smtp.make_loop': '() 5316323ef04e',
    'aiosmtpd.smtp.sanitize': '(text) e261ae60550f',
    'aiosmtpd.smtp.syntax': '(text, extended=None, when=None) 9f7312554162',
}


# ---- what is there now ---------------------------------------------------------------------


def _signature(fn: Any) -> str:
    """Parameters with their kinds and defaults, without annotations (their text differs
    between Python versions)."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _fingerprint(fn: Any) -> str:
    source = textwrap.dedent(inspect.getsource(fn))
    return f"{_signature(fn)} {hashlib.sha256(source.encode()).hexdigest()[:12]}"


def _describe(value: Any) -> str:
    if isinstance(value, property):
        value = value.fget
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if inspect.isfunction(value):
        return _fingerprint(value)
    if isinstance(value, (set, frozenset)):
        return repr(sorted(value))
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, re.Pattern):
        return f"re.compile({value.pattern!r})"
    if callable(getattr(value, "default_factory", None)):
        # aiosmtpd's SMTP.command_size_limits: a class-level defaultdict that every stock SMTP
        # instance fills (tests/test_smtp_protocol.py runs one), so only its default counts
        return f"defaultdict(default={value.default_factory()!r})"
    return repr(value)


def class_members(cls: type, prefix: str | None = None) -> dict[str, str]:
    """Every function and value defined in ``cls`` itself (not inherited), described."""
    prefix = prefix or cls.__name__
    return {f"{prefix}.{name}": _describe(value) for name, value in vars(cls).items()
            if not (name.startswith("__") and name not in ("__init__", "__del__"))}


def current() -> dict[str, str]:
    """What the installed aiosmtpd has, in the form of ``RECORDED``."""
    out = {**class_members(SMTP), **class_members(Session), **class_members(Envelope)}
    for name in IMPORTED + IMPORTED_VALUES:
        out[f"aiosmtpd.smtp.{name}"] = _describe(getattr(aiosmtpd.smtp, name))
    return dict(sorted(out.items()))


def changes(recorded: dict[str, str], now: dict[str, str]) -> list[str]:
    """One line per difference, naming the function or value and what MoxSMTP does with it."""
    out = []
    for key in sorted(recorded.keys() | now.keys()):
        cls_name, _, attr = key.rpartition(".")
        use = ""
        if cls_name == "SMTP":
            owner = next(c for c in MoxSMTP.__mro__ if attr in vars(c))
            use = (" (MoxSMTP inherits it)" if owner is SMTP
                   else f" (MoxSMTP overrides it in {owner.__module__}.{owner.__name__})")
        if key not in now:
            out.append(f"{key} is gone from aiosmtpd{use}")
        elif key not in recorded:
            out.append(f"{key} is new in aiosmtpd{use}: {now[key]}")
        elif recorded[key] != now[key]:
            out.append(f"{key} changed{use}: was {recorded[key]!r}, now {now[key]!r}")
    return out


def init_assignments(cls: type) -> set[str]:
    """Every ``self.NAME`` that ``cls.__init__`` assigns, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    names = set()
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names


def self_attributes(modules: tuple[Any, ...]) -> dict[str, str]:
    """Every ``self.NAME`` used in MoxSMTP and its mixins in ``modules``: name -> first place."""
    classes = {(c.__module__, c.__name__) for c in MoxSMTP.__mro__}
    names: dict[str, str] = {}
    for module in modules:
        path = Path(module.__file__)
        for cls in ast.parse(path.read_text()).body:
            if not isinstance(cls, ast.ClassDef) or (module.__name__, cls.name) not in classes:
                continue
            for node in ast.walk(cls):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                    names.setdefault(node.attr, f"{path.name}:{node.lineno}")
    return names


def _new_moxsmtp(cls: type = MoxSMTP) -> Any:
    async def build() -> Any:
        return cls(object(), hostname="mx.test")

    return asyncio.run(build())


# ---- the checks ----------------------------------------------------------------------------


def missing_from_init(smtp_cls: type, proto: Any) -> list[str]:
    """Attributes ``smtp_cls.__init__`` assigns that ``proto`` (a new MoxSMTP) lacks."""
    return sorted(init_assignments(smtp_cls) - set(vars(proto)) - NOT_SET.keys())


def test_moxsmtp_sets_every_attribute_aiosmtpd_init_sets() -> None:
    missing = missing_from_init(SMTP, _new_moxsmtp())
    assert not missing, (
        f"aiosmtpd's SMTP.__init__ sets {', '.join(missing)}, MoxSMTP.__init__ does not: see what "
        "aiosmtpd does with it and set it in MoxSMTP.__init__ (or add it to NOT_SET with the reason)")


def test_every_attribute_moxsmtp_uses_exists() -> None:
    proto = _new_moxsmtp()
    unknown = {name: where for name, where in self_attributes(MOX_MODULES).items()
               if name not in SET_ON_CONNECTION and not hasattr(proto, name)}
    assert not unknown, f"MoxSMTP uses attributes that neither it nor aiosmtpd defines: {unknown}"


def test_aiosmtpd_is_the_recorded_version() -> None:
    found = changes(RECORDED, current())
    assert not found, (
        "aiosmtpd changed what MoxSMTP relies on (see this file's docstring for what to do):\n  "
        + "\n  ".join(found))


def test_overrides_accept_aiosmtpds_calls() -> None:
    """aiosmtpd's own code calls these methods (connection_made calls ``_handle_client()`` and
    ``_reset_timeout()``, HELP reads ``smtp_*``, ...): MoxSMTP's versions must take the same
    arguments and be coroutines exactly when aiosmtpd's are."""
    for name, theirs in vars(SMTP).items():
        ours = getattr(MoxSMTP, name)
        if name == "__init__" or not inspect.isfunction(theirs) or ours is theirs:
            continue
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs), (
            f"MoxSMTP.{name} is {'not ' * (not inspect.iscoroutinefunction(ours))}async, "
            f"aiosmtpd's SMTP.{name} is {'not ' * (not inspect.iscoroutinefunction(theirs))}async")
        params = list(inspect.signature(theirs).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        signature = inspect.signature(ours)
        for count in (len(required), len(positional)):
            try:
                signature.bind(*range(count))
            except TypeError as exc:
                raise AssertionError(f"MoxSMTP.{name}{signature} does not accept aiosmtpd's "
                                     f"call with {count} arguments: {exc}") from None


def test_the_pin_is_the_recorded_version() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("aiosmtpd")]
    assert pins == [f"aiosmtpd=={RECORDED_VERSION}"]
    assert importlib.metadata.version("aiosmtpd") == RECORDED_VERSION


# ---- the guard itself fails on a change --------------------------------------------------------


def test_the_guard_names_a_change() -> None:
    """A stand-in for a newer aiosmtpd: an SMTP whose __init__ sets one more attribute and
    whose _set_rset_state takes an argument. Each check must name what changed."""

    class NewerSMTP(SMTP):
        def __init__(self, handler: Any, *, hostname: str | None = None) -> None:
            super().__init__(handler, hostname=hostname)
            self._pipelining_limit = 100

        def _set_rset_state(self, keep_greeting: bool = False) -> None:
            super()._set_rset_state()

    proto = _new_moxsmtp()
    assert missing_from_init(NewerSMTP, proto) == ["_pipelining_limit"]
    now = class_members(NewerSMTP, "SMTP")
    recorded = {k: v for k, v in RECORDED.items() if k in now}
    found = changes(recorded, now)
    assert len(found) == 2
    assert found[0].startswith("SMTP.__init__ changed (MoxSMTP overrides it in mox_core.smtpserver.protocol")
    assert found[1].startswith("SMTP._set_rset_state changed (MoxSMTP inherits it): was '(self) ")
    assert "now '(self, keep_greeting=False) " in found[1]
    gone = changes({"SMTP._getparams": RECORDED["SMTP._getparams"]}, {})
    assert gone == ["SMTP._getparams is gone from aiosmtpd (MoxSMTP inherits it)"]


if __name__ == "__main__":
    print(f'RECORDED_VERSION = "{importlib.metadata.version("aiosmtpd")}"')
    print("RECORDED = {")
    for key, value in current().items():
        print(f"    {key!r}: {value!r},")
    print("}")
