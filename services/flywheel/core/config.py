"""Typed configuration: one dataclass per concern, every field with help text.

Each config dataclass names its YAML section in `SECTION`. Values come from (lowest to highest
precedence) the field defaults, that section of an optional YAML file (`FLYWHEEL_CONFIG` or an
explicit path), and environment variables named by one rule, `env_name(section, field)`:
FLYWHEEL_<SECTION>_<FIELD> upper-cased (kafka.max_attempts -> FLYWHEEL_KAFKA_MAX_ATTEMPTS).
A field renamed by that rule keeps its older variable as a deprecated alias
(`setting(..., alias=...)`), read only when the new one is unset. Each dataclass validates
itself in `__post_init__` and raises ConfigError naming the field and what to change, in the
manner of vLLM's config classes.

Variables that are process plumbing rather than settings are listed in OTHER_VARIABLES, so
docs/CONFIG.md names every FLYWHEEL_* variable the code reads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import yaml

log = logging.getLogger(__name__)

ENV_PREFIX = "FLYWHEEL"


class ConfigSection(Protocol):
    """A config dataclass: its fields come from YAML section `SECTION` and FLYWHEEL_<SECTION>_* variables."""

    SECTION: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


class Bundle(Protocol):
    """A dataclass of config sections (fields made with `section`)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


T = TypeVar("T", bound=ConfigSection)
B = TypeVar("B", bound=Bundle)

# FLYWHEEL_* variables that are not settings of a config section: read before any config is
# loaded, set by one process for another, or for tools and tests only.
OTHER_VARIABLES: dict[str, str] = {
    "FLYWHEEL_CONFIG": "Path of the YAML config file (`--config` overrides it).",
    "FLYWHEEL_LOG_LEVEL": "Log level of a service process (DEBUG, INFO, WARNING, ...); read before the config.",
    "FLYWHEEL_PARENT_PID": "Set by `flywheel up` for its children: a child exits when this process is gone.",
    "FLYWHEEL_CACHE": "Cache directory of `flywheel up` runs and tools/kafka.py (default ~/.cache/flywheel).",
    "FLYWHEEL_NAMESPACE": "`python -m flywheel.ops`: default Kubernetes namespace of the release.",
    "FLYWHEEL_POLICY_ADDR": "Set by the Helm chart: in-cluster gRPC address of the policy service, for clients.",
    "FLYWHEEL_FEEDBACK_ADDR": "Set by the Helm chart: in-cluster gRPC address of the feedback service, for clients.",
    "FLYWHEEL_REWARD_ADDR": "Set by the Helm chart: the reward service's address (read as `trainer.reward_addr`).",
    "FLYWHEEL_TRAINER_ADDR": "Set by the Helm chart; `python -m flywheel.ops`' trainer address (default: the release's).",
    "FLYWHEEL_ADMIN_TOKEN": "Also the default `--token` of `python -m flywheel.ops` (see `auth.admin_token`).",
    "FLYWHEEL_TOOLS_DIR": "scripts/ghz, scripts/grpcurl, scripts/helm: where the downloaded binaries are cached.",
    "FLYWHEEL_TEST_*": "Test suite only: reuse a running Kafka (FLYWHEEL_TEST_BOOTSTRAP) and the like.",
}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


def env_name(section: str, field: str) -> str:
    """The environment variable of a setting: FLYWHEEL_<SECTION>_<FIELD>, upper-cased."""
    return f"{ENV_PREFIX}_{section}_{field}".upper()


@dataclasses.dataclass(frozen=True)
class EnvVar:
    """The variable that sets one field, and the older name still read in its place."""

    name: str
    deprecated_alias: str | None


def env_vars(cls: type[ConfigSection]) -> dict[str, EnvVar]:
    """Field name -> its environment variable(s), for every field of config class `cls`."""
    return {f.name: EnvVar(env_name(cls.SECTION, f.name), f.metadata.get("alias")) for f in dataclasses.fields(cls)}


def setting(default: Any, help: str, *, alias: str | None = None) -> Any:
    """A config dataclass field with help text.

    alias: the variable that set this field before names followed `env_name`; still read,
    when the new one is unset, so that existing deployments keep working.
    """
    metadata = {"help": help, "alias": alias}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_help(cls: type[ConfigSection]) -> dict[str, str]:
    """Help text of every field of a config dataclass, for docs and --help."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def require(ok: bool, cls_name: str, field: str, value: Any, fix: str) -> None:
    """Raise ConfigError('<Class>.<field> = <value>: <fix>') unless ok."""
    if not ok:
        raise ConfigError(f"{cls_name}.{field} = {value!r}: {fix}")


def _coerce(raw: Any, tp: Any, where: str) -> Any:
    """Turn an env-var string or a YAML value into the field's declared type."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        value = raw.strip() if isinstance(raw, str) else raw
        if value not in choices:
            raise ConfigError(f"{where} = {raw!r}: use one of {', '.join(map(str, choices))}")
        return value
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
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in (file_values or {}).items():
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{cls.__name__}: unknown key {key!r} in config file; known: {known}")
        values[key] = _coerce(raw, hints[key], f"{cls.__name__}.{key}")
    for name, var in env_vars(cls).items():
        used = _set_variable(var)
        if used is not None:
            values[name] = _coerce(os.environ[used], hints[name], f"{used} ({cls.__name__}.{name})")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def env_value(cls: type[ConfigSection], field: str) -> str | None:
    """The raw value that the environment gives field `field` of `cls` (new name, else alias), or None."""
    used = _set_variable(env_vars(cls)[field])
    return os.environ[used] if used is not None else None


_warned: set[str] = set()


def _set_variable(var: EnvVar) -> str | None:
    """The name under which `var` is set in the environment, if it is (the new name wins)."""
    if var.name in os.environ:
        return var.name
    alias = var.deprecated_alias
    if alias is None or alias not in os.environ:
        return None
    if alias not in _warned:
        _warned.add(alias)
        log.warning("%s is deprecated: set %s instead", alias, var.name)
    return alias


def read_yaml(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
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


def load_section(cls: type[T], section: str | None = None, path: str | os.PathLike[str] | None = None, **kw: Any) -> T:
    """`load(cls)` with the values of one section of the YAML config file (default: `cls.SECTION`)."""
    section = section or cls.SECTION
    data = read_yaml(path).get(section) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {type(data).__name__}")
    return load(cls, data, **kw)


# Default (gRPC, HTTP) ports per service (docs/ARCHITECTURE.md, 'Services'); the one table everyone reads.
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "policy": (50051, 8080),
    "feedback": (50052, 8082),
    "reward": (50053, 8083),
    "trainer": (50054, 8084),
}


def section(cls: type[ConfigSection], name: str | None = None) -> Any:
    """A field of a service's config bundle: config class `cls`, read from YAML section `name`
    (default: `cls.SECTION`)."""
    return dataclasses.field(default_factory=cls, metadata={"section": name or cls.SECTION})


def load_bundle(cls: type[B], path: str | os.PathLike[str] | None = None) -> B:
    """Build a bundle of config dataclasses (fields made with `section`), each from its own
    YAML section and the environment."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: load_section(hints[f.name], f.metadata["section"], path) for f in dataclasses.fields(cls)})


SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclasses.dataclass
class KafkaConfig:
    """How to reach Kafka and how the bus behaves."""

    SECTION: ClassVar[str] = "kafka"

    bootstrap: str = setting(
        "",
        "Kafka bootstrap servers, host:port[,host:port]. Empty: the embedded broker of `flywheel up`.",
    )
    client_id: str = setting("flywheel", "Client id reported to the broker.")
    security_protocol: str = setting(
        "PLAINTEXT",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
    )
    sasl_mechanism: str = setting("", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when SASL is used.")
    sasl_username: str = setting("", "SASL user name.")
    sasl_password: str = setting("", "SASL password.")
    ssl_cafile: str = setting("", "CA bundle (PEM) that signed the brokers' certificates (SSL, SASL_SSL).")
    ssl_certfile: str = setting(
        "", "Client certificate chain (PEM) for brokers that require client certificates (SSL)."
    )
    ssl_keyfile: str = setting("", "Private key (PEM, unencrypted) of ssl_certfile.")
    ssl_check_hostname: bool = setting(
        True, "Check that a broker's certificate names the host dialed (turn off only for IP-only test setups)."
    )
    max_attempts: int = setting(
        5,
        "Tries of a consumer's handler on one record before it goes to the dead-letter topic.",
    )
    retry_backoff_s: float = setting(0.2, "First retry delay; doubles per try, capped at 5 s.")
    max_poll_interval_ms: int = setting(
        10_000,
        "Consumer max.poll.interval.ms. Short on purpose: the embedded broker completes a group join only with a short value.",
    )
    session_timeout_ms: int = setting(10_000, "Consumer group session timeout.")
    request_timeout_ms: int = setting(15_000, "Request timeout for producer and consumer.")

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
            self._check_sasl(n)
        self._check_ssl(n)
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

    def _check_sasl(self, n: str) -> None:
        require(
            self.sasl_mechanism in SASL_MECHANISMS,
            n,
            "sasl_mechanism",
            self.sasl_mechanism,
            f"use one of {', '.join(SASL_MECHANISMS)}",
        )
        for name in ("sasl_username", "sasl_password"):
            require(
                bool(getattr(self, name)),
                n,
                name,
                "" if name == "sasl_password" else getattr(self, name),  # never a password in a message
                f"{self.sasl_mechanism} needs the user name and password: set sasl_username and sasl_password",
            )

    def _check_ssl(self, n: str) -> None:
        """SSL files only with an SSL protocol (else they would be silently unused), each readable,
        the client pair complete and matching."""
        from flywheel.core.tls import check_ca, check_pair

        files = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
        for name in files:
            path = getattr(self, name)
            if not path:
                continue
            require(
                self.security_protocol.endswith("SSL"),
                n,
                name,
                path,
                f"security_protocol is {self.security_protocol}, which does not use TLS: use SSL or SASL_SSL",
            )
            require(os.path.isfile(path) and os.access(path, os.R_OK), n, name, path, "no readable file there")
        require(
            not self.ssl_keyfile or bool(self.ssl_certfile),
            n,
            "ssl_keyfile",
            self.ssl_keyfile,
            "set ssl_certfile too: the certificate chain of this key",
        )
        require(
            not self.ssl_certfile or bool(self.ssl_keyfile),
            n,
            "ssl_certfile",
            self.ssl_certfile,
            "set ssl_keyfile too: the private key of this certificate",
        )
        if self.ssl_certfile:
            check_pair(n, "ssl_certfile", self.ssl_certfile, "ssl_keyfile", self.ssl_keyfile)
        if self.ssl_cafile:
            check_ca(n, "ssl_cafile", self.ssl_cafile)

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
        if self.security_protocol.endswith("SSL"):
            opts["ssl_check_hostname"] = self.ssl_check_hostname
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, name):
                    opts[name] = getattr(self, name)
        return opts


@dataclasses.dataclass
class TopicsConfig:
    """Topic names, partitions and retention (docs/ARCHITECTURE.md, 'Kafka topics')."""

    SECTION: ClassVar[str] = "topics"

    interactions: str = setting(
        "flywheel.interactions", "Served answers (policy -> reward, trainer).", alias="FLYWHEEL_TOPIC_INTERACTIONS"
    )
    feedback: str = setting(
        "flywheel.feedback", "Accepted user feedback (feedback -> reward).", alias="FLYWHEEL_TOPIC_FEEDBACK"
    )
    preferences: str = setting(
        "flywheel.preferences",
        "Preference pairs (reward join -> reward training, trainer).",
        alias="FLYWHEEL_TOPIC_PREFERENCES",
    )
    policy_updates: str = setting(
        "flywheel.policy.updates", "Policy versions to serve (compacted).", alias="FLYWHEEL_TOPIC_POLICY_UPDATES"
    )
    reward_updates: str = setting(
        "flywheel.reward.updates",
        "Reward-model versions to score with (compacted).",
        alias="FLYWHEEL_TOPIC_REWARD_UPDATES",
    )
    dlq: str = setting(
        "flywheel.dlq", "Records that failed after every try, with the error in headers.", alias="FLYWHEEL_TOPIC_DLQ"
    )
    partitions: int = setting(
        3, "Partitions of each event topic (update topics always get 1).", alias="FLYWHEEL_TOPIC_PARTITIONS"
    )
    replication_factor: int = setting(
        1, "Replicas of each topic (3 on a production cluster).", alias="FLYWHEEL_TOPIC_REPLICATION"
    )
    retention_ms: int = setting(
        7 * 24 * 3600 * 1000, "Retention of event topics in ms (-1: forever).", alias="FLYWHEEL_TOPIC_RETENTION_MS"
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
