"""Typed configuration: dataclasses loaded from YAML, with ``key=value`` overrides.

A config is a (possibly nested) dataclass. Each field carries one comment line as its
documentation. Values are checked against the field's type hint; an unknown key names
the nearest valid one::

    cfg = load_config(TrainConfig, "examples/grpo_calculator.yaml", ["learner.lr=1e-5"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from taurl.errors import ConfigError

C = TypeVar("C")


def _nearest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: object) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: object, tp: object, where: str, base: object = None) -> object:
    """Return ``value`` checked (and, where lossless, converted) against type ``tp``.

    A mapping for a dataclass of ``base``'s type changes ``base`` (see :func:`_build`).
    """
    origin = get_origin(tp)
    if tp is typing.Any or tp is object or isinstance(tp, (str, typing.ForwardRef)):
        # object, Any, and the recursive JSONValue alias (a forward reference) take any value
        # YAML produced.
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__} "
                f"{value!r}"
            )
        return _build(tp, value, where, base if isinstance(base, tp) else None)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, where, base)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected None, got {value!r}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(
                    f"{where}: expected {len(args)} items ({_type_name(tp)}), got {len(value)}: "
                    f"{value!r}"
                )
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item_tp = args[0] if args else object
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        val_tp = args[1] if len(args) == 2 else object
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected bool (true/false), got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected str, got {type(value).__name__} {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type[C], data: Mapping[str, object], where: str, base: C | None = None) -> C:
    """``cls`` from ``data``; keys it leaves out take ``base``'s values, or without one the field defaults."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    kwargs: dict[str, object] = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {name!r}; {_nearest(str(key), list(fields))}")
        kwargs[key] = _coerce(value, hints[key], name, getattr(base, key, None))
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)  # type: ignore[type-var]
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def _set_dotted(tree: dict[str, object], dotted: str, value: object) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, object]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, object] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. learner.lr=1e-5)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        if isinstance(value, str) and _looks_like_float(value):
            value = float(value)
        _set_dotted(tree, key.strip(), value)
    return tree


def _looks_like_float(s: str) -> bool:
    """YAML 1.1 reads ``1e-5`` as a string; users mean a number."""
    try:
        float(s)
    except ValueError:
        return False
    return any(c.isdigit() for c in s)


def _merge(base: dict[str, object], update: Mapping[str, object]) -> dict[str, object]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)  # type: ignore[arg-type]
        else:
            out[k] = v
    return out


def _fix_yaml_floats(node: object) -> object:
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node):
        return float(node)
    return node


def config_from_dict(cls: type[C], data: Mapping[str, object], *, base: C | None = None) -> C:
    """Build dataclass ``cls`` from a nested mapping, checking keys and types.

    Without ``base``, a key ``data`` leaves out takes its field's default, and a nested
    section ``data`` gives (even in part) is built on its class's defaults. With ``base``,
    ``data`` changes only the keys it names, at every depth, and everything else keeps
    ``base``'s value (``base`` is not modified; the result shares its unchanged values).
    """
    return _build(cls, data, "", base)


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    base: C | None = None,
) -> C:
    """Load ``cls`` from an optional YAML file, then apply ``key=value`` overrides.

    ``base``: the config they change, key by key (see :func:`config_from_dict`).
    """
    data: dict[str, object] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(p)!r} must hold a mapping at top level, got {type(loaded).__name__}"
            )
        data = _fix_yaml_floats(loaded)  # type: ignore[assignment]
    data = _merge(data, parse_overrides(overrides))
    return config_from_dict(cls, data, base=base)


def config_to_dict(cfg: object) -> dict[str, object]:
    """A plain nested dict of a config dataclass (for YAML dumps and run directories)."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"expected a config dataclass, got {type(cfg).__name__}")
    return dataclasses.asdict(cfg)  # type: ignore[arg-type]


def dump_config(cfg: object, path: str | Path) -> None:
    """Write a config as YAML that :func:`load_config` reads back to an equal config."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
