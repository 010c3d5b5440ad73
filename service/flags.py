"""Command-line flags generated from a pydantic-settings model, so no setting is typed twice.

Each field becomes one flag (`max_batch_size` -> `--max-batch-size`): a bool is
`--x/--no-x`, a list a repeatable flag, a Literal a flag with choices, an int or float a
flag of that type, and anything string-like (str, Path, SecretStr) a string pydantic
converts. Its help is the field's description, then its environment variable and its
default (never a secret's). Every flag defaults to None, so only the flags actually given
override the environment.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

_STRING_LIKE = (str, Path, SecretStr)


@dataclass(frozen=True)
class Flag:
    """How a setting reads on the command line where the field alone does not say:
    `Annotated[list[SecretStr], Flag("--api-key", metavar="KEY")]`."""

    name: str | None = None
    metavar: str | None = None


def flag_name(field_name: str, field: FieldInfo) -> str:
    """`--max-batch-size` for `max_batch_size`, unless the field's Flag names it."""
    return _flag(field).name or "--" + field_name.replace("_", "-")


def env_name(model: type[BaseSettings], field_name: str) -> str:
    """The environment variable pydantic-settings reads the field from."""
    return (model.model_config.get("env_prefix", "") + field_name).upper()


def add_settings_flags(parser: argparse.ArgumentParser, model: type[BaseSettings]) -> None:
    """One flag per field of `model`, in field order."""
    for name, field in model.model_fields.items():
        parser.add_argument(flag_name(name, field), **_options(model, name, field))


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line actually gave, for `model(**given_settings(args))`."""
    return {name: value for name, value in vars(args).items() if value is not None}


def _flag(field: FieldInfo) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def _options(model: type[BaseSettings], name: str, field: FieldInfo) -> dict[str, Any]:
    annotation = _without_none(field.annotation)
    options: dict[str, Any] = {"dest": name, "default": None}
    if annotation is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(annotation) is list:
        options["action"] = "append"
        options["type"] = _value_type(model, name, typing.get_args(annotation)[0])
    elif typing.get_origin(annotation) is Literal:
        options["choices"] = typing.get_args(annotation)
    else:
        options["type"] = _value_type(model, name, annotation)
    if _flag(field).metavar and "choices" not in options and annotation is not bool:
        options["metavar"] = _flag(field).metavar
    options["help"] = _help(model, name, field, annotation).replace("%", "%%")
    return options


def _without_none(annotation: Any) -> Any:
    """`X` for `X | None` (a setting left unset is simply not given)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _value_type(model: type[BaseSettings], name: str, annotation: Any) -> type | None:
    """argparse's `type`: int and float are checked by argparse as before; string-like
    values pass as given and pydantic converts them."""
    if annotation in (int, float):
        return annotation
    if annotation in _STRING_LIKE:
        return None
    raise TypeError(f"{model.__name__}.{name}: no command-line flag for a {annotation!r}")


def _help(model: type[BaseSettings], name: str, field: FieldInfo, annotation: Any) -> str:
    where = [f"env {env_name(model, name)}"]
    if typing.get_origin(annotation) is list:
        where.append("comma-separated")
    default = _default_text(field, annotation)
    if default is not None:
        where.append(f"default {default}")
    return f"{field.description or ''} ({', '.join(where)})".lstrip()


def _default_text(field: FieldInfo, annotation: Any) -> str | None:
    """The default as the help shows it; None for a computed default, an unset one or a
    secret's."""
    if field.default_factory is not None or field.default is None or _is_secret(annotation):
        return None
    if isinstance(field.default, bool):
        return "on" if field.default else "off"
    if isinstance(field.default, float):
        return format(field.default, "g")
    return str(field.default)


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)
