"""core/logs.py in this process: the JSON fields, the levels of our loggers and the libraries',
libraries with a stderr handler of their own, warnings, precise config errors."""

from __future__ import annotations

import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator

import pytest
from opentelemetry import trace

from flywheel.core import logs
from flywheel.core.config import ConfigError


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("FLYWHEEL_LOG_FORMAT", "FLYWHEEL_LOG_LEVELS", "FLYWHEEL_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    root = logging.getLogger()
    level, hooks = root.level, (sys.excepthook, threading.excepthook)
    yield
    for h in [h for h in root.handlers if isinstance(h, logs._Handler)]:
        root.removeHandler(h)
    for name in [*logs._installed, "somelib"]:
        logging.getLogger(name).setLevel(logging.NOTSET)
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks
    logging.captureWarnings(False)
    logs.set_context(None)


def lines(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_json_lines_carry_service_version_trace_exception_and_extra(monkeypatch, capsys) -> None:
    monkeypatch.setenv("FLYWHEEL_LOG_FORMAT", "json")
    logs.configure_logging("reward", "info")
    logs.set_context(lambda: {"version": 7})
    log = logging.getLogger("flywheel.test")
    log.info("plain %s", "line", extra={"pairs": 3})
    ctx = trace.SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=trace.TraceFlags(1))
    with trace.use_span(trace.NonRecordingSpan(ctx)):
        log.warning("in a span")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    plain, in_span, failed = lines(capsys.readouterr().err)
    assert plain["service"] == "reward" and plain["logger"] == "flywheel.test" and plain["level"] == "INFO"
    assert plain["message"] == "plain line" and plain["version"] == 7 and plain["pairs"] == 3
    assert plain["time"].endswith("Z") and "trace_id" not in plain
    assert in_span["trace_id"] == f"{0xABC:032x}" and in_span["span_id"] == f"{0xDEF:016x}"
    assert failed["exception_type"] == "ValueError" and "ValueError: boom" in failed["exception"]
    assert failed["exception"].startswith("Traceback")


def test_libraries_log_at_warning_unless_asked(monkeypatch, capsys) -> None:
    logs.configure_logging("feedback", "INFO")
    logging.getLogger("kafka.conn").info("connecting to broker")
    logging.getLogger("urllib3.connectionpool").debug("GET /")
    logging.getLogger("kafka.conn").warning("broker went away")
    logging.getLogger("flywheel.bus").debug("not at INFO")
    logging.getLogger("flywheel.bus").info("ours at INFO")
    err = capsys.readouterr().err
    assert "connecting" not in err and "GET /" not in err and "not at INFO" not in err
    assert "WARNING feedback kafka.conn: broker went away" in err and "INFO feedback flywheel.bus: ours at INFO" in err

    monkeypatch.setenv("FLYWHEEL_LOG_LEVELS", "kafka=info,flywheel.bus=DEBUG")
    logs.configure_logging("feedback", "INFO")  # again: replaces the first set-up
    logging.getLogger("kafka.conn").info("connecting to broker")
    logging.getLogger("flywheel.bus").debug("now at DEBUG")
    err = capsys.readouterr().err
    assert err.count("connecting to broker") == 1 and "now at DEBUG" in err
    assert len([h for h in logging.getLogger().handlers if isinstance(h, logs._Handler)]) == 1


def test_a_library_with_its_own_stderr_handler_goes_through_ours(monkeypatch, capsys) -> None:
    monkeypatch.setenv("FLYWHEEL_LOG_FORMAT", "json")
    logs.configure_logging("policy")
    lib = logging.getLogger("somelib")  # as transformers does: a handler of its own, no propagation
    lib.addHandler(logging.StreamHandler(sys.stderr))
    lib.propagate = False
    logging.getLogger("flywheel.x").info("any record of ours takes it over")
    lib.warning("from the library")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    got = lines(capsys.readouterr().err)
    assert [d["logger"] for d in got] == ["flywheel.x", "somelib", "py.warnings"]
    assert "deprecated thing" in got[2]["message"] and lib.propagate and not lib.handlers


def test_a_broken_context_hook_does_not_lose_the_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("FLYWHEEL_LOG_FORMAT", "json")
    logs.configure_logging("trainer")
    logs.set_context(lambda: {"version": 1 // 0})
    logging.getLogger("flywheel.t").info("still here")
    (line,) = lines(capsys.readouterr().err)
    assert line["message"] == "still here" and "ZeroDivisionError" in line["context_error"]


def test_wrong_settings_are_named(monkeypatch) -> None:
    monkeypatch.setenv("FLYWHEEL_LOG_FORMAT", "yaml")
    with pytest.raises(ConfigError, match="FLYWHEEL_LOG_FORMAT .*'yaml': use one of text, json"):
        logs.configure_logging("feedback")
    monkeypatch.setenv("FLYWHEEL_LOG_FORMAT", "json")
    monkeypatch.setenv("FLYWHEEL_LOG_LEVELS", "kafka=LOUD")
    with pytest.raises(ConfigError, match="LogConfig.levels = 'kafka=LOUD': use one of DEBUG, .* for logger 'kafka'"):
        logs.configure_logging("feedback")
    monkeypatch.delenv("FLYWHEEL_LOG_LEVELS")
    with pytest.raises(ConfigError, match="log level 'chatty' .*FLYWHEEL_LOG_LEVEL"):
        logs.configure_logging("feedback", "chatty")
