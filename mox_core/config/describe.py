"""``mox config describe``: a commented example config generated from the models.

Every field's description becomes a comment; required fields get an example value, optional
ones show their default. Each plugin kind's settings model is included, so the output
documents whatever plugins are installed.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from mox_core.config.models import DynamicConfig, Listener, StaticConfig, TransportCommon, WebHandlerCommon
from mox_core.plugins.host import PluginHost

# Values for required fields, so the example is a config that validates with small edits.
EXAMPLES: dict[str, Any] = {
    "hostname": "mail.example.org",
    "ips": ["127.0.0.1"],
    "account": "admin",
    "cert_file": "tls/cert.pem",
    "key_file": "tls/key.pem",
    "domain": "example.org",
    "private_key_file": "dkim/2026a.pem",
    "host": "smtp.example.net",
    "address": "127.0.0.1:1080",
    "remote_hostname": "mail.example.org",
    "username": "user",
    "root": "/var/www/example",
    "url": "https://www.example.org/",
    "base_url": "https://www.example.org/",
    "base_path": "/admin/",
    "service": "admin",
}


def _toml_value(v: Any) -> str:
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        return '""'
    return json.dumps(str(v))


def _default(name: str, f: FieldInfo) -> tuple[bool, Any]:
    """(required, value to show)."""
    if f.default is not PydanticUndefined:
        return False, f.default
    if f.default_factory is not None:
        return False, f.default_factory()  # type: ignore[call-arg]
    return True, EXAMPLES.get(name, "")


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if _is_model(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if _is_model(arg):
            return arg
    return None


def describe_model(
    model: type[BaseModel], section: str | None, out: list[str], *, skip: frozenset[str] = frozenset(),
    extra_lines: list[str] | None = None,
) -> None:
    """Append ``model`` as TOML: scalar keys first, then sub-tables."""
    scalars: list[str] = []
    tables: list[tuple[str, type[BaseModel], FieldInfo]] = []
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        sub = _model_in(f.annotation)
        if sub is not None and typing.get_origin(f.annotation) not in (dict, list):
            tables.append((name, sub, f))
            continue
        required, value = _default(name, f)
        if f.description:
            scalars.append(f"# {f.description}")
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        if typing.get_origin(f.annotation) is dict and sub is not None:
            scalars.append(f"# [{(section + '.') if section else ''}{name}.NAME] (see below)")
            continue
        line = f"{name} = {_toml_value(value)}"
        scalars.append(line if required or value not in (None,) else f"# {line}")
    if section is not None:
        out.append(f"[{section}]")
    if extra_lines:
        out.extend(extra_lines)
    out.extend(scalars)
    out.append("")
    for name, sub, f in tables:
        if f.description:
            out.append(f"# {f.description}")
        describe_model(sub, f"{section}.{name}" if section else name, out)


def describe(host: PluginHost) -> str:
    """The commented example of both files, with every installed plugin's settings."""
    out: list[str] = [
        "# ===== mox.toml (static: read at start, changes need a restart) =====",
        "",
    ]
    describe_model(StaticConfig, None, out, skip=frozenset({"listeners", "transports", "acme"}))
    from mox_core.config.models import ACMEProvider

    out.append("# ACME providers (RFC 8555) by name; a listener's tls.acme names one.")
    describe_model(ACMEProvider, "acme.letsencrypt", out)
    out.append("# Listeners by name; each serves SMTP, submission and web on its IPs.")
    describe_model(Listener, "listeners.public", out)
    out.append("# Outgoing transports by name. Routes in domains.toml select them.")
    for kind_name, kind in sorted(host.transports.items()):
        out.append(f"# Transport kind {kind_name!r} from plugin {host.transports.owner(kind_name)}."
                   + (f" {kind.description}" if kind.description else ""))
        describe_model(
            kind.settings_model, f"transports.example_{kind_name}", out,
            extra_lines=[f"kind = {_toml_value(kind_name)}"]
            + [f"# {line}" for line in _common_lines(TransportCommon, {"kind"})],
        )
    out += ["", "# ===== domains.toml (dynamic: reloaded when it changes) =====", ""]
    from mox_core.config.models import Account, Destination, Domain

    describe_model(DynamicConfig, None, out, skip=frozenset(
        {"domains", "accounts", "routes", "web_handlers", "rate_limiters", "web_domain_redirects"}
    ))
    out.append("# Domains by name (Unicode form).")
    describe_model(Domain, 'domains."example.org"', out, skip=frozenset({"routes", "dkim"}))
    out.append("# Accounts by name.")
    describe_model(Account, "accounts.admin", out, skip=frozenset({"destinations", "routes"}))
    out.append('# Addresses of the account; "@example.org" is a catch-all for the domain.')
    describe_model(Destination, 'accounts.admin.destinations."admin@example.org"', out)
    out.append("# Routes: in accounts.NAME.routes, domains.NAME.routes or at top level;")
    out.append("# the first route whose criteria all match picks the transport.")
    out.append("[[routes]]")
    out.append('transport = "example_submission"  # a name from [transports] in mox.toml')
    for name, m in sorted(host.route_matchers.items()):
        out.append(f"# {name}: {m.description} (from plugin {host.route_matchers.owner(name)})")
    out.append('# to_domain = [".example.com"]')
    out.append("# minimum_attempts = 3")
    out.append("")
    out.append("[web_domain_redirects]")
    out.append('# "old.example.org" = "example.org"')
    out.append("")
    for kind_name, kind in sorted(host.webhandlers.items()):
        out.append(f"# Web handler kind {kind_name!r} from plugin {host.webhandlers.owner(kind_name)}."
                   + (f" {kind.description}" if kind.description else ""))
        out.append("[[web_handlers]]")
        describe_model(
            kind.settings_model, None, out,
            extra_lines=[f"kind = {_toml_value(kind_name)}"]
            + _common_lines(WebHandlerCommon, {"kind"}),
        )
    for kind_name, kind in sorted(host.rate_limiters.items()):
        out.append(f"# Rate limiter kind {kind_name!r} from plugin {host.rate_limiters.owner(kind_name)}."
                   + (f" {kind.description}" if kind.description else ""))
        describe_model(
            kind.settings_model, f"rate_limiters.example_{kind_name}", out,
            extra_lines=[f"kind = {_toml_value(kind_name)}"],
        )
    return "\n".join(out).rstrip() + "\n"


def _common_lines(model: type[BaseModel], skip: set[str]) -> list[str]:
    lines = []
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        required, value = _default(name, f)
        if f.description:
            lines.append(f"# {f.description}")
        lines.append(f"{name} = {_toml_value(value)}" if required or value is not None
                     else f"# {name} = ")
    return lines
