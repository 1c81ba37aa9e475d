"""Typed plugin options: a frozen dataclass per plugin, validated against a suite's table.

    @dataclass(frozen=True)
    class Options:
        poison_rate: float = option(0.1, "fraction of training images poisoned", min=0, max=1)

`parse_options` turns a TOML table into an instance, or raises `OptionError` naming the
file, the key, what was given and what is valid.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from typing import Any, Mapping

from bench.errors import OptionError, did_you_mean


MAX_INT = 2**63 - 1  # what SQLite and torch's generators take


def option(
    default: Any,
    doc: str,
    *,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    choices: tuple | None = None,
    path: bool = False,
) -> Any:
    """A dataclass field with a default, a one-line doc and optional bounds or choices. With
    `path=True` (a str option), a relative path written in a suite is resolved against the
    suite file's folder, as tox and pyproject do."""
    meta = {"doc": doc, "min": min, "max": max, "min_exclusive": min_exclusive, "choices": choices, "path": path}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A plugin without options."""


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[operator]  # checked at registration: every option has a default


def describe(options_cls: type) -> list[dict]:
    """One dict per option: name, type, default, doc, bounds (for docs and `bench plugins`)."""
    hints = typing.get_type_hints(options_cls)
    rows = []
    for f in dataclasses.fields(options_cls):
        default = _default_of(f)
        rows.append(
            {
                "name": f.name,
                "type": _type_name(hints[f.name]),
                "default": default,
                "doc": f.metadata.get("doc", ""),
                "min": f.metadata.get("min"),
                "max": f.metadata.get("max"),
                "min_exclusive": f.metadata.get("min_exclusive", False),
                "choices": f.metadata.get("choices"),
            }
        )
    return rows


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


SUPPORTED_TYPES = (int, float, bool, str)


def check_options_class(options_cls: Any, owner: str) -> None:
    """Refuse, naming `owner` and the field, an `Options` class the core cannot validate: not a
    frozen dataclass, a field without a default, a type other than int, float, bool, str, an
    Enum or a list of those, or a default outside its own bounds or choices."""
    if not (isinstance(options_cls, type) and dataclasses.is_dataclass(options_cls)):
        raise OptionError(f"{owner}.Options must be a dataclass decorated with @dataclass(frozen=True)")
    if not options_cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise OptionError(f"{owner}.Options must be frozen: use @dataclass(frozen=True)")
    try:
        hints = typing.get_type_hints(options_cls)
    except Exception as exc:
        raise OptionError(f"{owner}.Options: cannot resolve its type annotations ({exc})") from None
    for f in dataclasses.fields(options_cls):
        where = f"{owner}.Options.{f.name}"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise OptionError(f"{where} has no default; give it one with bench.option(default, doc)")
        tp = hints[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else tp
        if not (item in SUPPORTED_TYPES or (isinstance(item, type) and issubclass(item, enum.Enum))):
            raise OptionError(
                f"{where} has type {getattr(tp, '__name__', tp)}; options are int, float, bool, str, "
                "an Enum, or a list of one of these"
            )
        default = _default_of(f)
        if isinstance(default, enum.Enum):
            default = default.value
        try:
            check_value(default, tp, f.metadata, where)
        except OptionError as exc:
            raise OptionError(f"the default is invalid: {exc}") from None


def is_scalar_option(options_cls: type, name: str) -> bool:
    """Whether the option takes a single value (a list given for it is then a sweep)."""
    hint = typing.get_type_hints(options_cls)[name]
    return typing.get_origin(hint) is not list


def parse_options(options_cls: type, table: dict, where: str) -> Any:
    """Build `options_cls` from a suite table; `where` names the file and table for errors."""
    hints = typing.get_type_hints(options_cls)
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "none"
            raise OptionError(
                f"{where}: unknown option '{key}'{did_you_mean(key, list(fields))}; valid options: {valid}"
            )
        values[key] = check_value(value, hints[key], fields[key].metadata, f"{where}.{key}")
    try:
        return options_cls(**values)
    except OptionError:
        raise
    except Exception as exc:  # a plugin's own check in __post_init__
        raise OptionError(f"{where}: {exc}") from None


def check_value(value: Any, tp: Any, meta: Mapping[str, Any], where: str) -> Any:
    """Type-check and range-check one value; returns it converted (int to float, str to Enum)."""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        valid = [m.value for m in tp]
        if value not in valid:
            hint = did_you_mean(value, valid) if isinstance(value, str) else ""
            raise OptionError(
                f"{where}: {value!r} is not valid{hint}; expected one of " + ", ".join(repr(v) for v in valid)
            )
        return tp(value)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise OptionError(f"{where}: expected a list, got {_given(value)}")
        (item_tp,) = typing.get_args(tp)
        return [check_value(v, item_tp, meta, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"{where}: expected a number, got {_given(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise OptionError(f"{where}: expected a finite number, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"{where}: expected an integer, got {_given(value)}")
    elif tp is bool:
        if not isinstance(value, bool):
            raise OptionError(f"{where}: expected true or false, got {_given(value)}")
    elif tp is str:
        if not isinstance(value, str):
            raise OptionError(f"{where}: expected a string, got {_given(value)}")
    lo, hi = meta.get("min"), meta.get("max")
    if tp is int and lo is None and not -MAX_INT <= value <= MAX_INT:
        raise OptionError(f"{where}: {value} is out of range; expected an integer of at most 63 bits")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        bound = f"> {lo}" if meta.get("min_exclusive") else f">= {lo}"
        raise OptionError(
            f"{where}: {value!r} is out of range; expected a value {bound}"
            + (f" and <= {hi}" if hi is not None else "")
        )
    if hi is None and tp is int and value > MAX_INT:
        raise OptionError(f"{where}: {value} is out of range; expected a value <= {MAX_INT}")
    if hi is not None and value > hi:
        raise OptionError(
            f"{where}: {value!r} is out of range; expected a value <= {hi}"
            + (f" and >= {lo}" if lo is not None else "")
        )
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        hint = did_you_mean(value, list(choices)) if isinstance(value, str) else ""
        raise OptionError(
            f"{where}: {value!r} is not valid{hint}; expected one of " + ", ".join(repr(c) for c in choices)
        )
    return value


def _given(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})"


def to_plain(options: Any) -> dict:
    """Options as JSON-ready plain values (Enums by value), for hashing and the store."""
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        out[f.name] = value.value if isinstance(value, enum.Enum) else value
    return out
