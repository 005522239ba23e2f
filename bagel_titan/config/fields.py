"""Type-directed parsing and documentation of config dataclass fields.

Field docs are the string literals written under each field (as in `job_config.py`); they are
read from the source with `ast`, so a plugin's section is documented the same way as the core's.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from functools import lru_cache
from typing import Any, Literal, Union, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from bagel_titan.errors import UserError


class ConfigError(UserError, ValueError):
    """A user error in the config (TOML file or command line)."""


class FieldValueError(ValueError):
    """Raised by a section's `__post_init__` for one field: "<key> must be ..."; the loader
    prefixes the section ("training.steps must be > 0, got 0")."""


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring written under it} for a dataclass."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        klass_node = ast.parse(source).body[0]
        assert isinstance(klass_node, ast.ClassDef)  # the source of a class
        body = klass_node.body
        for node, nxt in zip(body, body[1:] + [None]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass (postponed annotations evaluated)."""
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, globalns=vars(module) if module else None)


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list[{type_name(inner)}]"
    if origin is dict:
        k, v = get_args(tp) or (Any, Any)
        return f"dict[{type_name(k)}, {type_name(v)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _bad(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")


def coerce(key: str, tp: Any, value: Any) -> Any:
    """Check `value` (a TOML value) against the field type `tp`, converting where lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, arg, value)
            except ConfigError as exc:
                errors.append(exc)
        raise _bad(key, tp, value)
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise _bad(key, tp, value)
        return [coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise _bad(key, tp, value)
        return {coerce(key, kt, k): coerce(f"{key}.{k}", vt, v) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _bad(key, tp, value)
        return build_dataclass(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(key, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(key, tp, value)
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _bad(key, tp, value)
    return value


def closest(name: str, candidates: list[str]) -> str:
    """' (did you mean X?)' for the closest candidate, or ''."""
    import difflib

    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate `cls` from a TOML table, rejecting unknown keys and wrong types."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    types_ = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(
                f"unknown key {key!r} in [{where}]{closest(key, names)} valid keys: {', '.join(names)}"
            )
        kwargs[key] = coerce(f"{where}.{key}", types_[key], value)
    try:
        return cls(**kwargs)
    except FieldValueError as exc:
        raise ConfigError(f"{where}.{exc}") from None
    except (ValueError, TypeError) as exc:  # a section's own __post_init__ checks
        raise ConfigError(f"[{where}] {exc}") from exc


def parse_cli_value(key: str, tp: Any, raw: str) -> Any:
    """A command-line string as a value of the field type (then checked by `coerce`)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        non_none = [a for a in get_args(tp) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        tp, origin = non_none[0], get_origin(non_none[0])
    if tp is str or (origin is Literal and all(isinstance(a, str) for a in get_args(tp))):
        return raw
    if tp is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--{key}: expected a boolean (true/false), got {raw!r}")
    if origin is list and not raw.lstrip().startswith("["):
        (inner,) = get_args(tp) or (str,)
        items = [s.strip() for s in raw.split(",") if s.strip()]
        return [parse_cli_value(key, inner, s) for s in items]
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if tp in (int, float):
            raise ConfigError(f"--{key}: expected {type_name(tp)}, got {raw!r}") from None
        return raw
