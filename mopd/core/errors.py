"""Errors every layer raises and the application reports."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """An invalid configuration, raised at start-up. The message names the field and what was expected."""

    def __init__(self, field_name: str, expected: str, got: Any = None) -> None:
        self.field_name = field_name
        self.expected = expected
        self.got = got
        msg = f"invalid config `{field_name}`: expected {expected}"
        if got is not None:
            msg += f", got {got!r}"
        super().__init__(msg)
