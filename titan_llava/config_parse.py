"""Config parsing helpers: reading TOML/JSON files, `--section.key value` CLI arguments, and
type-checked coercion of raw values to the annotated field types (used by titan_llava.config)."""

from __future__ import annotations

import difflib
import json
import os
import sys
import types
from typing import Any, Literal, Union, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_config_file(path: str) -> dict[str, Any]:
    """Raw nested dict from a .toml or .json file."""
    if not os.path.isfile(path):
        raise ValueError(f"job.config_file: file {path!r} does not exist")
    try:
        if path.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"job.config_file: cannot parse {path!r}: {e}") from e


class BareFlag(str):
    """The value of a key given with no value (`--compile.enable`): "true" for a boolean key, an
    error naming the key for any other type."""


def parse_cli(argv: list[str]) -> dict[str, dict[str, str]]:
    """`--section.key value` / `--section.key=value` -> {section: {key: raw string}}.
    A bare boolean flag (`--compile.enable`) means true."""
    out: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ValueError(f"expected --section.key [value], got {arg!r}")
        if "=" in arg:
            dotted, value = arg[2:].split("=", 1)
            i += 1
        else:
            dotted = arg[2:]
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 2
            else:
                value = BareFlag("true")  # type-checked later: only bools accept it
                i += 1
        section, key = dotted.split(".", 1)
        out.setdefault(section, {})[key] = value
    return out


def suggest(name: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def coerce(value: Any, tp: Any, key: str, from_cli: bool = False) -> Any:
    """Check `value` against annotation `tp`; return it coerced. File values must already have the
    right TOML/JSON type; CLI values are strings parsed per the type."""
    origin, args = get_origin(tp), get_args(tp)
    from_cli = from_cli and isinstance(value, str)
    if origin in (Union, types.UnionType):
        if value is None or (from_cli and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, f"unsupported annotation {tp} for {key}"
        return coerce(value, inner[0], key, from_cli)
    if isinstance(value, BareFlag) and tp is not bool:
        raise ValueError(f"{key} needs a value (only true/false keys may be given bare)")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ValueError(f"{key} must be a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli:
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli:
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key} must be a string, got {value!r}")
    if origin in (list, tuple):
        if from_cli:
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{key}: cannot parse {value!r} as a JSON list: {e}") from e
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        if origin is list:
            return [coerce(v, args[0], f"{key}[{i}]", from_cli) for i, v in enumerate(value)]
        if len(value) != len(args):
            raise ValueError(f"{key} must have {len(args)} elements, got {value!r}")
        return tuple(
            coerce(v, a, f"{key}[{i}]", from_cli) for i, (v, a) in enumerate(zip(value, args))
        )
    raise AssertionError(f"unsupported annotation {tp} for {key}")
