"""Structured logging for the service: every record carries the id of the request being served.

The id lives in a context variable set by the request middleware, so it follows the request into
dependencies, the batcher and exception handlers. ``MT_LOG_JSON`` gives one JSON object per line.

Client-controlled text reaches the log (a URL path with ``%0a``, a header, an exception message), so every
format escapes control characters: a record is always one line (tracebacks: their lines indented below it),
never a forged one.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

OUR_LOGGERS = ("service", "export", "model")
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# C0 and C1 controls, DEL, and the Unicode line/paragraph separators: everything a viewer may break a line at.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_BREAKING = re.compile("[\x7f-\x9f\u2028\u2029]")  # the ones json.dumps(ensure_ascii=False) leaves raw


def _escape(match: re.Match) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or f"\\u{ord(char):04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\u001b``): one line."""
    return _CONTROL.sub(_escape, text)


class PlainFormatter(logging.Formatter):
    """The plain-text format with the message escaped, and traceback lines escaped and indented."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.msg, record.args
        record.msg, record.args = escape_controls(record.getMessage()), None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = saved

    def formatException(self, ei) -> str:
        return "\n".join("    " + escape_controls(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + escape_controls(line) for line in stack_info.splitlines())


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, request id, message (and the traceback, if any)."""

    EXTRA = ("method", "path", "status", "duration_ms", "model", "sentences")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        entry.update({key: getattr(record, key) for key in self.EXTRA if hasattr(record, key)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _BREAKING.sub(_escape, json.dumps(entry, ensure_ascii=False))  # still valid JSON, same values


def configure_logging(level: str = "info", as_json: bool = False) -> None:
    """Route our loggers and uvicorn's to stderr with the request id; third-party libraries stay at WARNING."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if as_json else PlainFormatter(PLAIN_FORMAT, "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in (*OUR_LOGGERS, "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level.upper())
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # the middleware logs each request itself
