"""Prompt templates: sandboxed Jinja2 (specs are data, never code)."""

from __future__ import annotations

import functools
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment


@functools.lru_cache(maxsize=1)
def _jinja() -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, keep_trailing_newline=False, trim_blocks=True, lstrip_blocks=True
    )


@functools.lru_cache(maxsize=256)
def _compile(source: str):
    return _jinja().from_string(source)


def check_template(source: str) -> str | None:
    """None if `source` compiles, else the error message."""
    try:
        _compile(source)
    except TemplateSyntaxError as e:
        return f"line {e.lineno} of the template: {e.message}"
    return None


def render(source: str, **variables: Any) -> str:
    return _compile(source).render(**variables).strip()
