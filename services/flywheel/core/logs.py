"""Logging of every Flywheel process: one `configure_logging(service, level)` at each entry point.

Text (the default, for a terminal) or one JSON object per line (`log.format: json`,
FLYWHEEL_LOG_FORMAT=json, for a log pipeline): time, level, service, logger, message, the
model version the process serves where it says so (`set_context`), the trace and span ids of
the current OpenTelemetry span when there is one, an exception as a field, and any `extra=`
fields of the call.

Flywheel's own loggers ("flywheel.*", and a module run as `__main__`) log at `level`;
everything else (kafka-python, which logs every connection at INFO, urllib3, grpc,
aiohttp.access, transformers, filelock, ...) at WARNING, so that a service's log reads as its
own story. `log.levels` (FLYWHEEL_LOG_LEVELS=kafka=INFO,flywheel.bus=DEBUG) sets any logger's
level, "root" included. Libraries that write to stderr through a handler of their own
(transformers does) are made to go through this one, so that in JSON mode every line parses;
Python warnings and uncaught exceptions are logged too.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, ClassVar, Literal

from flywheel.core import tracing
from flywheel.core.config import ConfigError, load_section, require, setting

TEXT_FORMAT = "%(asctime)s %(levelname)s {service} %(name)s: %(message)s"  # one stream may hold two processes
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
OWN_LOGGERS = ("flywheel", "__main__")  # at the service's level; every other logger at WARNING
# LogRecord attributes that are not `extra=` fields of a call.
_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


@dataclasses.dataclass
class LogConfig:
    """How a service logs (its level: --log-level or FLYWHEEL_LOG_LEVEL, read before the config)."""

    SECTION: ClassVar[str] = "log"

    format: Literal["text", "json"] = setting(
        "text",
        "text: one readable line per event (for a terminal); json: one JSON object per line with time, level, "
        "service, logger, message, version, trace_id and span_id (for a log pipeline).",
    )
    levels: dict[str, str] = setting(
        {},
        "Levels of single loggers over the defaults (Flywheel's at the service's level, every library's at "
        "WARNING), as logger=LEVEL pairs: kafka=INFO,flywheel.bus=DEBUG; 'root' names the root logger.",
    )

    def __post_init__(self) -> None:
        n = type(self).__name__
        for name, level in self.levels.items():
            require(
                str(level).upper() in LEVELS,
                n,
                "levels",
                f"{name}={level}",
                f"use one of {', '.join(LEVELS)} for logger {name!r}",
            )


# ---------------------------------------------------------------------------- the context hook
_context: Callable[[], Mapping[str, Any]] | None = None


def set_context(fields: Callable[[], Mapping[str, Any]] | None) -> None:
    """Fields every JSON line of this process carries, read at each line (keep it cheap; it must
    not take locks the logging code may hold), e.g. `lambda: {"version": engine.version}`."""
    global _context
    _context = fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        out: dict[str, Any] = {
            "time": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if _context is not None:
            try:
                out.update({k: v for k, v in _context().items() if v is not None})
            except Exception as e:  # a log line never fails for its context
                out["context_error"] = repr(e)
        out.update(tracing.current_ids())
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            out["exception_type"] = record.exc_info[0].__name__
        if record.stack_info:
            out["stack"] = record.stack_info
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value
        return json.dumps(out, default=str, ensure_ascii=False)


class _Handler(logging.StreamHandler):
    """Our stderr handler; on a record, first takes over library handlers that appeared since."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._known = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(logging.Logger.manager.loggerDict) != self._known:
            self._known = len(logging.Logger.manager.loggerDict)
            adopt_library_handlers()
        super().emit(record)


_installed: list[str] = []  # loggers whose level configure_logging set (undone by the next call)


def configure_logging(service: str, level: str | int = "INFO", config_path: str | None = None) -> LogConfig:
    """Set up this process's logging (call again to change it); ConfigError for a wrong setting.

    `level`: Flywheel's own loggers; the `log` section of the config file (or FLYWHEEL_LOG_*
    variables) gives the format and per-logger levels.
    """
    cfg = load_section(LogConfig, path=config_path)
    name = logging.getLevelName(level) if isinstance(level, int) else str(level).upper()
    if name not in LEVELS:
        raise ConfigError(f"log level {level!r} (--log-level or FLYWHEEL_LOG_LEVEL): use one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(h)
    handler = _Handler()
    text = logging.Formatter(TEXT_FORMAT.replace("{service}", service.replace("%", "%%")))
    handler.setFormatter(JsonFormatter(service) if cfg.format == "json" else text)
    root.addHandler(handler)
    for logger in _installed:
        logging.getLogger(logger).setLevel(logging.NOTSET)
    levels = {"root": "WARNING", **dict.fromkeys(OWN_LOGGERS, name)}
    levels.update({k: v.upper() for k, v in cfg.levels.items()})
    for logger, lvl in levels.items():
        logging.getLogger(None if logger == "root" else logger).setLevel(lvl)
    _installed[:] = [k for k in levels if k != "root"]
    adopt_library_handlers()
    logging.captureWarnings(True)  # warnings.warn goes through the handler too (logger py.warnings)
    if cfg.format == "json":
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_exception
    return cfg


def adopt_library_handlers() -> None:
    """Route libraries that print through a stderr handler of their own (transformers adds one and
    stops propagation) through the root logger's handler instead."""
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger) or logger.name.startswith(OWN_LOGGERS):
            continue
        own = [
            h
            for h in logger.handlers
            if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__)
        ]
        if own:
            for h in own:
                logger.removeHandler(h)
            logger.propagate = True


def _log_uncaught(tp: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(tp, KeyboardInterrupt):
        sys.__excepthook__(tp, value, tb)
        return
    logging.getLogger("flywheel").critical("uncaught exception", exc_info=(tp, value, tb))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "?"
    exc_info = (args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)
    logging.getLogger("flywheel").error("uncaught exception in thread %s", name, exc_info=exc_info)
