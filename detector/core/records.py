"""Decoding of the three input shapes (SPEC §2) into CloudTrail records.

One Kafka message value, or one line / file given to replay, is one *input*. Decoding never raises: it
returns the CloudTrail records found, how many inner elements were malformed and why, and whether the
input was an EventBridge event of another detail-type (skipped, not an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

CLOUDTRAIL_DETAIL_TYPES = frozenset(
    {
        "AWS API Call via CloudTrail",
        "AWS Console Sign In via CloudTrail",
        "AWS Service Event via CloudTrail",
    }
)

# Reasons, used as the `reason` label of detector_events_malformed_total and in dead-letter headers.
INVALID_JSON = "invalid_json"
UNKNOWN_SHAPE = "unknown_shape"
BAD_DETAIL = "bad_detail"
BAD_RECORDS = "bad_records"
BAD_RECORD = "bad_record"
BAD_FIELD = "bad_field"  # an instance-credential record lacking a field the decision needs


@dataclass(slots=True)
class Decoded:
    records: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # one reason per malformed element
    skipped: bool = False  # an EventBridge event that does not carry CloudTrail

    @property
    def error(self) -> str | None:
        return self.malformed[0] if self.malformed else None


def is_cloudtrail_record(value: Any) -> bool:
    return isinstance(value, dict) and "eventVersion" in value and isinstance(value.get("userIdentity"), dict)


def classify(value: Any) -> Decoded:
    """Split an already-parsed JSON value into CloudTrail records (SPEC §2)."""
    out = Decoded()
    if not isinstance(value, dict):
        out.malformed.append(UNKNOWN_SHAPE)
        return out
    if "detail-type" in value and "detail" in value:
        if not isinstance(value["detail-type"], str):  # not an EventBridge event (and unhashable, maybe)
            out.malformed.append(UNKNOWN_SHAPE)
        elif value["detail-type"] not in CLOUDTRAIL_DETAIL_TYPES:
            out.skipped = True
        elif is_cloudtrail_record(value["detail"]):
            out.records.append(value["detail"])
        else:
            out.malformed.append(BAD_DETAIL)
        return out
    if "eventVersion" in value and "userIdentity" in value:
        if is_cloudtrail_record(value):
            out.records.append(value)
        else:
            out.malformed.append(BAD_RECORD)
        return out
    if "Records" in value:
        records = value["Records"]
        if not isinstance(records, list):
            out.malformed.append(BAD_RECORDS)
            return out
        for element in records:
            if is_cloudtrail_record(element):
                out.records.append(element)
            else:
                out.malformed.append(BAD_RECORD)
        return out
    out.malformed.append(UNKNOWN_SHAPE)
    return out


def decode(raw: bytes | bytearray | memoryview | str) -> Decoded:
    """Parse one input (bytes of JSON) and classify it. Never raises."""
    try:
        value = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError, RecursionError):
        out = Decoded()
        out.malformed.append(INVALID_JSON)
        return out
    return classify(value)
