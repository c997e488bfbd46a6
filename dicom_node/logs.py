"""Structured logging, set up in one place; job and study context travel in context variables.

Patient data stays out of the logs by default: studies are named by :func:`study_key`, a short
digest of the Study Instance UID, unless ``logging.include_patient_data`` is on. Tracebacks keep
their frames but not the exceptions' messages, which may quote a spool path (UIDs) or a header
value (a birth date); pydicom, which warns with the value it could not read, is heard only at
``DEBUG``.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dicom_node.config import LoggingSettings

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("log_context", default={})  # noqa: B039 - never mutated, only replaced
_include_identifiers = False


def identifiers_allowed() -> bool:
    """Whether messages may quote patient data (``logging.include_patient_data``): free text
    such as a Series Description, which the de-identification profiles remove (PS3.15 E.1-1)."""
    return _include_identifiers


def study_key(study_uid: str) -> str:
    """How logs name a study: the UID itself when identifiers are allowed, else a short digest."""
    if _include_identifiers:
        return study_uid
    return "s-" + hashlib.sha256(study_uid.encode()).hexdigest()[:12]


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields (``job=12``, ``study=...``) to every record logged inside the block."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def _exception_text(formatter: logging.Formatter, exc_info: Any) -> str:
    """A traceback; without its exceptions' messages unless identifiers may be logged."""
    if _include_identifiers:
        return formatter.formatException(exc_info)
    chain: list[BaseException] = []
    exc: BaseException | None = exc_info[1]
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    parts = []
    for exc in reversed(chain):
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(exc.__traceback__))
        parts.append(f"{type(exc).__module__}.{type(exc).__qualname__} (message not logged)\n")
    return "".join(parts).rstrip("\n")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_context.get())
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["exc"] = _exception_text(self, record.exc_info)
        return json.dumps(out, default=str)


class _ConsoleFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return _exception_text(logging.Formatter(), ei)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ctx = {**_context.get(), **(getattr(record, "fields", None) or {})}
        if ctx:
            text += " " + " ".join(f"{k}={v}" for k, v in ctx.items())
        return text


def setup_logging(settings: LoggingSettings) -> None:
    """Install the one handler (stderr) on the root logger, replacing any earlier one."""
    global _include_identifiers  # noqa: PLW0603 - set once at start, read by study_key
    _include_identifiers = settings.include_patient_data
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if settings.format == "json" else _ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    # pynetdicom logs every PDU at DEBUG, association chatter at INFO, and every reset or
    # stalled peer at ERROR with a traceback. The node logs what matters of those itself
    # (refusals, security events, failed deliveries, with context), so pynetdicom speaks only
    # when we debug.
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if settings.level == "DEBUG" else logging.CRITICAL
    )
    # pydicom warns with the value it could not read (a UID, a date), and highdicom logs at
    # INFO the SOP Instance UID of each image it copies patient attributes from: only when
    # debugging
    for chatty in ("pydicom", "highdicom"):
        logging.getLogger(chatty).setLevel(
            logging.DEBUG if settings.level == "DEBUG" else logging.CRITICAL
        )
