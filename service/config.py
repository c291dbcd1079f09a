"""Settings of a casledger process: a frozen dataclass, read from ``CASLEDGER_*`` variables.

Every setting has an environment variable named after it (``db`` -> ``CASLEDGER_DB``,
``grpc_listen`` -> ``CASLEDGER_GRPC_LISTEN``, ...); command-line flags override them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from .auth import exposure_problem
from .storage import Durability, StoreOptions

ENV_PREFIX = "CASLEDGER_"


class SettingsError(ValueError):
    """A setting has a value casledger cannot use; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    db: str = "sqlite:///./casledger.db"
    grpc_listen: str = "127.0.0.1:50051"
    http_listen: str = "127.0.0.1:8080"
    no_http: bool = False
    max_content_bytes: int = 1 << 20
    durability: Durability = Durability.FULL
    request_id_ttl_s: int = 24 * 3600
    watch_queue: int = 1024
    shutdown_grace_s: float = 10.0
    # The shortest interval at which a client may ping an idle connection (README "tail").
    grpc_keepalive_min_s: float = 5.0
    log_level: str = "info"
    # Limits, metrics and logs (README: "Operating casledger: limits, metrics and logs").
    log_format: str = "auto"
    max_in_flight: int = 256
    max_watchers: int = 512
    metrics_listen: str = ""
    # Access control and TLS (README: "Access control and TLS").
    auth_tokens_file: str = ""
    insecure: bool = False
    tls_cert: str = ""
    tls_key: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.max_content_bytes <= 64 << 20:
            raise SettingsError("max_content_bytes must be between 1 and 67108864")
        if self.request_id_ttl_s < 24 * 3600:
            raise SettingsError("request_id_ttl_s must be at least 86400 (24 hours)")
        if self.watch_queue < 16:
            raise SettingsError("watch_queue must be at least 16")
        if self.shutdown_grace_s < 0:
            raise SettingsError("shutdown_grace_s must not be negative")
        if not 0 <= self.grpc_keepalive_min_s <= 3600:
            raise SettingsError("grpc_keepalive_min_s must be between 0 and 3600")
        if self.log_format not in ("auto", "json", "text"):
            raise SettingsError("log_format must be auto, json or text")
        if self.max_in_flight < 1 or self.max_watchers < 1:
            raise SettingsError("max_in_flight and max_watchers must be at least 1")
        if self.metrics_listen:
            host, sep, port = self.metrics_listen.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise SettingsError("metrics_listen must be HOST:PORT (or empty: off), not "
                                    f"{self.metrics_listen!r}")
        for name in ("grpc_listen", "http_listen"):
            host, sep, port = getattr(self, name).rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise SettingsError(f"{name} must be HOST:PORT, not {getattr(self, name)!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise SettingsError("--tls-cert and --tls-key go together: give both or neither")
        listens = [("--grpc-listen", self.grpc_listen)]
        if not self.no_http:
            listens.append(("--http-listen", self.http_listen))
        problem = exposure_problem(listens=listens, tokens=bool(self.auth_tokens_file),
                                   insecure=self.insecure)
        if problem:
            raise SettingsError(problem)

    @property
    def store_options(self) -> StoreOptions:
        return StoreOptions(
            max_content_bytes=self.max_content_bytes, durability=self.durability,
            request_id_ttl_s=self.request_id_ttl_s, watch_queue=self.watch_queue,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Settings from ``CASLEDGER_*`` variables, then `overrides` (None = not given)."""
        return load(cls, environ, **overrides)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


T = TypeVar("T")

# Settings whose flag and variable are singular although the field holds several values.
ALIASES = {"cors_allow_origins": "cors_allow_origin"}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + ALIASES.get(field_name, field_name).upper()


def flag_name(field_name: str) -> str:
    return "--" + ALIASES.get(field_name, field_name).replace("_", "-")


def load(cls: type[T], environ: Mapping[str, str], **overrides: Any) -> T:
    """An instance of the settings dataclass `cls` from ``CASLEDGER_*`` variables, then
    `overrides` (textual or typed values; None = not given)."""
    values: dict[str, Any] = {}
    for field in fields(cls):  # type: ignore[arg-type]
        raw = environ.get(env_name(field.name))
        if raw is not None:
            values[field.name] = parse(cls, field.name, raw)
    for name, value in overrides.items():
        if value is not None:
            values[name] = parse(cls, name, value) if isinstance(value, str) else value
    try:
        return cls(**values)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def parse(cls: type[Any], name: str, raw: str) -> Any:
    """Convert a textual setting (environment or flag) to the field's type."""
    default = next(f.default for f in fields(cls) if f.name == name)
    try:
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if isinstance(default, bool):
            if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, Durability):
            return Durability(raw.lower())
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise SettingsError(f"{env_name(name)} / {flag_name(name)}: cannot use {raw!r}") from None
    return raw
