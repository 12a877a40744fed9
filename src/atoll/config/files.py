"""TOML experiment files <-> ``Config``: read (``load``), override, validate, write (``dumps``).

Every section forbids unknown keys: a misspelt key is an error naming it and suggesting the
closest valid key; a bad value names the field and the accepted range.
"""
from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import get_args

from pydantic import BaseModel, ValidationError

from atoll.config.sections import Config
from atoll.errors import ConfigError


def load(path: str | Path | None = None, overrides: list[str] = (), text: str | None = None) -> Config:
    """Read a TOML file (or ``text``), apply ``key=value`` overrides, validate."""
    source = str(path) if path is not None else "<config>"
    if text is None:
        if path is None:
            text = ""
        elif not Path(path).exists():
            raise ConfigError(f"config file {path} does not exist")
        else:
            text = Path(path).read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    for item in overrides:
        _override(raw, item)
    return validate(raw, source)


def validate(raw: dict, source: str = "<config>") -> Config:
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_explain(e) for e in _errors(exc))) from None
    if cfg.vertical is not None:  # a vertical run reads [vertical] and name, seed, out_dir only
        unused = sorted(cfg.model_fields_set - {"vertical", "name", "seed", "out_dir"})
        if unused:
            raise ConfigError(f"{source}: a vertical run ([vertical]) does not use {unused}; "
                              "remove them (its settings are all in [vertical])")
    return cfg


def _override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word is a string
    *parents, leaf = key.strip().split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
    node[leaf] = parsed


def _errors(exc: ValidationError) -> list[dict]:
    """pydantic's errors, a key that takes one of several types (``bottom``: a list or a table)
    named once: the alternatives the value is not even of the type of are left out."""
    tag = lambda p: "[" in str(p) or p in ("str", "int", "float", "bool")  # noqa: E731 (a union member)
    errs = [e | {"loc": tuple(p for p in e["loc"] if not tag(p))} for e in exc.errors()]
    other = {e["loc"] for e in errs if e["type"] not in ("list_type", "dict_type")}
    return [e for e in errs if e["type"] not in ("list_type", "dict_type")
            or not any(o[:len(e["loc"])] == e["loc"] for o in other)]


def _explain(err: dict, prefix: tuple = ()) -> str:
    """One pydantic error as a sentence naming the key (``prefix``: the section it was read from)."""
    loc = ".".join(str(p) for p in (*prefix, *err["loc"]))
    if err["type"] == "value_error":  # a check across keys: its message names them
        return f"{loc}: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] == "extra_forbidden":
        *parent, leaf = [str(p) for p in (*prefix, *err["loc"])]
        valid = _fields_at(parent)
        near = difflib.get_close_matches(leaf, valid, n=1)
        hint = f"; did you mean '{'.'.join(parent + [near[0]])}'?" if near else ""
        return f"unknown key '{loc}'{hint} (valid keys here: {', '.join(valid)})"
    got = json.dumps(err.get("input"), default=str)
    return f"{loc}: {err['msg']} (got {got})"


def _fields_at(path: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for p in path:
        model = model.model_fields["asynchronous" if p == "async" else p].annotation
        if not isinstance(model, type):  # an optional section (vertical): VerticalConfig | None
            model = next((a for a in get_args(model) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def dumps(cfg: Config) -> str:
    """The resolved config as TOML (scalars first, then one table per section)."""
    data = cfg.model_dump(exclude_none=True, by_alias=True)
    if cfg.vertical is not None:  # the horizontal sections' defaults would not load back with it
        data = {k: data[k] for k in ("name", "seed", "out_dir", "vertical")}
    top = [f"{k} = {_toml(v)}" for k, v in data.items() if not isinstance(v, dict)]
    lines = top + [""]
    for section, values in data.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
            lines.append("")
    return "\n".join(lines)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {v!r} to TOML")
