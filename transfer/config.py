"""Server configuration: defaults < TOML file < environment (VDIT_*) < command-line options."""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ApiError
from formats.registry import RUNTIME_FORMATS, UPLOAD_FORMATS
from transfer.sizes import parse_size


class ConfigError(Exception):
    """A configuration value that cannot be used; the message names the key."""


@dataclass
class Config:
    """What a host runs with; `load` fills it from the defaults, file, environment and options."""

    host: str = "127.0.0.1"
    port: int = 8080
    state_dir: Path = Path("./data")
    database_url: str = ""  # empty: SQLite file in the state dir
    advertise_url: str = ""  # empty: http(s)://HOST:PORT
    tls_cert: Path | None = None  # PEM certificate (chain): serve HTTPS
    tls_key: Path | None = None  # its PEM private key
    name_label: str = field(default_factory=socket.gethostname)
    log_format: str = "logfmt"
    log_level: str = "info"
    session_ttl: int = 24 * 3600  # seconds a session (JWT) is valid
    task_ttl: int = 24 * 3600  # seconds a finished task is kept before garbage collection
    task_gc_interval: int = 60
    upload_ttl: int = 24 * 3600  # seconds a resumable upload waits to be resumed
    heartbeat_interval: int = 10
    # Runtime format of VDIs that imports create with sr=: by the upload's format through
    # images_type_mapping ("source:runtime, ..."), else images_type.
    images_type: str = "raw"
    images_type_mapping: str = ""  # e.g. "raw:raw, qcow2:qcow2, vhd:vhd"
    admin_password: str = ""  # for the first start only; generated and logged once if empty
    shutdown_timeout: float = 10.0  # seconds in-flight requests get on SIGTERM before they fail
    # Bytes of upload bodies all transfers together hold in memory; empty: a sixteenth of the
    # machine's memory, at most 256 MiB.
    upload_memory: str = ""
    # Limits (0 or empty: none). Transfers at once on this host (beyond: 503
    # TOO_MANY_TRANSFERS) and per user (429); seconds a connection may send or take no
    # byte; seconds a client may take to send a request's headers; bytes/s a body must
    # average over each rate_window seconds; the size of a header line; of a JSON body.
    max_transfers: int = 0
    max_user_transfers: int = 0
    idle_timeout: float = 300.0
    header_timeout: float = 60.0
    min_rate: str = ""
    rate_window: float = 60.0
    max_header_size: int = 8190
    max_json_body: str = "1M"
    # Bytes/s a background merge of layers (coalescing) may copy; empty: as fast as the disk
    # goes. Merges then leave more of the disk's bandwidth to transfers.
    coalesce_rate: str = ""
    config: Path | None = None
    image_mapping: dict[str, str] = field(default_factory=dict, repr=False)  # derived

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{(self.state_dir / 'state.db').resolve()}"

    @property
    def upload_budget(self) -> int:
        if self.upload_memory:
            return parse_size(self.upload_memory, "upload_memory")
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return min(256 << 20, ram // 16)

    @property
    def min_rate_bytes(self) -> int:
        return parse_size(self.min_rate, "min_rate") if self.min_rate else 0

    @property
    def coalesce_rate_bytes(self) -> int:
        return parse_size(self.coalesce_rate, "coalesce_rate") if self.coalesce_rate else 0

    @property
    def max_json_body_bytes(self) -> int:
        return parse_size(self.max_json_body, "max_json_body")

    @property
    def advertise(self) -> str:
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.host if self.host not in ("0.0.0.0", "::", "") else socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{host}:{self.port}"


FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "image_mapping"}
SOURCE_FORMATS = UPLOAD_FORMATS  # what an upload may be


def parse_images_type_mapping(text: str, default: str) -> dict[str, str]:
    """ "raw:raw, qcow2:qcow2" -> {source: runtime}; ConfigError naming the bad entry."""
    if default not in RUNTIME_FORMATS:
        raise ConfigError(
            f"images_type: {default!r} is not a runtime format ({', '.join(RUNTIME_FORMATS)})"
        )
    mapping: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        source, sep, runtime = (part.strip().lower() for part in entry.partition(":"))
        if not sep or not source or not runtime:
            raise ConfigError(f"images_type_mapping: {entry!r} is not source:runtime")
        if source not in SOURCE_FORMATS:
            raise ConfigError(
                f"images_type_mapping: {entry!r}: {source!r} is not an upload format "
                f"({', '.join(SOURCE_FORMATS)})"
            )
        if runtime not in RUNTIME_FORMATS:
            raise ConfigError(
                f"images_type_mapping: {entry!r}: {runtime!r} is not a runtime format "
                f"({', '.join(RUNTIME_FORMATS)}): tar and ova are upload formats only"
            )
        if source in mapping:
            raise ConfigError(
                f"images_type_mapping: {entry!r} maps {source!r} a second time "
                f"(already to {mapping[source]!r})"
            )
        mapping[source] = runtime
    return mapping


def _coerce(name: str, value: Any) -> Any:
    kind = FIELDS[name].type
    if name == "images_type_mapping" and isinstance(value, list):
        value = ", ".join(str(v) for v in value)  # TOML may give a list of "a:b" strings
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind in ("Path", "Path | None"):
            return Path(value).expanduser() if value not in (None, "") else None
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {value!r} is not a valid {kind}") from exc


def load(cli: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Config:
    """Merge the sources; `cli` holds only options the user gave (None means not given)."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    env = os.environ if env is None else env
    values: dict[str, Any] = {}

    config_path = cli.get("config") or env.get("VDIT_CONFIG")
    if config_path:
        path = Path(config_path).expanduser()
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML: {exc}") from exc
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in FIELDS or name == "config":
                raise ConfigError(f"config: unknown key {key!r} in {path}")
            values[name] = value
        values["config"] = path

    for name in FIELDS:
        env_value = env.get(f"VDIT_{name.upper()}")
        if env_value is not None and name != "config":
            values[name] = env_value

    values.update({k.replace("-", "_"): v for k, v in cli.items()})
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
    cfg = Config(**{k: _coerce(k, v) for k, v in values.items()})
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port: {cfg.port} is outside 0-65535")
    try:
        if cfg.upload_budget < 1 << 20:
            raise ConfigError(f"upload_memory: {cfg.upload_memory!r} is less than 1 MiB")
    except ApiError as exc:
        raise ConfigError(f"upload_memory: {exc.message}") from None
    for name in ("max_transfers", "max_user_transfers", "idle_timeout", "header_timeout"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}: must be 0 (no limit) or more")
    if cfg.rate_window <= 0:
        raise ConfigError("rate_window: must be a positive number of seconds")
    if cfg.max_header_size < 1024:
        raise ConfigError(f"max_header_size: {cfg.max_header_size} is less than 1024 bytes")
    try:
        cfg.min_rate_bytes  # noqa: B018 (parsed: an error names the key)
        cfg.coalesce_rate_bytes  # noqa: B018
        if cfg.max_json_body_bytes < 4096:
            raise ConfigError(f"max_json_body: {cfg.max_json_body!r} is less than 4 KiB")
    except ApiError as exc:
        raise ConfigError(exc.message) from None
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("tls_cert and tls_key go together: give both, or neither for HTTP")
    if cfg.log_format not in ("logfmt", "json"):
        raise ConfigError(f"log_format: {cfg.log_format!r} is not logfmt or json")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: {cfg.log_level!r} is not debug, info, warning or error")
    for name in ("session_ttl", "task_ttl", "task_gc_interval", "heartbeat_interval", "upload_ttl"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}: must be a positive number of seconds")
    cfg.image_mapping = parse_images_type_mapping(cfg.images_type_mapping, cfg.images_type)
    if cfg.database_url and not cfg.database_url.startswith(
        ("sqlite:", "postgresql:", "postgres:")
    ):
        raise ConfigError(f"database_url: {cfg.database_url!r} is not sqlite:/// or postgresql://")
