"""Writes docs/configuration.md, the reference of every ``dskd_*`` key, from the plugin's own
schema (:class:`axolotl_dskd.integration.args.DSKDArgs`): ``python scripts/config_reference.py``. A test
fails when the page and the schema differ."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from axolotl_dskd.integration.args import DSKDArgs

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _type(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Annotated:
        return _type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if args:
        return " \\| ".join(_type(a) for a in args)
    return "`null`" if annotation is type(None) else f"`{annotation.__name__}`"


def _constraints(field: Any) -> list[Any]:
    """The field's own constraints, and those of an ``Annotated`` member of its type (a number
    that may also be ``auto``)."""
    found = list(field.metadata)
    for member in typing.get_args(field.annotation):
        if typing.get_origin(member) is typing.Annotated:
            for info in typing.get_args(member)[1:]:
                found += getattr(info, "metadata", [])
    return found


def _bounds(field: Any) -> str:
    parts = []
    for constraint in _constraints(field):
        for name, symbol in _BOUNDS.items():
            if getattr(constraint, name, None) is not None:
                parts.append(f"{symbol} {getattr(constraint, name)}")
        if getattr(constraint, "allow_inf_nan", True) is False:
            parts.append("finite")
    return ", ".join(parts)


def reference() -> str:
    """The page: one row per key, in the schema's order."""
    lines = [
        "# Configuration: every `dskd_*` key",
        "",
        "Generated from `axolotl_dskd/integration/args.py` by `python scripts/config_reference.py`; do not edit by",
        "hand. Every key is inactive without `dskd_teacher`; a misspelled one is refused.",
        "",
        "| key | type | default | bounds | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, field in DSKDArgs.model_fields.items():
        default = "(none)" if field.default is None else f"`{field.default}`"
        description = (field.description or "").replace("|", "\\|")
        lines.append(
            f"| `{name}` | {_type(field.annotation)} | {default} | {_bounds(field)} | {description} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    PAGE.write_text(reference())
    print(f"wrote {PAGE}")
