"""Config loading and the precision of its error messages."""

import dataclasses

import pytest

from flywheel.core.config import (
    ConfigError,
    KafkaConfig,
    TopicsConfig,
    field_help,
    load,
    load_bundle,
    load_section,
    section,
)


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


def test_yaml_section_then_env_then_overrides(tmp_path, monkeypatch):
    f = tmp_path / "flywheel.yaml"
    f.write_text("topics:\n  partitions: 6\n  feedback: my.feedback\n")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(f))
    monkeypatch.setenv("FLYWHEEL_TOPIC_PARTITIONS", "8")
    cfg = load_section(TopicsConfig, "topics", retention_ms=1000)
    assert (cfg.partitions, cfg.feedback, cfg.retention_ms) == (8, "my.feedback", 1000)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (KafkaConfig, {"bootstrap": "no-port"}, "KafkaConfig.bootstrap = 'no-port': use host:port"),
        (KafkaConfig, {"max_attempts": 0}, "KafkaConfig.max_attempts = 0: use 1 or more"),
        (KafkaConfig, {"security_protocol": "TLS"}, "use one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
        (KafkaConfig, {"security_protocol": "SASL_SSL"}, "set FLYWHEEL_KAFKA_SASL_MECHANISM"),
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
    monkeypatch.setenv("FLYWHEEL_TOPIC_DLQ", "my.dlq")
    b = load_bundle(Bundle, f)
    assert (b.kafka.max_attempts, b.topics.partitions, b.topics.dlq) == (9, 2, "my.dlq")
    assert Bundle().kafka.max_attempts == 5
