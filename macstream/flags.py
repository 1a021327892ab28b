"""Command-line flags and environment variables generated from the pydantic configs (the one source of truth).

Every field ``name`` of a config becomes the flag ``--name-with-dashes`` (its help is the field's description) and the
environment variable ``MACSTREAM_<SECTION>_<NAME>`` (e.g. ``MACSTREAM_SERVE_PORT``). A new config field is therefore a
flag and a variable without another edit. Precedence, lowest first: the field's default, the ``--config`` JSON file,
the environment, the flags. Everything is validated once, by the model, with the model's messages.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing

from pydantic import BaseModel

from pipeline.config import load_config, read_json_object


def _scalar(annotation):
    """The one non-None type of ``X | None``, else the annotation itself."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return args[0] if union and len(args) == 1 else annotation


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One flag per field of ``model`` (except ``skip``). Flags default to None: only what the user typed overrides."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        ann = _scalar(field.annotation)
        flag = "--" + name.replace("_", "-")
        helptext = (field.description or "").replace("%", "%%")
        if typing.get_origin(ann) is typing.Literal:
            parser.add_argument(flag, dest=name, choices=typing.get_args(ann), help=helptext)
        elif ann is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif ann in (int, float, str):
            # the model converts
            parser.add_argument(flag, dest=name, type=str, metavar={int: "N", float: "X", str: "TEXT"}[ann],
                                help=helptext)
        else:  # lists and dicts: JSON on the command line
            parser.add_argument(flag, dest=name, type=json.loads, metavar="JSON", help=helptext + " (JSON)")


def env_prefix(section: str) -> str:
    return f"MACSTREAM_{section.upper()}_"


def from_env(model: type[BaseModel], section: str, environ: typing.Mapping[str, str] | None = None) -> dict:
    """``MACSTREAM_<SECTION>_<FIELD>`` variables of ``model``'s fields (JSON for lists and dicts)."""
    environ = os.environ if environ is None else environ
    out = {}
    for name, field in model.model_fields.items():
        raw = environ.get(env_prefix(section) + name.upper())
        if raw is None:
            continue
        structured = typing.get_origin(_scalar(field.annotation)) in (list, dict)
        out[name] = json.loads(raw) if structured else raw
    return out


def given(model: type[BaseModel], section: str, args: argparse.Namespace, name: str) -> bool:
    """Whether the user set ``name`` anywhere (flag, environment or config file), rather than left the default."""
    return (getattr(args, name, None) is not None or name in from_env(model, section)
            or name in read_json_object(getattr(args, "config", None)))


def build(model: type[BaseModel], section: str, args: argparse.Namespace, extra: dict | None = None):
    """defaults < ``args.config`` file < environment < flags (< ``extra``), validated into ``model``."""
    flags = {k: getattr(args, k) for k in model.model_fields if getattr(args, k, None) is not None}
    data = read_json_object(getattr(args, "config", None)) | from_env(model, section) | flags | (extra or {})
    try:
        return load_config(model, data, section)
    except ValueError as err:  # name the flag next to the field: "ingest: batch_size (--batch-size): ..."
        msg = str(err)
        for name in model.model_fields:
            msg = msg.replace(f"{section}: {name}:", f"{section}: {name} (--{name.replace('_', '-')}):")
        raise ValueError(msg) from None
