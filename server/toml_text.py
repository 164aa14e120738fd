"""A tiny TOML writer for flat tables of scalars, enough for the server's config.

`tomllib` reads TOML but the standard library has no writer, and the config
needs only tables of strings, integers, floats, booleans and lists of those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["TomlScalar", "TomlValue", "dumps"]

TomlScalar = str | int | float | bool
TomlValue = TomlScalar | Sequence[TomlScalar]

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _string(value: str) -> str:
    out = []
    for char in value:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            # TOML forbids raw control characters in basic strings.
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _scalar(value: TomlScalar) -> str:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML config values must be finite, got {value}")
        return repr(value)
    return _string(value)


def _value(value: TomlValue) -> str:
    if isinstance(value, str | int | float | bool):
        return _scalar(value)
    return "[" + ", ".join(_scalar(item) for item in value) + "]"


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else _string(key)


def dumps(tables: Mapping[str, Mapping[str, TomlValue]], header: str = "") -> str:
    """Render `tables` as TOML text, one ``[table]`` per key, in the given order.

    Parameters
    ----------
    tables
        Table name to its key/value pairs.
    header
        Comment lines put at the top (each prefixed with ``#``).
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for name, items in tables.items():
        if lines:
            lines.append("")
        lines.append(f"[{_key(name)}]")
        lines += [f"{_key(key)} = {_value(value)}" for key, value in items.items()]
    return "\n".join(lines) + "\n"
