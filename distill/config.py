"""Config dataclasses to command-line flags and back, with YAML defaults: one source of truth per setting.

A sub-command's settings are one dataclass; each field becomes a flag of the
same name (`batch_size` -> `--batch-size`) and a YAML key, its default and
type written once. Field metadata says the rest:

- `help`: the flag's help; `choices`: the values allowed (flags and YAML alike);
- `volatile`: True when the setting does not change what the command writes
  (progress bars, cache folders, devices, server addresses); `output_settings`
  leaves those out, and every fingerprint (a resumable job's settings, a
  `distill run` stage's, a training run's) is derived from it;
- `backends`: the teacher backends a setting applies to; set for another, it
  is an error (`check_backend_settings`).

A YAML file given with `--config` supplies values that flags on the command
line override. Values from YAML, from `distill run` overrides and from flags
all go through one checker (`coerce`), so a setting has the same type whichever
way it came: `3e-5` (a string to YAML 1.1) becomes a float, while `4.7` for an
int or `[3]` for a number is an error naming the setting.

Why not transformers' `HfArgumentParser`: it passes every metadata key to
`argparse.add_argument` (so `volatile` or `backends` would break it), registers
both `--batch_size` and `--batch-size`, reads booleans as `--flag False` rather
than `--no-flag`, and fills in defaults, so YAML cannot sit under the flags
given (nor can `--dry-run` tell which were given).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from labelers.errors import UsageError

T = TypeVar("T")


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int; `bool` stays bool."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args and typing.get_origin(annotation) in (typing.Union, types.UnionType) else annotation


def _optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return f"list of {_type_name(typing.get_args(kind)[0])}"
    return {int: "an int", float: "a number", bool: "true or false", str: "a string", Path: "a path"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def _scalar(value: Any, kind: Any) -> Any:
    """`value` as `kind`, or TypeError."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value)
    else:  # pragma: no cover - a field type this module does not know
        raise TypeError(f"fields of type {kind} are not supported")
    raise TypeError


def coerce(value: Any, annotation: Any, name: str, where: str, choices: typing.Sequence | None = None) -> Any:
    """`value` checked against a field's type (and choices); ValueError naming `where` and the setting."""
    kind = _base_type(annotation)
    if value is None:
        if _optional(annotation):
            return None
        raise UsageError(f"{where}: setting {name!r}: needs a value ({_type_name(kind)})")
    try:
        if typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            items = value if isinstance(value, (list, tuple)) else [value]
            if not items:
                raise TypeError
            checked = [_scalar(v, item) for v in items]
        else:
            checked = _scalar(value, kind)
    except TypeError:
        shown = f"{value!r}" if not isinstance(value, (list, dict)) else f"{type(value).__name__} {value!r}"
        article = "n" if kind is int else ""
        what = f"a{article} {kind.__name__}" if kind in (int, float) else _type_name(kind)
        raise UsageError(f"{where}: setting {name!r}: {shown} is not {what}") from None
    if choices is not None:
        for v in checked if isinstance(checked, list) else [checked]:
            if v not in choices:
                raise UsageError(f"{where}: setting {name!r}: {v!r} is not one of {list(choices)}")
    return checked


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of `cls`; fields without a default are required."""
    hints = typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})
    # the command's own settings first, then those inherited from shared groups (e.g. encoder flags)
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        options: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:  # list[str] / list[Path]: one or more values
            item = typing.get_args(kind)[0]
            options.update(nargs="+", type=Path if item is Path else item, metavar=f.metadata.get("metavar", f.name.upper()))
        else:
            options["type"] = Path if kind is Path else kind
            if "choices" in f.metadata:
                options["choices"] = f.metadata["choices"]
            options["metavar"] = f.metadata.get("metavar", f.name.upper())
        if has_default and "(default:" not in options["help"]:  # a help that explains its default keeps it
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            options["help"] += f" (default: {default})"
        parser.add_argument(flag, **options)


def config_from_mapping(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build `cls` from a dict of settings named like its fields (or its flags: `learning-rate`), each
    value checked by `coerce`; unknown, missing or mistyped settings are errors naming `where`
    (e.g. "run.yaml: train")."""
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UsageError(f"{where}: unknown settings {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    checked = {name: coerce(value, hints[name], name, where, names[name].metadata.get("choices"))
               for name, value in values.items()}
    missing = [n for n, f in names.items() if n not in checked and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UsageError(f"{where}: missing required settings {missing}")
    return cls(**checked)


def load_yaml_mapping(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping; a syntax error names file, line and column."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise UsageError(f"{where}: not valid YAML: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: the top level must be a mapping of settings, got {type(loaded).__name__}")
    return loaded


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build `cls` from YAML (`args.config`, if any) overlaid with the flags given; one checker for both."""
    values: dict[str, Any] = {}
    where = "command line"
    if getattr(args, "config", None):
        values.update({str(k).replace("-", "_"): v for k, v in load_yaml_mapping(args.config).items()})
        where = str(args.config)
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        raise UsageError("missing required settings: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return config_from_mapping(cls, values, where)


def add_command(subparsers: argparse._SubParsersAction, name: str, cls: type[T], runner: Callable[[T], Any],
                help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command whose flags are `cls`'s fields and whose handler runs `runner(config)` (exit status 0)."""
    parser = subparsers.add_parser(name, help=help, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, cls)

    def handler(args: argparse.Namespace) -> int:
        runner(config_from_args(cls, args))
        return 0

    parser.set_defaults(handler=handler)
    return parser


def output_settings(cfg: Any, exclude: typing.Iterable[str] = ()) -> dict:
    """The settings that change what the command writes (fields not marked `volatile`, less `exclude`), as JSON
    types with sorted keys: what every fingerprint of a job is built from."""
    import json

    chosen = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if not f.metadata.get("volatile") and f.name not in set(exclude)}
    return json.loads(json.dumps(chosen, sort_keys=True, default=str))


def check_backend_settings(cfg: Any, backend: str) -> None:
    """A setting that only some backends take (`metadata["backends"]`), set to other than its default for another
    backend, is an error: one line naming the setting and the backend."""
    for f in dataclasses.fields(cfg):
        takes = f.metadata.get("backends")
        if takes is None or backend in takes:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if getattr(cfg, f.name) != default:
            raise UsageError(f"--{f.name.replace('_', '-')} applies to the {' and '.join(takes)} backend"
                             f"{'s' if len(takes) > 1 else ''}, not to --backend {backend}")
