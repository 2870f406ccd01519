"""Base class for every typed config in the project.

Configs are pydantic models: each field is declared with its type, default and a docstring right below
it (pydantic turns those docstrings into field descriptions), unknown keys are rejected, and assignments
are validated too, so a `--set` override can never smuggle in a wrong type.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["StrictConfig", "ConfigError", "format_validation_error", "one_line"]


class StrictConfig(BaseModel):
    """A pydantic model that rejects unknown keys and validates on assignment."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        protected_namespaces=(),
    )


class ConfigError(ValueError):
    """A configuration problem, with every offending field named by its dotted path."""


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """Turn a pydantic ValidationError into one line per field: `a.b.c: message (got ...)`."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key (not a field of this config)")
        elif not e["loc"] and not prefix:  # a check across sections: its message names the fields, the input is everything
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{path}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def one_line(message: str) -> str:
    """A possibly multi-line message on one line: "head:" + its lines joined by "; "."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "".join(line + (" " if line.endswith(":") else "; ") for line in lines).rstrip("; ")
