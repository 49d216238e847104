"""Validation errors as one line a user can act on: the one formatter of pydantic errors.

Every problem is `<dotted key>: <what is wrong>`; a mistyped key gets a "did you mean" hint when
the model it belongs to is known. Callers prefix the file or source and raise their own error type.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError


def describe_validation_error(error: ValidationError, model: type[BaseModel] | None = None,
                              limit: int | None = None) -> str:
    """'a.b: unknown key (did you mean a.c?); d: required key is missing; e: <pydantic message>'.

    `model` (the validated class) enables the hints; `limit` caps how many problems are listed.
    """
    problems = error.errors()
    shown = [_describe(problem, model) for problem in problems[:limit]]
    if limit is not None and len(problems) > limit:
        shown.append(f"... {len(problems) - limit} more")
    return "; ".join(shown)


def _describe(problem: Any, model: type[BaseModel] | None) -> str:
    loc = tuple(problem["loc"])
    key = ".".join(map(str, loc)) or "<root>"
    if problem["type"] == "extra_forbidden":
        known = _field_names(model, loc[:-1]) if model is not None else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        return f"{key}: unknown key" + (f" (did you mean {'.'.join(map(str, (*loc[:-1], hint[0])))}?)"
                                        if hint else "")
    if problem["type"] == "missing":
        return f"{key}: required key is missing"
    return f"{key}: {problem['msg']}"


def _field_names(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Field names of the (nested) model at `loc`, following lists and dicts; [] when unknown."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if typing.get_origin(annotation) in (list, tuple, set, frozenset, dict, Sequence):
            annotation = typing.get_args(annotation)[-1]  # `part` is an index or key: the element type
            continue
        field = getattr(annotation, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
    return list(getattr(_unwrap(annotation), "model_fields", {}))


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X; `Annotated[X, ...]` -> X; anything else as it is."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return annotation
