"""Config dataclasses to command-line flags and back, with YAML defaults.

A sub-command's settings are one dataclass; each field becomes a flag of the
same name (`batch_size` -> `--batch-size`), its default and `metadata["help"]`
written once. A YAML file given with `--config` supplies values that flags on
the command line override.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int; `bool` stays bool."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args and typing.get_origin(annotation) in (typing.Union, types.UnionType) else annotation


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
        if has_default:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            options["help"] += f" (default: {default})"
        parser.add_argument(flag, **options)


def config_from_mapping(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build `cls` from a dict of settings named like its fields (or its flags: `learning-rate`);
    unknown or missing settings are errors naming `where` (e.g. "run.yaml: train")."""
    values = {k.replace("-", "_"): v for k, v in values.items()}
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():  # YAML gives strings for paths (and for floats like 3e-5)
        kind = _base_type(hints[name])
        if kind in (int, float) and isinstance(value, str):
            try:
                values[name] = kind(value)
            except ValueError:
                raise ValueError(f"{where}: setting {name!r}: {value!r} is not a{'n' if kind is int else ''} "
                                 f"{kind.__name__}") from None
        elif kind is Path and value is not None:
            values[name] = Path(value)
        elif typing.get_origin(kind) is list and value is not None:
            items = value if isinstance(value, list) else [value]
            values[name] = [Path(v) for v in items] if typing.get_args(kind)[0] is Path else list(items)
    missing = [n for n, f in names.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing required settings {missing}")
    return cls(**values)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build `cls` from YAML (`args.config`, if any) overlaid with the flags given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

        with open(args.config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(loaded) - names
        if unknown:
            raise ValueError(f"{args.config}: unknown settings {sorted(unknown)}; known: {sorted(names)}")
        values.update(loaded)
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ValueError("missing required settings: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return cls(**values)


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
