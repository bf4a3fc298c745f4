"""Typed configuration: one dataclass per concern, every field with help text.

Values come from (lowest to highest precedence) the field defaults, an optional YAML file
(`FLYWHEEL_CONFIG` or an explicit path), and `FLYWHEEL_*` environment variables. Each
dataclass validates itself in `__post_init__` and raises ConfigError naming the field and
what to change, in the manner of vLLM's config classes.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


def setting(default: Any, help: str, env: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field with help text and, optionally, the environment variable that sets it."""
    metadata = {"help": help, "env": env}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def field_help(cls: type) -> dict[str, str]:
    """Help text of every field of a config dataclass, for docs and --help."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def require(ok: bool, cls_name: str, field: str, value: Any, fix: str) -> None:
    """Raise ConfigError('<Class>.<field> = <value>: <fix>') unless ok."""
    if not ok:
        raise ConfigError(f"{cls_name}.{field} = {value!r}: {fix}")


def _coerce(raw: Any, tp: Any, where: str) -> Any:
    """Turn an env-var string or a YAML value into the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
            return None
        return _coerce(raw, args[0], where)
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        items = raw if isinstance(raw, list) else [s for s in str(raw).split(",") if s.strip()]
        return [_coerce(i.strip() if isinstance(i, str) else i, item, where) for i in items]
    if origin is dict:
        if isinstance(raw, Mapping):
            return dict(raw)
        pairs = [kv.split("=", 1) for kv in str(raw).split(",") if kv.strip()]
        return {k.strip(): v.strip() for k, v in pairs}
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if tp in (int, float, str):
            return tp(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where} = {raw!r}: expected {tp.__name__} ({e})") from None
    return raw


def load(cls: type[T], file_values: Mapping[str, Any] | None = None, **overrides: Any) -> T:
    """Build config dataclass `cls` from its defaults, a YAML mapping, env vars and overrides.

    Unknown keys in `file_values` are an error (a typo must not be silently ignored).
    """
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in (file_values or {}).items():
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{cls.__name__}: unknown key {key!r} in config file; known: {known}")
        values[key] = _coerce(raw, hints[key], f"{cls.__name__}.{key}")
    for name, f in names.items():
        env = f.metadata.get("env")
        if env and env in os.environ:
            values[name] = _coerce(os.environ[env], hints[name], f"{env} ({cls.__name__}.{name})")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def read_yaml(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The YAML config file (FLYWHEEL_CONFIG when path is None) as a dict of sections."""
    path = path or os.environ.get("FLYWHEEL_CONFIG")
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist: fix FLYWHEEL_CONFIG or --config")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: top level must be a mapping of sections")
    return data


def load_section(cls: type[T], section: str, path: str | os.PathLike | None = None, **kw: Any) -> T:
    """`load(cls)` with the values of one section of the YAML config file."""
    data = read_yaml(path).get(section) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {type(data).__name__}")
    return load(cls, data, **kw)


# Default (gRPC, HTTP) ports per service (DESIGN.md, 'Services'); the one table everyone reads.
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "policy": (50051, 8080),
    "feedback": (50052, 8082),
    "reward": (50053, 8083),
    "trainer": (50054, 8084),
}


def section(cls: type, name: str) -> Any:
    """A field of a service's config bundle: config class `cls`, read from YAML section `name`."""
    return dataclasses.field(default_factory=cls, metadata={"section": name})


def load_bundle(cls: type[T], path: str | os.PathLike | None = None) -> T:
    """Build a bundle of config dataclasses (fields made with `section`), each from its own
    YAML section and the environment."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: load_section(hints[f.name], f.metadata["section"], path) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class KafkaConfig:
    """How to reach Kafka and how the bus behaves."""

    bootstrap: str = setting(
        "",
        "Kafka bootstrap servers, host:port[,host:port]. Empty: the embedded broker of `flywheel up`.",
        env="FLYWHEEL_KAFKA_BOOTSTRAP",
    )
    client_id: str = setting("flywheel", "Client id reported to the broker.", env="FLYWHEEL_KAFKA_CLIENT_ID")
    security_protocol: str = setting(
        "PLAINTEXT",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
        env="FLYWHEEL_KAFKA_SECURITY_PROTOCOL",
    )
    sasl_mechanism: str = setting(
        "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when SASL is used.", env="FLYWHEEL_KAFKA_SASL_MECHANISM"
    )
    sasl_username: str = setting("", "SASL user name.", env="FLYWHEEL_KAFKA_SASL_USERNAME")
    sasl_password: str = setting("", "SASL password.", env="FLYWHEEL_KAFKA_SASL_PASSWORD")
    ssl_cafile: str = setting("", "CA bundle for SSL.", env="FLYWHEEL_KAFKA_SSL_CAFILE")
    max_attempts: int = setting(
        5,
        "Tries of a consumer's handler on one record before it goes to the dead-letter topic.",
        env="FLYWHEEL_KAFKA_MAX_ATTEMPTS",
    )
    retry_backoff_s: float = setting(
        0.2, "First retry delay; doubles per try, capped at 5 s.", env="FLYWHEEL_KAFKA_RETRY_BACKOFF_S"
    )
    max_poll_interval_ms: int = setting(
        10_000,
        "Consumer max.poll.interval.ms. Short on purpose: the embedded broker completes a group join only with a short value.",
        env="FLYWHEEL_KAFKA_MAX_POLL_INTERVAL_MS",
    )
    session_timeout_ms: int = setting(
        10_000, "Consumer group session timeout.", env="FLYWHEEL_KAFKA_SESSION_TIMEOUT_MS"
    )
    request_timeout_ms: int = setting(
        15_000, "Request timeout for producer and consumer.", env="FLYWHEEL_KAFKA_REQUEST_TIMEOUT_MS"
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        protocols = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        require(
            self.security_protocol in protocols,
            n,
            "security_protocol",
            self.security_protocol,
            f"use one of {', '.join(protocols)}",
        )
        if "SASL" in self.security_protocol:
            require(
                bool(self.sasl_mechanism),
                n,
                "sasl_mechanism",
                self.sasl_mechanism,
                "set FLYWHEEL_KAFKA_SASL_MECHANISM (e.g. SCRAM-SHA-512) for a SASL protocol",
            )
        for part in filter(None, self.bootstrap.split(",")):
            host, _, port = part.strip().rpartition(":")
            require(
                bool(host) and port.isdigit(),
                n,
                "bootstrap",
                self.bootstrap,
                "use host:port[,host:port], e.g. localhost:9092",
            )
        require(self.max_attempts >= 1, n, "max_attempts", self.max_attempts, "use 1 or more")
        require(self.retry_backoff_s >= 0, n, "retry_backoff_s", self.retry_backoff_s, "use 0 or more seconds")
        require(
            self.max_poll_interval_ms >= 1000, n, "max_poll_interval_ms", self.max_poll_interval_ms, "use at least 1000"
        )

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments shared by kafka-python's producer, consumer and admin client."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            opts.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.ssl_cafile:
            opts["ssl_cafile"] = self.ssl_cafile
        return opts


@dataclasses.dataclass
class TopicsConfig:
    """Topic names, partitions and retention (DESIGN.md, 'Kafka topics')."""

    interactions: str = setting(
        "flywheel.interactions", "Served answers (policy -> reward, trainer).", env="FLYWHEEL_TOPIC_INTERACTIONS"
    )
    feedback: str = setting(
        "flywheel.feedback", "Accepted user feedback (feedback -> reward).", env="FLYWHEEL_TOPIC_FEEDBACK"
    )
    preferences: str = setting(
        "flywheel.preferences",
        "Preference pairs (reward join -> reward training, trainer).",
        env="FLYWHEEL_TOPIC_PREFERENCES",
    )
    policy_updates: str = setting(
        "flywheel.policy.updates", "Policy versions to serve (compacted).", env="FLYWHEEL_TOPIC_POLICY_UPDATES"
    )
    reward_updates: str = setting(
        "flywheel.reward.updates",
        "Reward-model versions to score with (compacted).",
        env="FLYWHEEL_TOPIC_REWARD_UPDATES",
    )
    dlq: str = setting(
        "flywheel.dlq", "Records that failed after every try, with the error in headers.", env="FLYWHEEL_TOPIC_DLQ"
    )
    partitions: int = setting(
        3, "Partitions of each event topic (update topics always get 1).", env="FLYWHEEL_TOPIC_PARTITIONS"
    )
    replication_factor: int = setting(
        1, "Replicas of each topic (3 on a production cluster).", env="FLYWHEEL_TOPIC_REPLICATION"
    )
    retention_ms: int = setting(
        7 * 24 * 3600 * 1000, "Retention of event topics in ms (-1: forever).", env="FLYWHEEL_TOPIC_RETENTION_MS"
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        require(self.partitions >= 1, n, "partitions", self.partitions, "use 1 or more")
        require(self.replication_factor >= 1, n, "replication_factor", self.replication_factor, "use 1 or more")
        require(
            self.retention_ms == -1 or self.retention_ms > 0,
            n,
            "retention_ms",
            self.retention_ms,
            "use -1 (forever) or a positive number of ms",
        )
        names = [self.interactions, self.feedback, self.preferences, self.policy_updates, self.reward_updates, self.dlq]
        for name in names:
            require(
                bool(name) and len(name) <= 249 and all(c.isalnum() or c in "._-" for c in name),
                n,
                "topic",
                name,
                "topic names use letters, digits, '.', '_' and '-' (at most 249)",
            )
        require(len(set(names)) == len(names), n, "topics", names, "every topic needs its own name")

    def compacted(self) -> set[str]:
        """Topics that keep only the latest record per key (the model announcements)."""
        return {self.policy_updates, self.reward_updates}

    def all(self) -> list[str]:
        return [self.interactions, self.feedback, self.preferences, self.policy_updates, self.reward_updates, self.dlq]
