"""The knowledge backends by name, and `make_backend(kind, **options)`, the one way the CLI and stages build one.

A backend's options are its constructor's parameters; an option another backend takes but this one does not is
named in the error together with every backend's options, so switching `backend` in a config whose
`backend_options` still hold the other backend's settings says exactly what to drop.
"""

from __future__ import annotations

import inspect
from typing import Any

from kt_jax.errors import ConfigError
from kt_jax.knowledge.anthropic_backend import AnthropicBackend
from kt_jax.knowledge.backend import CachedBackend
from kt_jax.knowledge.offline import OfflineBackend
from kt_jax.knowledge.world_backend import WorldBackend

BACKENDS: dict[str, type[CachedBackend]] = {"offline": OfflineBackend, "anthropic": AnthropicBackend,
                                            "world": WorldBackend}
_OPTION_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def backend_options(kind: str) -> list[str]:
    """The option names backend `kind` takes (its constructor's parameters), sorted."""
    params = inspect.signature(_backend_class(kind).__init__).parameters
    return sorted(name for name, p in params.items() if name != "self" and p.kind in _OPTION_KINDS)


def _backend_class(kind: str) -> type[CachedBackend]:
    if kind not in BACKENDS:
        raise ConfigError(f"knowledge backend {kind!r}: choose from {', '.join(map(repr, sorted(BACKENDS)))}")
    return BACKENDS[kind]


def _coerce_option(value: Any) -> Any:
    """CLI options arrive as strings: turn 'true'/'false'/numbers into Python values."""
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value


def make_backend(kind: str = "offline", **options: Any) -> CachedBackend:
    """The backend `kind` ("offline": deterministic, no network; "anthropic"; "world": exact, on world text) built.

    Every backend takes `cache` (sqlite path; "none" disables; offline default: none, Anthropic default:
    `$KT_JAX_CACHE` or `~/.cache/kt-jax/knowledge.sqlite3`), `validation_retries` and `retry_rejects`;
    `backend_options(kind)` lists the rest (offline: `dataset`, `texts`; Anthropic: `model`, `base_url`,
    `api_key_env`, `workers`, `requests_per_minute`, `batch`, prices, ...; world: `world`, the path of the run's
    world.json). Dashes in names read as underscores.
    """
    cls = _backend_class(kind)
    opts = {k.replace("-", "_"): _coerce_option(v) for k, v in options.items()}
    unknown = sorted(set(opts) - set(backend_options(kind)))
    if unknown:
        order = [kind, *sorted(k for k in BACKENDS if k != kind)]
        takes = "; ".join(f"{k} takes {backend_options(k)}" for k in order)
        raise ConfigError(f"knowledge backend {kind!r} does not take option(s) {unknown}; {takes}")
    if "cache" in opts and opts["cache"] in ("none", "", None, False):
        opts["cache"] = False  # explicitly disabled (None would mean: the backend's default location)
    try:
        return cls(**opts)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"knowledge backend {kind!r}: bad option value ({e})") from None
