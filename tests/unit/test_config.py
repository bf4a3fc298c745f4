"""Config loading and the precision of its error messages."""

import dataclasses
import re
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from flywheel.core.config import (
    OTHER_VARIABLES,
    ConfigError,
    KafkaConfig,
    TopicsConfig,
    env_name,
    env_vars,
    field_help,
    load,
    load_bundle,
    load_section,
    section,
    setting,
)
from flywheel.policy.service import PolicyServiceConfig
from flywheel.reward.server import RewardServiceConfig
from tools.configdoc import config_classes

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_every_field_has_help():
    for cls in (KafkaConfig, TopicsConfig):
        cls()
        helps = field_help(cls)
        assert all(helps[f.name] for f in dataclasses.fields(cls)), cls


def test_env_overrides_defaults_and_is_coerced(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSTRAP", "k1:9092,k2:9093")
    monkeypatch.setenv("FLYWHEEL_KAFKA_MAX_ATTEMPTS", "7")
    cfg = load(KafkaConfig)
    assert cfg.bootstrap == "k1:9092,k2:9093"
    assert cfg.max_attempts == 7
    assert cfg.client_options()["bootstrap_servers"] == ["k1:9092", "k2:9093"]


def test_kafka_client_options_carry_sasl_and_tls_settings_only_for_their_protocols() -> None:
    plain = KafkaConfig(bootstrap="k:9092").client_options()
    assert not {k for k in plain if k.startswith(("ssl_", "sasl_"))}
    scram = KafkaConfig(
        bootstrap="k:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password="pw",
        ssl_check_hostname=False,
    ).client_options()
    assert {k: v for k, v in scram.items() if k.startswith(("ssl_", "sasl_"))} == {
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "pw",
        "ssl_check_hostname": False,
    }


def test_yaml_section_then_env_then_overrides(tmp_path, monkeypatch):
    f = tmp_path / "flywheel.yaml"
    f.write_text("topics:\n  partitions: 6\n  feedback: my.feedback\n")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(f))
    monkeypatch.setenv("FLYWHEEL_TOPICS_PARTITIONS", "8")
    cfg = load_section(TopicsConfig, "topics", retention_ms=1000)
    assert (cfg.partitions, cfg.feedback, cfg.retention_ms) == (8, "my.feedback", 1000)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (KafkaConfig, {"bootstrap": "no-port"}, "KafkaConfig.bootstrap = 'no-port': use host:port"),
        (KafkaConfig, {"max_attempts": 0}, "KafkaConfig.max_attempts = 0: use 1 or more"),
        (KafkaConfig, {"security_protocol": "TLS"}, "use one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
        (KafkaConfig, {"security_protocol": "SASL_SSL"}, "set FLYWHEEL_KAFKA_SASL_MECHANISM"),
        (
            KafkaConfig,
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"},
            "KafkaConfig.sasl_mechanism = 'GSSAPI': use one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        (
            KafkaConfig,
            {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_password": "pw"},
            "KafkaConfig.sasl_username = '': PLAIN needs the user name and password",
        ),
        (
            KafkaConfig,
            {"ssl_certfile": "/etc/kafka/client.crt"},
            "KafkaConfig.ssl_certfile = '/etc/kafka/client.crt': security_protocol is PLAINTEXT, which does not use TLS",
        ),
        (
            KafkaConfig,
            {"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.crt"},
            "KafkaConfig.ssl_cafile = '/nonexistent/ca.crt': no readable file there",
        ),
        (TopicsConfig, {"partitions": 0}, "TopicsConfig.partitions = 0: use 1 or more"),
        (TopicsConfig, {"feedback": "bad topic!"}, "topic names use letters"),
        (TopicsConfig, {"dlq": "flywheel.feedback"}, "every topic needs its own name"),
    ],
)
def test_validation_names_the_field_and_the_fix(cls, kwargs, message):
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    assert message in str(e.value)


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_KAFKA_MAX_ATTEMPTS", "many")
    with pytest.raises(
        ConfigError, match=r"FLYWHEEL_KAFKA_MAX_ATTEMPTS \(KafkaConfig.max_attempts\) = 'many': expected int"
    ):
        load(KafkaConfig)


def test_unknown_yaml_key_is_an_error_not_ignored():
    with pytest.raises(ConfigError, match="unknown key 'partitons'.*known: .*partitions"):
        load(TopicsConfig, {"partitons": 3})


def test_missing_config_file_says_what_to_fix(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_CONFIG", "/nonexistent/flywheel.yaml")
    with pytest.raises(ConfigError, match="does not exist: fix FLYWHEEL_CONFIG"):
        load_section(TopicsConfig, "topics")


def test_a_bundle_reads_each_section_and_the_environment(tmp_path, monkeypatch):
    @dataclasses.dataclass
    class Bundle:
        kafka: KafkaConfig = section(KafkaConfig, "kafka")
        topics: TopicsConfig = section(TopicsConfig, "topics")

    f = tmp_path / "flywheel.yaml"
    f.write_text("kafka:\n  max_attempts: 9\ntopics:\n  partitions: 2\n")
    monkeypatch.setenv("FLYWHEEL_TOPICS_DLQ", "my.dlq")
    b = load_bundle(Bundle, f)
    assert (b.kafka.max_attempts, b.topics.partitions, b.topics.dlq) == (9, 2, "my.dlq")
    assert Bundle().kafka.max_attempts == 5


# ---------------------------------------------------------------- environment variable names
def test_every_setting_is_named_by_the_rule_and_names_are_unique() -> None:
    names: dict[str, str] = {}
    for _, cls in config_classes():
        for field, var in env_vars(cls).items():
            where = f"{cls.__name__}.{field}"
            assert var.name == env_name(cls.SECTION, field) == f"FLYWHEEL_{cls.SECTION}_{field}".upper()
            for name in filter(None, (var.name, var.deprecated_alias)):
                assert name not in names, f"{name} is used by {names[name]} and {where}"
                names[name] = where


def test_bundles_read_each_class_from_its_own_section() -> None:
    # The YAML section and the variables' prefix must agree, or a setting would have two homes.
    for bundle in (PolicyServiceConfig, RewardServiceConfig):
        for f in dataclasses.fields(bundle):
            assert f.metadata["section"] == f.default_factory().SECTION, (bundle.__name__, f.name)


def test_the_new_name_wins_over_a_deprecated_alias_that_still_works(monkeypatch) -> None:
    monkeypatch.setenv("FLYWHEEL_TOPIC_PARTITIONS", "4")  # the name before the rule
    assert load(TopicsConfig).partitions == 4
    monkeypatch.setenv("FLYWHEEL_TOPICS_PARTITIONS", "6")
    assert load(TopicsConfig).partitions == 6


def test_a_deprecated_alias_names_itself_in_errors(monkeypatch) -> None:
    monkeypatch.setenv("FLYWHEEL_TOPIC_PARTITIONS", "lots")
    with pytest.raises(ConfigError, match=r"FLYWHEEL_TOPIC_PARTITIONS \(TopicsConfig.partitions\) = 'lots'"):
        load(TopicsConfig)


def test_a_literal_field_accepts_only_its_choices(monkeypatch) -> None:
    @dataclasses.dataclass
    class Choice:
        SECTION: ClassVar[str] = "choice"
        mode: Literal["a", "b"] = setting("a", "A or b.")

    monkeypatch.setenv("FLYWHEEL_CHOICE_MODE", "b")
    assert load(Choice).mode == "b"
    monkeypatch.setenv("FLYWHEEL_CHOICE_MODE", "c")
    with pytest.raises(ConfigError, match="FLYWHEEL_CHOICE_MODE .* = 'c': use one of a, b"):
        load(Choice)


def test_every_flywheel_variable_the_code_names_is_documented() -> None:
    """A FLYWHEEL_* name in the package or tools is a setting, a deprecated alias or an OTHER_VARIABLES entry."""
    documented = set(OTHER_VARIABLES)
    for _, cls in config_classes():
        for var in env_vars(cls).values():
            documented |= {var.name, var.deprecated_alias or var.name}
    prefixes = tuple(name.rstrip("*") for name in OTHER_VARIABLES if name.endswith("*"))
    sources = [*(ROOT / "services" / "flywheel").rglob("*.py"), *(ROOT / "tools").rglob("*.py")]
    unknown = set()
    for path in sources:
        if "v1" in path.parts:
            continue
        for name in re.findall(r"FLYWHEEL_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_]*\*)", path.read_text()):
            if name not in documented and not name.startswith(prefixes):
                unknown.add(f"{path.relative_to(ROOT)}: {name}")
    assert not unknown, f"undocumented variables (make them config fields or OTHER_VARIABLES): {sorted(unknown)}"
