"""Reading a dataclass schema the way a config error needs it: which keys exist, what type a dotted path
has, and that type in words (`an integer`, `a list of strings`). mopd/config.py turns Hydra's and
OmegaConf's errors into ConfigErrors with these."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from mopd.core.errors import ConfigError


def check_known_keys(values: Any, schema: type, prefix: str = "") -> None:
    """Refuse keys the schema does not define (Hydra lets `+key=value` add them to any node)."""
    if not isinstance(values, dict):
        return
    hints = typing.get_type_hints(schema)
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(path, f"a field of {schema.__name__} (one of {', '.join(hints)}); "
                              "the schema is mopd/config.py")
        tp = _optional_of(hints[key]) or hints[key]
        if dataclasses.is_dataclass(tp):
            check_known_keys(value, tp, f"{path}.")
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            for name, item in (value or {}).items():  # dict[str, TeacherConfig]: any name, known fields
                check_known_keys(item, typing.get_args(tp)[1], f"{path}.{name}.")


def _optional_of(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if _is_union(tp) and len(args) == 1 else None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def field_type(path: str, schema: type) -> Any:
    """The declared type of a dotted field path of `schema` (`rollout.top_k`, `teachers.x.coef`), or None."""
    tp: Any = schema
    for part in re.sub(r"\[(\d+)\]", r".\1", path).split("."):
        if part.isdigit():  # a list element
            args = typing.get_args(tp)
            tp = args[0] if args else None
            continue
        if typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
            continue
        tp = _optional_of(tp) or tp
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:
            return None
    return tp


def describe_type(tp: Any) -> str:
    """A type as a user reads it: `an integer`, `a number`, `a list of strings`..."""
    if tp is None or tp is Any:
        return "a value"
    if _is_union(tp):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_plural(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_plural(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, f"a {tp}")


def _plural(tp: Any) -> str:
    one = describe_type(tp)
    return {"an integer": "integers", "a number": "numbers", "a string": "strings",
            "true or false": "booleans", "a value": "values"}.get(one, one)
