"""Structured logging of the service: JSON lines (orjson) or the console renderer, secrets always redacted.

``configure_logging(settings.log_level, settings.log_format)`` once at start-up, then
``log = structlog.get_logger()`` anywhere. Records of the standard library (aiokafka, aiohttp, ...) go
through the same redaction and renderer, at WARNING and above. ``record_context(topic, partition,
offset)`` binds where the current input record came from to every line logged inside it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

import orjson
import structlog
from pydantic import SecretBytes, SecretStr
from structlog.typing import EventDict, Processor, WrappedLogger

MASK = "***"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
STDLIB_LOGGERS = ("aiokafka", "aiohttp", "asyncio", "botocore", "aiobotocore")
_MAX_DEPTH = 32

# Matched case-insensitively, anywhere in a key: sessionToken, secretAccessKey, sasl_password, credentials,
# x-amz-security-token, Authorization, client_secret ...
SECRET_KEY_RE = re.compile(r"token|secret|password|passwd|credentials|authorization", re.IGNORECASE)


def is_secret_key(key: object) -> bool:
    return isinstance(key, str) and SECRET_KEY_RE.search(key) is not None


def redact(value: Any, _depth: int = 0) -> Any:
    """A copy of ``value`` with every secret-named key's value (in nested dicts/lists) replaced by ``***``.

    The input is never modified: a logged CloudTrail record stays intact for the detector.
    """
    if isinstance(value, (SecretStr, SecretBytes)):
        return MASK
    if _depth >= _MAX_DEPTH:
        return "<nested too deep>" if isinstance(value, (Mapping, list, tuple, set, frozenset)) else value
    if isinstance(value, Mapping):
        return {k: (MASK if is_secret_key(k) and v is not None else redact(v, _depth + 1)) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(redact(v, _depth + 1) for v in value)
    if isinstance(value, (list, set, frozenset)):
        return [redact(v, _depth + 1) for v in value]
    return value


def redact_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: :func:`redact` over the whole event dict (``exc_info`` is left to the renderer)."""
    return {
        k: v if k == "exc_info" else (MASK if is_secret_key(k) and v is not None else redact(v, 1))
        for k, v in event_dict.items()
    }


def _orjson_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()


def _use_console(fmt: str, stream: TextIO) -> bool:
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    if fmt in ("json", "console"):
        return fmt == "console"
    raise ValueError(f"log_format must be auto, json or console, not {fmt!r}")


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Our root handler, told apart from others (pytest's, say) when configure_logging runs again."""


_stream: TextIO = sys.stdout


def log_stream() -> TextIO:
    """Where the last :func:`configure_logging` sends log lines (a child process can log there too)."""
    return _stream


def configure_logging(level: str = "info", fmt: str = "auto", *, stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library to write to ``stream`` (default: standard output).

    ``level``: debug, info, warning or error. ``fmt``: json, console, or auto (console when ``stream`` is
    a TTY, else json). May be called again (tests); the previous configuration is replaced.
    """
    try:
        levelno = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log_level must be one of {', '.join(LEVELS)}, not {level!r}") from None
    global _stream
    out = _stream = stream if stream is not None else sys.stdout
    console = _use_console(fmt, out)
    renderer: Processor
    if console:
        isatty = getattr(out, "isatty", None)
        renderer = structlog.dev.ConsoleRenderer(colors=bool(isatty and isatty()))
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tail: list[Processor] = [structlog.processors.StackInfoRenderer()]
    if not console:
        tail.append(structlog.processors.format_exc_info)  # the console renderer formats exceptions itself
    tail += [redact_secrets, renderer]

    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        context_class=dict,
        cache_logger_on_first_use=False,  # module-level loggers follow a later configure_logging()
    )

    handler = _Handler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    stdlib_level = max(levelno, logging.WARNING)
    root.setLevel(stdlib_level)
    for name in STDLIB_LOGGERS:
        logging.getLogger(name).setLevel(stdlib_level)
    logging.captureWarnings(True)


@contextmanager
def record_context(topic: str, partition: int, offset: int | None = None) -> Iterator[None]:
    """Bind ``topic``, ``partition`` and ``offset`` to every log line inside the block (contextvars)."""
    with structlog.contextvars.bound_contextvars(topic=topic, partition=partition, offset=offset):
        yield


def bind_record(topic: str, partition: int, offset: int | None = None) -> None:
    """Bind the current record's position until :func:`unbind_record` (for loops that cannot use ``with``)."""
    structlog.contextvars.bind_contextvars(topic=topic, partition=partition, offset=offset)


def unbind_record() -> None:
    structlog.contextvars.unbind_contextvars("topic", "partition", "offset")
