"""Logging: JSON lines with bound context, level filtering, stdlib routing, and secrets never written."""

from __future__ import annotations

import copy
import datetime as dt
import io
import logging
from collections.abc import Iterator

import orjson
import pytest
import structlog
from pydantic import SecretStr

from detector.service.logging import bind_record, configure_logging, record_context, redact, unbind_record

TOKEN = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"

ASSUME_ROLE = {
    "eventVersion": "1.08",
    "userIdentity": {"type": "AWSService", "invokedBy": "ec2.amazonaws.com"},
    "eventTime": "2023-07-10T11:45:00Z",
    "eventSource": "sts.amazonaws.com",
    "eventName": "AssumeRole",
    "requestParameters": {"roleArn": "arn:aws:iam::218007301253:role/web", "roleSessionName": "i-0abc"},
    "responseElements": {
        "credentials": {
            "accessKeyId": "ASIAEXAMPLEKEYID0001",
            "sessionToken": TOKEN,
            "secretAccessKey": SECRET,
            "expiration": "Jul 10, 2023, 6:00:00 PM",
        },
        "assumedRoleUser": {"arn": "arn:aws:sts::218007301253:assumed-role/web/i-0abc"},
    },
}


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_with_bound_record_position() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log = structlog.get_logger("detector.test")
    with record_context("cloudtrail", 3, 1042):
        log.info("record decoded", records=2)
    log.info("outside")
    first, second = lines(out)
    assert first["event"] == "record decoded" and first["records"] == 2 and first["level"] == "info"
    assert (first["topic"], first["partition"], first["offset"]) == ("cloudtrail", 3, 1042)
    stamp = dt.datetime.fromisoformat(first["timestamp"])
    assert first["timestamp"].endswith("Z") and stamp.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - stamp).total_seconds()) < 60
    assert "topic" not in second and "offset" not in second


def test_bind_and_unbind_record() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    bind_record("ct", 0, 7)
    structlog.get_logger().info("a")
    unbind_record()
    structlog.get_logger().info("b")
    a, b = lines(out)
    assert a["offset"] == 7 and "offset" not in b


@pytest.mark.parametrize(("level", "emitted"), [("debug", ["d", "i", "w", "e"]), ("info", ["i", "w", "e"]), ("error", ["e"])])
def test_level_filtering(level: str, emitted: list[str]) -> None:
    out = io.StringIO()
    configure_logging(level, "json", stream=out)
    log = structlog.get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [line["event"] for line in lines(out)] == emitted


def test_assume_role_credentials_are_redacted_and_the_record_is_untouched() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    original = copy.deepcopy(ASSUME_ROLE)
    structlog.get_logger().warning("suspicious", record=ASSUME_ROLE, batch=[{"detail": ASSUME_ROLE}])
    text = out.getvalue()
    assert TOKEN not in text and SECRET not in text
    (line,) = lines(out)
    assert line["record"]["responseElements"]["credentials"] == "***"
    assert line["batch"][0]["detail"]["responseElements"]["credentials"] == "***"
    assert line["record"]["eventName"] == "AssumeRole"
    assert line["record"]["responseElements"]["assumedRoleUser"]["arn"].endswith("/i-0abc")
    assert ASSUME_ROLE == original  # the detector's copy of the record is not modified


def test_redaction_matches_keys_case_insensitively_at_any_depth() -> None:
    event = {
        "SessionToken": TOKEN,
        "nested": {"deeper": [{"SECRETACCESSKEY": SECRET}, ({"x-amz-security-token": TOKEN},)]},
        "sasl_password": "hunter2",
        "client_secret": "s",
        "Authorization": "AWS4-HMAC-SHA256 Credential=...",
        "settings": SecretStr("pw"),
        "accessKeyId": "ASIAEXAMPLEKEYID0001",
        "token": None,
    }
    redacted = redact(event)
    assert redacted["SessionToken"] == "***" and redacted["sasl_password"] == "***" and redacted["client_secret"] == "***"
    assert redacted["nested"]["deeper"][0]["SECRETACCESSKEY"] == "***"
    assert redacted["nested"]["deeper"][1][0]["x-amz-security-token"] == "***"
    assert redacted["Authorization"] == "***" and redacted["settings"] == "***"
    assert redacted["accessKeyId"] == "ASIAEXAMPLEKEYID0001" and redacted["token"] is None
    assert event["SessionToken"] == TOKEN


def test_console_renderer_also_redacts() -> None:
    out = TTY()
    configure_logging("info", "auto", stream=out)
    structlog.get_logger().info("hello", record=ASSUME_ROLE, sessionToken=TOKEN)
    text = out.getvalue()
    assert "hello" in text and TOKEN not in text and SECRET not in text
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text.splitlines()[0])


def test_auto_is_json_when_not_a_tty_and_console_can_be_forced() -> None:
    out = io.StringIO()
    configure_logging("info", "auto", stream=out)
    structlog.get_logger().info("machine")
    assert lines(out)[0]["event"] == "machine"
    out = io.StringIO()
    configure_logging("info", "console", stream=out)
    structlog.get_logger().info("human")
    assert "human" in out.getvalue() and not out.getvalue().startswith("{")


def test_stdlib_records_go_through_the_same_renderer_at_warning() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    kafka = logging.getLogger("aiokafka.conn")
    with record_context("cloudtrail", 1, 5):
        kafka.info("connected")  # below WARNING: dropped even at debug
        kafka.warning("broker %s down", "b-1", extra={"sasl_plain_password": "hunter2"})
    logging.getLogger("aiohttp.access").error("bad")
    warn, err = lines(out)
    assert warn["event"] == "broker b-1 down" and warn["level"] == "warning" and warn["logger"] == "aiokafka.conn"
    assert warn["sasl_plain_password"] == "***" and (warn["topic"], warn["offset"]) == ("cloudtrail", 5)
    assert warn["timestamp"].endswith("Z")
    assert err["logger"] == "aiohttp.access" and err["level"] == "error"
    assert "hunter2" not in out.getvalue()


def test_reconfiguring_replaces_the_handler_and_exceptions_are_logged() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", stream=first)
    configure_logging("info", "json", stream=second)
    logging.getLogger("aiokafka").warning("once")
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        structlog.get_logger().exception("failed")
    assert first.getvalue() == ""
    once, failed = lines(second)
    assert once["event"] == "once"
    assert failed["level"] == "error" and "RuntimeError: kaput" in failed["exception"]


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log_level"):
        configure_logging("verbose", "json", stream=io.StringIO())
    with pytest.raises(ValueError, match="log_format"):
        configure_logging("info", "xml", stream=io.StringIO())
