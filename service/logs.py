"""Structured logging for the service: every record carries the id of the request being served.

The id lives in a context variable set by the request middleware, so it follows the request into
dependencies, the batcher and exception handlers. ``MT_LOG_JSON`` gives one JSON object per line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

OUR_LOGGERS = ("service", "export", "model")
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


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
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "info", as_json: bool = False) -> None:
    """Route our loggers and uvicorn's to stderr with the request id; third-party libraries stay at WARNING."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(PLAIN_FORMAT, "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in (*OUR_LOGGERS, "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level.upper())
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # the middleware logs each request itself
