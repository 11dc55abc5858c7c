"""One options model per long command, read once by argparse, the studio's forms and the function.

After mergekit's `options.py`: a pydantic model states each option once (type, default, bounds,
help); `add_arguments` builds the command's flags from it and `from_args` validates what the
user typed with the same model the studio's forms and the Python API use, so a wrong value gets
the same one-line error everywhere.

A field's flag is `--field-name`; `json_schema_extra` may set `flag` (another name), `metavar`
and `cli: False` (not a flag). A `Literal` field gets choices; a boolean that defaults to False
is a switch, one that defaults to True gets `--no-field-name`. Unset flags are left out of the
namespace, so the model's default (or a base model's value) applies.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .errors import GemelError

M = TypeVar("M", bound=BaseModel)


def _extra(field) -> dict:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _flag(name: str, field) -> str:
    return _extra(field).get("flag") or "--" + name.replace("_", "-")


def _choices(annotation) -> list | None:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    for arg in get_args(annotation):  # Literal[...] | None
        if get_origin(arg) is Literal:
            return list(get_args(arg))
    return None


def _scalar_type(annotation):
    for t in (int, float, str):
        if annotation is t or t in get_args(annotation):
            return t
    return str


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], *, exclude: tuple[str, ...] = (),
                  defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per field of `model` (but `exclude`) to `parser`. `defaults` overrides the
    default named in a flag's help (a command whose defaults differ from the model's)."""
    defaults = defaults or {}
    for name, field in model.model_fields.items():
        if name in exclude or _extra(field).get("cli") is False:
            continue
        flag, help_ = _flag(name, field), field.description or ""
        default = defaults.get(name, field.default)
        if field.annotation is bool:
            if default:
                parser.add_argument("--no-" + flag[2:], dest=name, action="store_false", default=argparse.SUPPRESS,
                                    help=help_)
            else:
                parser.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_)
            continue
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        choices = _choices(field.annotation)
        if choices is not None:
            kwargs["choices"] = [c for c in choices if c is not None]
        else:
            kwargs["type"] = _scalar_type(field.annotation)
        if "metavar" in _extra(field):
            kwargs["metavar"] = _extra(field)["metavar"]
        if default is not None and choices is None and "default" not in help_:
            help_ = f"{help_} (default {default})".strip()
        parser.add_argument(flag, help=help_, **kwargs)


def from_args(model: type[M], args: argparse.Namespace, base: M | dict | None = None, **overrides) -> M:
    """The options the user typed on top of `base` (a model or dict; the model's defaults when
    None), validated once. A bad value raises GemelError naming its flag."""
    values = dict(base.model_dump() if isinstance(base, BaseModel) else base or {})
    values.update({k: getattr(args, k) for k in model.model_fields if hasattr(args, k)})
    values.update(overrides)
    return validate(model, values)


def validate(model: type[M], values: dict) -> M:
    """`model(**values)`, with a validation error turned into one line that names the option."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else ""
        field = model.model_fields.get(name)
        where = _flag(name, field) if field is not None else name or model.__name__
        given = f" {err['input']!r}" if "input" in err and not isinstance(err["input"], dict) else ""
        raise GemelError(f"{where}{given}: {err['msg'].lower()}") from None
