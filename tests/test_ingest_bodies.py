"""The pure part of `detector ingest`: message bodies, log-file splitting, partition keys."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from detector.ingest.bodies import (
    BAD_GZIP,
    INVALID_JSON,
    NOT_CLOUDTRAIL,
    UNKNOWN_SHAPE,
    BodyError,
    ObjectSplitter,
    S3Object,
    event_key,
    parse_body,
    raw_record_key,
    record_key,
)

I1, I2 = "i-0123456789abcdef0", "i-0fedcba987654321f"


def record(n: int = 0, **extra: Any) -> dict[str, Any]:
    base = {
        "eventVersion": "1.08",
        "eventID": f"id-{n}",
        "eventTime": "2026-11-30T12:00:00Z",
        "eventName": "DescribeInstances",
        "userIdentity": {"type": "AssumedRole", "arn": f"arn:aws:sts::111122223333:assumed-role/web/{I1}"},
        "requestParameters": {"filterSet": {"items": [{"name": "a"}, {"name": "b"}]}, "note": 'quote " and },{"'},
    }
    return base | extra


def s3_notification(*keys: str, bucket: str = "trail-bucket", event: str = "ObjectCreated:Put") -> dict[str, Any]:
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "eventName": event,
                "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 123}},
            }
            for key in keys
        ]
    }


def sns(message: dict[str, Any]) -> str:
    return json.dumps({"Type": "Notification", "MessageId": "m", "TopicArn": "arn:aws:sns:us-east-1:1:t", "Message": json.dumps(message)})


def eventbridge(detail: dict[str, Any], detail_type: str = "AWS API Call via CloudTrail", **extra: Any) -> dict[str, Any]:
    return {"version": "0", "id": "e", "detail-type": detail_type, "source": "aws.ec2", "detail": detail} | extra


# --- bodies --------------------------------------------------------------------------------------


def test_eventbridge_event_is_produced_as_is_keyed_by_instance() -> None:
    text = json.dumps(eventbridge(record()), indent=2)
    body = parse_body(text)
    assert body.event == text.encode() and body.key == I1 and not body.objects and body.ignored is None


def test_eventbridge_inside_sns_is_the_message_itself() -> None:
    event = eventbridge(record())
    body = parse_body(sns(event))
    assert orjson.loads(body.event or b"") == event and body.key == I1


def test_s3_notification_plain_and_in_sns_with_url_encoded_keys() -> None:
    note = s3_notification("AWSLogs/1/CloudTrail/us-east-1/2026/11/30/a+b%3Dc.json.gz", "k2.json.gz")
    expected = (
        S3Object("trail-bucket", "AWSLogs/1/CloudTrail/us-east-1/2026/11/30/a b=c.json.gz", 123),
        S3Object("trail-bucket", "k2.json.gz", 123),
    )
    assert parse_body(json.dumps(note)).objects == expected
    assert parse_body(sns(note)).objects == expected


def test_cloudtrail_sns_notification_and_s3_eventbridge_object_created() -> None:
    body = parse_body(sns({"s3Bucket": "b", "s3ObjectKey": ["AWSLogs/1/CloudTrail/x.json.gz", "y.json.gz"]}))
    assert body.objects == (S3Object("b", "AWSLogs/1/CloudTrail/x.json.gz"), S3Object("b", "y.json.gz"))
    created = {"detail-type": "Object Created", "source": "aws.s3", "detail": {"bucket": {"name": "b"}, "object": {"key": "a b.json.gz", "size": 5}}}
    assert parse_body(json.dumps(created)).objects == (S3Object("b", "a b.json.gz", 5),)


def test_test_events_removals_and_digest_files_are_ignored() -> None:
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-11-30T12:00:00Z", "Bucket": "b"}
    assert parse_body(json.dumps(test_event)).ignored == "s3:TestEvent"
    assert parse_body(sns(test_event)).ignored == "s3:TestEvent"
    assert parse_body(json.dumps(s3_notification("k.json.gz", event="ObjectRemoved:Delete"))).ignored
    digest = "AWSLogs/1/CloudTrail-Digest/us-east-1/2026/11/30/d.json.gz"
    assert parse_body(json.dumps(s3_notification(digest))).ignored == "digest files only"
    assert parse_body(json.dumps(s3_notification(digest, "AWSLogs/1/CloudTrail/x.json.gz"))).objects == (
        S3Object("trail-bucket", "AWSLogs/1/CloudTrail/x.json.gz", 123),
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", INVALID_JSON),
        ("", INVALID_JSON),
        (json.dumps({"Type": "Notification", "Message": "not json"}), INVALID_JSON),
        ("[1, 2]", UNKNOWN_SHAPE),
        ('{"hello": "world"}', UNKNOWN_SHAPE),
        ('{"Records": []}', UNKNOWN_SHAPE),
        (json.dumps({"Records": [record()]}), UNKNOWN_SHAPE),  # a log file is not a notification
        (json.dumps({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {"bucket": {}}}]}), UNKNOWN_SHAPE),
        (json.dumps({"s3Bucket": "b", "s3ObjectKey": "not-a-list"}), UNKNOWN_SHAPE),
        (json.dumps({"detail-type": "Object Created", "source": "aws.s3", "detail": {}}), UNKNOWN_SHAPE),
    ],
)
def test_bad_bodies_name_their_reason(text: str, reason: str) -> None:
    with pytest.raises(BodyError) as err:
        parse_body(text)
    assert err.value.reason == reason


# --- keys ----------------------------------------------------------------------------------------


def key(value: Any) -> str | None:
    """record_key of a value, checked to be raw_record_key of its JSON text (what ingest keys records by)."""
    found = record_key(value)
    assert raw_record_key(orjson.dumps(value)) == found
    return found


def test_record_keys_follow_spec_10() -> None:
    assert key(record()) == I1
    identity_role = {"type": "AssumedRole", "arn": f"arn:aws-us-gov:sts::111122223333:assumed-role/aws:ec2-instance/{I2}"}
    assert key(record(userIdentity=identity_role)) == I2
    infra = {"type": "AssumedRole", "arn": f"arn:aws:sts::111122223333:assumed-role/aws:ec2-infrastructure/{I2}"}
    assert key(record(userIdentity=infra)) is None
    user = {"type": "IAMUser", "arn": "arn:aws:iam::111122223333:user/alice"}
    assert key(record(userIdentity=user)) is None
    issuance = record(
        eventName="AssumeRole",
        userIdentity={"type": "AWSService", "invokedBy": "ec2.amazonaws.com"},
        requestParameters={"roleSessionName": I2, "roleArn": "arn:aws:iam::111122223333:role/web"},
    )
    assert key(issuance) == I2
    assert key(issuance | {"userIdentity": {"type": "AWSService", "invokedBy": "lambda.amazonaws.com"}}) is None
    items = {"instancesSet": {"items": [{"instanceId": I2}, {"instanceId": I1}]}}
    ec2 = {"eventSource": "ec2.amazonaws.com", "userIdentity": user}
    for name in ("StopInstances", "StartInstances", "TerminateInstances"):
        assert key(record(eventName=name, requestParameters=items, responseElements=None) | ec2) == I2
        swapped = {"instancesSet": {"items": [{"instanceId": I1}]}}
        assert key(record(eventName=name, requestParameters=items, responseElements=swapped) | ec2) == I1
        # not a lifecycle signal (SPEC §11), so nothing to key by: a failed or DryRun call, another service
        assert key(record(eventName=name, requestParameters=items, errorCode="Client.UnauthorizedOperation") | ec2) is None
        assert key(record(eventName=name, requestParameters=items | {"dryRun": True}) | ec2) is None
        assert key(record(eventName=name, requestParameters=items, userIdentity=user)) is None
    # the session's own instance comes first when an instance stops another one
    assert key(record(eventName="StopInstances", eventSource="ec2.amazonaws.com", requestParameters=items)) == I1
    evicted = record(eventName="BidEvictedEvent", userIdentity={"accountId": "1"}, serviceEventDetails={"instanceIdSet": [I2]})
    assert key(evicted) == I2
    assert key(record(eventName="AssociateAddress", requestParameters={"instanceId": I2}) | ec2) == I2
    assert key(record(eventName="AssociateAddress", requestParameters={"instanceId": "x"}) | ec2) is None
    assert key(42) is None and key({"userIdentity": "x"}) is None
    # shapes the small decode of raw_record_key does not fit: parsed whole, keyed the same way
    assert key(record(requestParameters="a string")) == I1 and key(record(userIdentity=None)) is None
    assert key(record(userIdentity={"type": "AssumedRole", "arn": 7})) is None
    assert key(record(eventName="StopInstances", requestParameters=[1]) | ec2) is None
    assert key({"detail-type": "EC2 Instance State-change Notification", "detail": {"instance-id": I2, "state": "stopped"}}) == I2
    assert key(record(eventName="AssumeRole", requestParameters={"roleSessionName": I2, "roleArn": "arn:aws:iam::111122223333:role/web"})) == I1
    assert key(["x"]) is None and key(None) is None
    with pytest.raises(BodyError) as err:
        raw_record_key(b'{"eventName": nope}')
    assert err.value.reason == NOT_CLOUDTRAIL


def test_event_keys() -> None:
    change = eventbridge({"instance-id": I2, "state": "stopped"}, "EC2 Instance State-change Notification")
    assert event_key(change) == I2
    assert event_key(eventbridge(record())) == I1
    assert event_key(eventbridge({"instance-id": I2, "state": "rebooting"}, "EC2 Instance State-change Notification")) is None
    assert event_key(eventbridge({"x": 1}, "Something Else")) is None
    assert event_key(eventbridge("not an object")) is None  # type: ignore[arg-type]


# --- splitting -----------------------------------------------------------------------------------


def split(data: bytes, chunk: int, **options: int) -> list[Any]:
    """The values of the records, checking that each is cut as its exact text, keyed as its value."""
    splitter = ObjectSplitter(max_piece=4096, **options)
    out: list[bytes] = []
    for i in range(0, len(data), chunk):
        for records in splitter.feed(data[i : i + chunk]):
            out.extend(records)
    for records in splitter.close():
        out.extend(records)
    values = [orjson.loads(raw) for raw in out]
    for raw, value in zip(out, values):
        assert type(raw) is bytes and raw == raw.strip() and raw_record_key(raw) == record_key(value)
    return values


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
@pytest.mark.parametrize("compress", [False, True])
def test_log_file_split_into_its_records_at_any_chunking(chunk: int, compress: bool) -> None:
    records: list[Any] = [record(n, amount=n + 0.5, text="é ☃ \\u0000") for n in range(40)] + [42, "x"]
    data = json.dumps({"Records": records}).encode()
    if compress:
        data = gzip.compress(data)
    assert split(data, chunk) == records


def test_pretty_printed_and_multi_member_gzip() -> None:
    records = [record(n) for n in range(5)]
    text = json.dumps({"Records": records}, indent=4).encode()
    assert split(text, 13) == records
    assert split(b'{"Records":[]}', 3) == [] and split(b' \n{ "Records" : [ 1 , {"a": "]}"} ] }\n', 2) == [1, {"a": "]}"}]
    half = len(text) // 2
    assert split(gzip.compress(text[:half]) + gzip.compress(text[half:]), 50) == records


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", NOT_CLOUDTRAIL),
        (b"x", NOT_CLOUDTRAIL),
        (b"hello, this is not json at all and it is long enough to be judged by its head", NOT_CLOUDTRAIL),
        (json.dumps({"hello": [1, 2, 3]}).encode(), NOT_CLOUDTRAIL),
        (json.dumps(record()).encode(), NOT_CLOUDTRAIL),
        (b'{"Records": [{"a": 1}, {"b": ', NOT_CLOUDTRAIL),  # truncated
        (gzip.compress(b"a plain text file, gzipped, longer than the sixty-four bytes of the head"), NOT_CLOUDTRAIL),
        (gzip.compress(json.dumps({"Records": [record()]}).encode())[:-30], BAD_GZIP),  # truncated gzip
        (b"\x1f\x8b" + b"garbage that is not deflate" * 3, BAD_GZIP),
    ],
)
def test_objects_that_are_not_log_files(data: bytes, reason: str) -> None:
    with pytest.raises(BodyError) as err:
        split(data, 10)
    assert err.value.reason == reason


def big_log_file(records: int) -> Iterator[bytes]:
    one = json.dumps(record(0, padding="p" * 2000)).encode()
    yield b'{"Records":['
    for n in range(records):
        yield (b"," if n else b"") + one
    yield b"]}"


def test_oversized_object_in_bounded_memory() -> None:
    """50 MB of log file (decompressed) through the splitter: peak memory stays a few MB."""
    compressor = __import__("zlib").compressobj(wbits=31)
    splitter = ObjectSplitter()
    count = total = 0
    tracemalloc.start()
    try:
        for part in big_log_file(25_000):
            total += len(part)
            for records in splitter.feed(compressor.compress(part)):
                count += len(records)
                assert all(raw.startswith(b'{"eventVersion": "1.08", "eventID": "id-0"') for raw in records)
        for records in splitter.feed(compressor.flush()):
            count += len(records)
        count += sum(len(records) for records in splitter.close())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 25_000 and total > 50_000_000 and splitter.bytes_out == total
    assert peak < 8_000_000, peak


def test_records_full_of_nested_arrays_of_objects_take_the_exact_scan() -> None:
    """More nested '},' than the fast guesses allow: the exact scan finds the element's end."""
    nested = {"items": [{"k": n, "s": "},{\"x\": ]"} for n in range(200)], "deep": [[[{"a": [{"b": 1}, {"c": 2}]}]]]}
    records = [record(n, responseElements=nested) for n in range(3)] + [record(9)]
    data = json.dumps({"Records": records}).encode()
    for chunk in (7, 500, len(data)):
        assert split(data, chunk) == records


@pytest.mark.parametrize(
    "data",
    [
        b'{"Records": [{"a": 1}], "other": 2}',
        b'{"Records": [{"a": 1}]} trailing',
        b'{"Records": [{"a": 1} {"b": 2}]}',
        b'{"Records": [{"a": 1},]}',
        b'{"Records": [{"a": nope}]}',
        b'{"Records": [{"a": 1}',
    ],
)
def test_malformed_log_files(data: bytes) -> None:
    with pytest.raises(BodyError) as err:
        split(data, 5)
    assert err.value.reason == NOT_CLOUDTRAIL


def test_a_record_longer_than_the_limit_is_an_error_not_a_memory_hog() -> None:
    data = json.dumps({"Records": [record(0), record(1, padding="x" * 50_000)]}).encode()
    with pytest.raises(BodyError, match="longer than"):
        split(data, 4096, max_record=20_000)
    assert len(split(data, 4096, max_record=100_000)) == 2


@pytest.mark.parametrize("chunk", [5, 333, 1 << 20])
def test_runs_cut_in_bulk_and_fake_record_starts(chunk: int) -> None:
    """Compact files are cut in runs; a nested object starting like a record (a fake boundary) or a bad
    record in a run sends that run through the element-by-element cut: same records, same errors."""
    fake = {"items": [{"eventVersion": "x"}, {"eventVersion": "y", "n": [{"eventVersion": "z"}]}]}
    records = [record(n) for n in range(30)] + [record(30, requestParameters=fake)] + [record(n) for n in range(31, 60)]
    data = orjson.dumps({"Records": records})
    assert split(data, chunk) == records
    assert split(gzip.compress(data), chunk) == records
    for bad in (b'"eventID": "id-1\xff"', b'"eventID": nope', b'"eventID": "id-1\x01"'):
        broken = data.replace(b'"eventID":"id-1"', bad)
        with pytest.raises(BodyError) as err:
            split(broken, chunk)
        assert err.value.reason == NOT_CLOUDTRAIL
