"""HTML forms generated from config models, and their answers parsed back into TOML values.

A form is a list of :class:`Spec` (one per key of a table), made from a pydantic model
(:func:`specs_from_model`: a plugin's settings model gets its form without UI code) or from
single types (:func:`spec_for`: a route criterion's ``value_type``). Each key's type picks its
input:

=====================================  ========================================================
type                                   input, and what is written
=====================================  ========================================================
``str``, ``Path``                      text (a ``Path`` written as a string)
``int``, ``float``                     number (bounds from ``ge``/``le``/``gt``/``lt``)
``bool``                               checkbox
``Literal[...]``, an ``Enum``          select of the values
``list[str|int|float|Path|Literal]``   text area, one value a line
``dict[str, str|int|float|...]``       text area, ``key = value`` a line
``X | None``                           the input of X; empty means "not set" (key removed)
a nested model                         a fieldset of its keys (a sub-table); an optional one
                                       has a checkbox that adds or removes the table
anything else                          a TOML value, as written in the file (``[1, "a"]``)
=====================================  ========================================================

Descriptions become help texts, defaults are shown. :func:`parse` compares every answer with
the value in the file (or, for a key the file does not have, with its default) and returns
only the changes (:class:`Changes`): an unchanged default is never added to the file.
Answers that are not of their type (``abc`` for a number) are errors of their field; the
rest is checked by validating the whole config when it is written
(:mod:`mox_core.admin.saving`).
"""

from __future__ import annotations

import enum
import json
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

__all__ = ["MISSING", "Changes", "Field", "Spec", "build", "parse", "spec_for", "specs_from_model", "text_of",
           "toml_text", "value_of"]

MISSING: Any = PydanticUndefined
_WORDS = {w: w.upper() for w in ("mta", "sts", "dkim", "smtp", "mx", "tls", "url", "ip", "id", "dns", "http",
                                   "https", "ca", "sasl", "spf", "dmarc", "tlsrpt")} | {"dont": "don't"}


@dataclass(frozen=True)
class Spec:
    """One key of a form: its name in the table, its input (``kind``) and what to say."""

    name: str
    kind: str  # text path int float bool choice lines pairs group toml
    description: str = ""
    default: Any = MISSING  # MISSING: required (no default)
    optional: bool = False  # None allowed: an empty answer removes the key
    options: tuple[Any, ...] = ()  # choice: the values
    item: Spec | None = None  # lines/pairs: the type of one value
    children: tuple[Spec, ...] = ()  # group: the nested model's keys
    minimum: float | None = None
    maximum: float | None = None
    label: str = ""

    @property
    def required(self) -> bool:
        return self.default is MISSING and not self.optional

    @property
    def title(self) -> str:
        """The label: the key in words (``max_age`` -> "Max age", ``mta_sts`` -> "MTA-STS")."""
        if self.label:
            return self.label
        words = [_WORDS.get(w, w) for w in self.name.replace("-", "_").split("_") if w]
        text = " ".join(words).replace("MTA STS", "MTA-STS")
        return text[:1].upper() + text[1:]


def _default(f: FieldInfo) -> Any:
    if f.default is not PydanticUndefined:
        return f.default
    if f.default_factory is not None:
        return f.default_factory()  # type: ignore[call-arg]
    return MISSING


def _bounds(f: FieldInfo | None) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in (f.metadata if f is not None else ()):
        lo = getattr(m, "ge", lo)
        hi = getattr(m, "le", hi)
        if getattr(m, "gt", None) is not None:
            lo = m.gt
        if getattr(m, "lt", None) is not None:
            hi = m.lt
    return lo, hi


def spec_for(name: str, annotation: Any, *, description: str = "", default: Any = MISSING,
             info: FieldInfo | None = None, choices: Sequence[Any] | None = None, label: str = "") -> Spec:
    """The :class:`Spec` of a key of type ``annotation``; ``choices``: a select of these
    values instead of the type's own input (e.g. the configured domains for a ``str``)."""
    tp, optional = _unoptional(annotation)
    lo, hi = _bounds(info)
    base = {"name": name, "description": description, "default": default, "optional": optional,
            "minimum": lo, "maximum": hi, "label": label}
    if choices is not None:
        return Spec(kind="choice", options=tuple(choices), **base)
    scalar = _scalar_spec(name, tp)
    if scalar is not None:
        return Spec(kind=scalar.kind, options=scalar.options, **base)
    if tp is bool:
        return Spec(kind="bool", **base)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return Spec(kind="group", children=tuple(specs_from_model(tp)), **base)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple, set, frozenset, Sequence) and args:
        item = _scalar_spec(name, args[0])
        if item is not None and (origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)):
            return Spec(kind="lines", item=item, **base)
    if origin in (dict, Mapping) and len(args) == 2 and args[0] is str:
        item = _scalar_spec(name, args[1])
        if item is not None:
            return Spec(kind="pairs", item=item, **base)
    return Spec(kind="toml", **base)


def _unoptional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional  # noqa: UP007
    return annotation, False


def _scalar_spec(name: str, tp: Any) -> Spec | None:
    if tp is str:
        return Spec(name, "text")
    if tp is int:
        return Spec(name, "int")
    if tp is float:
        return Spec(name, "float")
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return Spec(name, "path")
    if typing.get_origin(tp) is Literal:
        return Spec(name, "choice", options=typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return Spec(name, "choice", options=tuple(m.value for m in tp))
    return None


def specs_from_model(model: type[BaseModel], *, skip: Sequence[str] = (),
                     choices: Mapping[str, Sequence[Any]] | None = None) -> list[Spec]:
    """A :class:`Spec` for every field of ``model`` (but ``skip``), in the model's order."""
    out = []
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        key = f.alias or name
        out.append(spec_for(key, f.annotation, description=f.description or "", default=_default(f),
                            info=f, choices=(choices or {}).get(key)))
    return out


# --------------------------------------------------------------------------------------------
# values as text, and text as values


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, PurePath):
        return str(v)
    if isinstance(v, BaseModel):
        return v.model_dump(mode="json", exclude_defaults=True)
    return v


def _number_text(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return str(v)


def toml_text(v: Any) -> str:
    """``v`` as a TOML value, as the file would have it."""
    v = _plain(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list | tuple | set | frozenset):
        return "[" + ", ".join(toml_text(x) for x in v) + "]"
    if isinstance(v, Mapping):
        keys = (k if k.replace("_", "").replace("-", "").isalnum() and k.isascii() else json.dumps(k)
                for k in v)
        return "{" + ", ".join(f"{k} = {toml_text(x)}" for k, x in zip(keys, v.values(), strict=True)) + "}"
    return json.dumps(str(v))


def text_of(spec: Spec, value: Any) -> str:
    """What the input of ``spec`` shows for ``value``."""
    value = _plain(value)
    if value is None or value is MISSING:
        return ""
    if spec.kind in ("int", "float"):
        return _number_text(value)
    if spec.kind in ("text", "path", "choice"):
        return str(value)
    if spec.kind == "lines" and isinstance(value, list | tuple | set | frozenset) and spec.item is not None:
        return "\n".join(text_of(spec.item, x) for x in value)
    if spec.kind == "pairs" and isinstance(value, Mapping) and spec.item is not None:
        return "\n".join(f"{k} = {text_of(spec.item, x)}" for k, x in value.items())
    return toml_text(value)


class _Bad(ValueError):
    pass


def _scalar(spec: Spec, text: str) -> Any:
    if spec.kind in ("text", "path"):
        return text
    if spec.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise _Bad(f"{text!r} is not a whole number") from None
    if spec.kind == "float":
        try:
            return float(text)
        except ValueError:
            raise _Bad(f"{text!r} is not a number") from None
    for option in spec.options:  # choice
        if str(_plain(option)) == text:
            return _plain(option)
    raise _Bad(f"{text!r} is not one of {', '.join(str(_plain(o)) for o in spec.options)}")


def _lines(spec: Spec, text: str) -> list[Any]:
    assert spec.item is not None
    return [_scalar(spec.item, line.strip()) for line in text.splitlines() if line.strip()]


def _pairs(spec: Spec, text: str) -> dict[str, Any]:
    assert spec.item is not None
    out: dict[str, Any] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, eq, value = line.partition("=")
        if not eq or not key.strip():
            raise _Bad(f"line {n}: write key = value")
        if key.strip() in out:
            raise _Bad(f"line {n}: {key.strip()} appears twice")
        out[key.strip()] = _scalar(spec.item, value.strip())
    return out


def _toml(text: str) -> Any:
    try:
        return tomllib.loads("v = " + text)["v"]
    except tomllib.TOMLDecodeError as exc:
        raise _Bad(f"not a TOML value: {exc}") from None


def value_of(spec: Spec, text: str) -> Any:
    """The value of an answer; None for an empty answer of an optional key (not set), the
    default for an empty answer of a key that has one. Raises ValueError."""
    text = text.strip() if spec.kind not in ("lines", "pairs") else text
    if spec.kind == "bool":
        return text == "true"
    if not text.strip():
        if spec.optional:
            return None
        if spec.kind == "lines":
            return []
        if spec.kind == "pairs":
            return {}
        if spec.kind in ("text", "path") and not spec.required:
            return ""
        if spec.default is not MISSING:
            return _plain(spec.default)
        raise _Bad("a value is required")
    if spec.kind == "lines":
        return _lines(spec, text)
    if spec.kind == "pairs":
        return _pairs(spec, text)
    if spec.kind == "toml":
        return _toml(text)
    return _scalar(spec, text)


# --------------------------------------------------------------------------------------------
# the form as the template shows it


@dataclass
class Field:
    """One input of a rendered form."""

    spec: Spec
    key: str  # the form field's name: "mode", "mta_sts.mode"
    text: str = ""  # the input's value
    checked: bool = False  # bool: checked; group: the optional table is there
    set_in_file: bool = False  # the file has this key
    existing: bool = True  # the form edits a table of the file (not a new one)
    error: str = ""
    children: list[Field] = field(default_factory=list)

    @property
    def id(self) -> str:
        return "f-" + self.key.replace(".", "-")

    @property
    def default_text(self) -> str:
        """The default as the help text says it ("" when required, or when the default is
        "not set")."""
        s = self.spec
        if s.default is MISSING or s.default is None or s.kind == "group":
            return ""
        if s.kind == "bool":
            return "on" if s.default else "off"
        return text_of(s, s.default).replace("\n", ", ")  # "" for an empty default: not worth saying


def build(specs: Sequence[Spec], current: Mapping[str, Any] | None, answers: Mapping[str, str] | None = None,
          errors: Mapping[str, str] | None = None, prefix: str = "") -> list[Field]:
    """The fields of a form for the table ``current`` (its values as in the file; None for a
    table still to be made). With ``answers`` (a form sent back with errors) the inputs show
    what was sent."""
    existing = current is not None
    current = current or {}
    out = []
    for spec in specs:
        key = prefix + spec.name
        present = spec.name in current
        value = current.get(spec.name, spec.default)
        f = Field(spec, key, set_in_file=present, existing=existing, error=(errors or {}).get(key, ""))
        if spec.kind == "group":
            sub = value if isinstance(value, Mapping) else (_plain(value) if isinstance(value, BaseModel) else {})
            sub = sub if isinstance(sub, Mapping) and present else None
            f.checked = present if answers is None else answers.get(key + "._present") == "true"
            f.children = build(spec.children, sub if existing else None, answers, errors, key + ".")
        elif spec.kind == "bool":
            f.checked = bool(_plain(value)) if answers is None else answers.get(key) == "true"
        else:
            f.text = text_of(spec, value) if answers is None else answers.get(key, "")
        out.append(f)
    return out


# --------------------------------------------------------------------------------------------
# the answers as changes of the table


@dataclass
class Changes:
    """What to change in a table: keys to set (``values``), keys to remove, sub-tables'
    changes (a group to remove is in ``remove``), and the answers that are not of their type
    (form key -> message)."""

    values: dict[str, Any] = field(default_factory=dict)
    remove: set[str] = field(default_factory=set)
    groups: dict[str, Changes] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.values or self.remove or any(self.groups.values()))


def parse(specs: Sequence[Spec], answers: Mapping[str, str], current: Mapping[str, Any],
          prefix: str = "") -> Changes:
    """The changes the answers make to the table ``current`` (see the module docstring)."""
    ch = Changes()
    for spec in specs:
        key = prefix + spec.name
        present = spec.name in current
        if spec.kind == "group":
            _parse_group(spec, answers, current, key, ch)
            continue
        try:
            value = value_of(spec, answers.get(key, ""))
        except ValueError as exc:
            ch.errors[key] = str(exc)
            continue
        if value is None:
            if present:
                ch.remove.add(spec.name)
        elif present:
            if not _equal(current[spec.name], value):
                ch.values[spec.name] = value
        elif spec.default is MISSING or not _equal(spec.default, value):
            ch.values[spec.name] = value
    return ch


def _parse_group(spec: Spec, answers: Mapping[str, str], current: Mapping[str, Any], key: str,
                 ch: Changes) -> None:
    present = spec.name in current
    if spec.optional and answers.get(key + "._present") != "true":
        if present:
            ch.remove.add(spec.name)
        return
    sub_current = current.get(spec.name) if present else {}
    sub = parse(spec.children, answers, sub_current if isinstance(sub_current, Mapping) else {}, key + ".")
    ch.errors.update(sub.errors)
    if sub or (spec.optional and not present):
        ch.groups[spec.name] = sub


def _equal(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)
