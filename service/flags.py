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
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

_STRING_LIKE = (str, Path, SecretStr)
# A URL's user and password (`scheme://user:password@host`), never quoted back.
_CREDENTIALS = re.compile(r"(\w+://)[^/@\s]*@")


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


def add_settings_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseSettings],
    only: Iterable[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One flag per field of `model` (or per field named in `only`), in field order.

    Without `defaults` every flag defaults to None, so that only the flags given override
    the environment. With it (a tool that starts the server with settings of its own,
    e.g. bench/loadgen.py) each flag but a list's defaults to the field's default, or to
    `defaults[name]` where given, and the help says which."""
    chosen = model.model_fields if only is None else {n: model.model_fields[n] for n in only}
    for name, field in chosen.items():
        default = None
        if defaults is not None:
            default = defaults.get(name, field.get_default(call_default_factory=True))
        parser.add_argument(flag_name(name, field), **_options(model, name, field, default))


def settings_flags(model: type[BaseSettings], values: Mapping[str, Any]) -> list[str]:
    """The command line that sets `values` (field name -> value), the inverse of the
    flags `add_settings_flags` makes; None values are left out."""
    flags: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        flag = flag_name(name, model.model_fields[name])
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(value, list):
            flags.extend(part for item in value for part in (flag, str(item)))
        else:
            flags.extend((flag, str(value)))
    return flags


def settings_environment(model: type[BaseSettings], values: Mapping[str, Any]) -> dict[str, str]:
    """The environment variables that set `values` (field name -> value), as a container
    or a ConfigMap gives them; None values are left out. A list is written as the
    comma-separated form the `NoDecode` list fields read (`HORNET_MODEL_DIR=a,b`). Secrets
    are refused, never written out."""
    environment: dict[str, str] = {}
    for name, value in values.items():
        if value is None:
            continue
        if _is_secret(model.model_fields[name].annotation):
            raise ValueError(f"{name} is a secret: not written into an environment")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list):
            text = ",".join(str(item) for item in value)
        else:
            text = str(value)
        environment[env_name(model, name)] = text
    return environment


def settings_problems(model: type[BaseSettings], exc: ValidationError) -> list[str]:
    """What pydantic found wrong with `model`'s settings, one line each, naming the flag
    and the environment variable (`--max-upload-mb (HORNET_MAX_UPLOAD_MB): input should
    be greater than 0, given '-1'`). The value given is quoted for a field that is not a
    secret, cut at 100 characters, a URL's user and password left out; pydantic's own
    text is not used, as it quotes the input of a check over several settings whole,
    API keys included."""
    problems = []
    for error in exc.errors(include_url=False, include_context=False, include_input=True):
        message = error["msg"].removeprefix("Value error, ")
        field = model.model_fields.get(str(error["loc"][0])) if error["loc"] else None
        if field is None:  # a check of several settings together: its message names them
            problems.append(message)
            continue
        name = str(error["loc"][0])
        where = f"{flag_name(name, field)} ({env_name(model, name)})"
        given = error.get("input")
        if not _is_secret(field.annotation) and isinstance(given, str | int | float | Path):
            text = _CREDENTIALS.sub(r"\1***@", str(given))
            shown = text if len(text) <= 100 else text[:100] + "..."
            if message[1:2].islower():  # "Input should be ..." within the sentence
                message = message[0].lower() + message[1:]
            message = f"{message}, given {shown!r}"
        problems.append(f"{where}: {message}")
    return problems


def unknown_environment(model: type[BaseSettings], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `environ` with `model`'s prefix that are none of its settings (a
    typo, a setting of another version), each with the setting it is closest to, or ""
    (names only: a value could be a secret). pydantic-settings ignores them."""
    prefix = model.model_config.get("env_prefix", "").upper()
    if not prefix:
        return {}
    known = [env_name(model, name) for name in model.model_fields]
    unknown = sorted(
        name for name in environ if name.upper().startswith(prefix) and name.upper() not in known
    )
    return {
        name: next(iter(difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.75)), "")
        for name in unknown
    }


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line actually gave, for `model(**given_settings(args))`."""
    return {name: value for name, value in vars(args).items() if value is not None}


def _flag(field: FieldInfo) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def _options(
    model: type[BaseSettings], name: str, field: FieldInfo, default: Any = None
) -> dict[str, Any]:
    """argparse's options for the field's flag; `default` (None: unset) is its default
    and the help's, but for a list (argparse would append to it: lists stay unset)."""
    annotation = _without_none(field.annotation)
    options: dict[str, Any] = {"dest": name, "default": default}
    if annotation is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(annotation) is list:
        options["action"] = "append"
        options["default"] = default = None
        options["type"] = _value_type(model, name, typing.get_args(annotation)[0])
    elif typing.get_origin(annotation) is Literal:
        options["choices"] = typing.get_args(annotation)
    else:
        options["type"] = _value_type(model, name, annotation)
    if _flag(field).metavar and "choices" not in options and annotation is not bool:
        options["metavar"] = _flag(field).metavar
    options["help"] = _help(model, name, field, annotation, default).replace("%", "%%")
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


def _help(
    model: type[BaseSettings],
    name: str,
    field: FieldInfo,
    annotation: Any,
    default_value: Any = None,
) -> str:
    where = [f"env {env_name(model, name)}"]
    if typing.get_origin(annotation) is list:
        where.append("comma-separated")
    default = _default_text(field, annotation, default_value)
    if default is not None:
        where.append(f"default {default}")
    return f"{field.description or ''} ({', '.join(where)})".lstrip()


def _default_text(field: FieldInfo, annotation: Any, value: Any = None) -> str | None:
    """The default as the help shows it (`value`, else the field's); None for a computed
    default, an unset one or a secret's."""
    if value is None:
        if field.default_factory is not None:
            return None
        value = field.default
    if value is None or _is_secret(annotation):
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)
