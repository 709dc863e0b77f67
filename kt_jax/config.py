"""Typed configs: dataclasses filled from YAML plus dotted `key.sub=value` overrides; unknown keys are errors."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kt_jax.errors import ConfigError, KtJaxError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (converting int->float and lists->tuples), or raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


OVERRIDE_HELP = (
    "dotted overrides: KEY=VALUE sets a value (a mapping VALUE is merged into the YAML's mapping), KEY:=VALUE "
    "replaces it whole (e.g. knowledge.backend_options:={} drops the YAML's options); VALUE is parsed as YAML"
)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any, *, replace: bool = False) -> None:
    """Set `tree[a][b]...` for the dotted key "a.b..." (a mapping value merges into a mapping unless `replace`)."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    old = node.get(parts[-1])
    node[parts[-1]] = value if replace or not (isinstance(value, dict) and isinstance(old, dict)) else deep_merge(
        old, value)


def split_override(item: str) -> tuple[str, Any, bool]:
    """'a.b=1' -> ('a.b', 1, False) (merge); 'a.b:={}' -> ('a.b', {}, True) (replace). VALUE is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value (merge) or key.sub:=value (replace)")
    key, raw = item.split("=", 1)
    replace = key.endswith(":")
    key = key.removesuffix(":").strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: VALUE is not valid YAML: {e}") from None
    return key, value, replace


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """A copy of `data` with each override applied in order (see OVERRIDE_HELP)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, value, replace = split_override(item)
        set_dotted(out, key, value, replace=replace)
    return out


def parse_overrides(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Turn ['a.b=1', 'c=[x, y]'] into a nested dict (merge semantics; see `apply_overrides`)."""
    return apply_overrides({}, overrides)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `update` merged into `base` recursively."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    """Build the dataclass `cls` from a plain dict, naming `source` in any error."""
    try:
        return _from_dict(cls, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Load `cls` from a YAML file (optional) with dotted overrides applied on top."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " (+ overrides)"
    return from_dict(cls, data, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (tuples become lists), for YAML/JSON output."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def config_hash(obj: Any) -> str:
    """A stable 16-hex-digit hash of a config (dataclass or plain data)."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_json_file(file: str | Path, *, error: type[KtJaxError] = ConfigError, what: str = "a JSON file"
                   ) -> dict[str, Any]:
    """The JSON object in `file`; `error` naming the file when it is missing, not JSON, or not an object."""
    file = Path(file)
    if not file.is_file():
        raise error(f"{file}: not found (is {file.parent} {what}?)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
