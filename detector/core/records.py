"""Decoding of the three input shapes (SPEC §2) into CloudTrail records.

One Kafka message value, or one line / file given to replay, is one *input*. Decoding never raises: it
returns the CloudTrail records found, how many inner elements were malformed and why, and whether the
input was an EventBridge event of another detail-type (skipped, not an error).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson

from .prefilter import may_matter
from .state import SESSION_ARN

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

# SPEC §10/§11: EventBridge events of this detail-type are input (lifecycle signals). ``classify`` turns
# each into a *state-change record*: ``{"detail-type": STATE_CHANGE, "eventTime": <time>, "detail":
# {"instance-id": ..., "state": ...}}`` — its ``time`` as ``eventTime``, so ordering and the engine read
# it like a CloudTrail record, and nothing else of the event is kept.
STATE_CHANGE = "EC2 Instance State-change Notification"
# eventNames of CloudTrail records that may carry a lifecycle or address signal (SPEC §11, §13).
SIGNAL_NAMES = frozenset(
    {"StopInstances", "TerminateInstances", "StartInstances", "BidEvictedEvent", "AssociateAddress"}
)
# eventNames that make a record matter whoever made it: issuance (§3) and the signals above.
KEEP_NAMES = SIGNAL_NAMES | {"AssumeRole"}


@dataclass(slots=True)
class Decoded:
    records: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # one reason per malformed element
    skipped: bool = False  # an EventBridge event that does not carry CloudTrail
    ignored: int = 0  # decode_fast only: CloudTrail records left out of `records` (they cannot matter)

    @property
    def error(self) -> str | None:
        return self.malformed[0] if self.malformed else None


def is_cloudtrail_record(value: Any) -> bool:
    """A CloudTrail record: ``userIdentity`` an object, and ``eventVersion`` or (SPEC §10, a bare record)
    ``eventTime`` present."""
    return (
        isinstance(value, dict)
        and ("eventVersion" in value or "eventTime" in value)
        and isinstance(value.get("userIdentity"), dict)
    )


def is_state_change(value: Any) -> bool:
    """A state-change record made by :func:`classify` from an ``EC2 Instance State-change Notification``."""
    return isinstance(value, dict) and value.get("detail-type") == STATE_CHANGE and isinstance(value.get("detail"), dict)


def state_change_record(event: dict[str, Any]) -> dict[str, Any] | None:
    """The state-change record of an EventBridge ``EC2 Instance State-change Notification``, or None when
    it lacks a string ``time``, ``detail.instance-id`` or ``detail.state``."""
    detail = event.get("detail")
    if not isinstance(detail, dict):
        return None
    instance_id, state, time = detail.get("instance-id"), detail.get("state"), event.get("time")
    if not (isinstance(instance_id, str) and isinstance(state, str) and isinstance(time, str)):
        return None
    change = {"detail-type": STATE_CHANGE, "eventTime": time, "detail": {"instance-id": instance_id, "state": state}}
    if isinstance(event.get("id"), str):
        change["id"] = event["id"]  # EventBridge's event id: a repeated delivery is the same event
    return change


def classify(value: Any) -> Decoded:
    """Split an already-parsed JSON value into CloudTrail records (SPEC §2)."""
    out = Decoded()
    if not isinstance(value, dict):
        out.malformed.append(UNKNOWN_SHAPE)
        return out
    if "detail-type" in value and "detail" in value:
        if not isinstance(value["detail-type"], str):  # not an EventBridge event (and unhashable, maybe)
            out.malformed.append(UNKNOWN_SHAPE)
        elif value["detail-type"] == STATE_CHANGE:
            change = state_change_record(value)
            if change is None:
                out.malformed.append(BAD_DETAIL)
            else:
                out.records.append(change)
        elif value["detail-type"] not in CLOUDTRAIL_DETAIL_TYPES:
            out.skipped = True
        elif is_cloudtrail_record(value["detail"]):
            out.records.append(value["detail"])
        else:
            out.malformed.append(BAD_DETAIL)
        return out
    if ("eventVersion" in value or "eventTime" in value) and "userIdentity" in value:
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


# --- the fast path -------------------------------------------------------------------------------
#
# ``orjson.loads`` builds every string, number and object of a ~1.4 KB record as Python objects; the
# detector reads a dozen fields. msgspec decodes straight into the structs below: it validates the
# whole input (JSON grammar, escapes, control characters) but builds only the declared fields and
# skips the rest. The structs also check the shape (required fields, object types), so an input they
# accept is a CloudTrail record or an EventBridge event carrying one. Anything they do not accept —
# another shape, a malformed input, a field of an unexpected type, a non-ASCII input, nesting deeper
# than Python's recursion limit — goes to ``decode`` above, which stays the reference: every malformed
# input is still counted with the same reason.
#
# Where the two judges differ (documented in docs/performance.md): msgspec checks the UTF-8 of the
# strings it builds only, so non-ASCII inputs always take the reference path; and msgspec accepts a
# number literal too large for a double (``1e400``, valid JSON by RFC 8259's grammar) in a field it
# skips, where orjson rejects the whole input. Such an input is processed instead of dead-lettered.


class _Credentials(msgspec.Struct, gc=False, omit_defaults=True):
    accessKeyId: Any = None


class _Response(msgspec.Struct, gc=False, omit_defaults=True):
    credentials: _Credentials | None = None
    instancesSet: Any = None  # StopInstances & co. (SPEC §11): {"items": [{"instanceId": ...}]}

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)


class _Parameters(msgspec.Struct, gc=False, omit_defaults=True):
    roleArn: Any = None
    roleSessionName: Any = None
    instancesSet: Any = None  # SPEC §11
    instanceId: Any = None  # AssociateAddress (SPEC §13)
    dryRun: Any = None

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)


class _SessionContext(msgspec.Struct, gc=False, omit_defaults=True):
    ec2RoleDelivery: Any = None


class _Identity(msgspec.Struct, gc=False, omit_defaults=True):
    type: Any = None
    arn: Any = None
    invokedBy: Any = None
    accessKeyId: Any = None
    principalId: Any = None
    sessionContext: _SessionContext | None = None

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)


class FastRecord(msgspec.Struct, gc=False, omit_defaults=True):
    """The fields of a CloudTrail record the engine reads (``Engine.apply`` takes it as a record)."""

    userIdentity: _Identity  # required, an object
    # SPEC §2 recognises a record by eventVersion, §10 also by eventTime: a record with neither (both
    # left at their defaults) is left to the reference decoder (see _complete).
    eventVersion: Any = msgspec.UNSET
    eventTime: Any = None
    eventName: Any = None
    eventSource: Any = None
    awsRegion: Any = None
    sourceIPAddress: Any = None
    vpcEndpointId: Any = None
    vpcEndpointAccountId: Any = None
    eventID: Any = None
    errorCode: Any = None
    eventType: Any = None
    requestParameters: _Parameters | None = None
    responseElements: _Response | None = None
    serviceEventDetails: Any = None  # BidEvictedEvent: {"instanceIdSet": [...]}

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)  # (eventVersion may be UNSET: the engine never asks for it)


def _complete(record: FastRecord) -> bool:
    """True when the struct is surely a CloudTrail record: ``eventVersion`` present or ``eventTime`` set.
    (An explicit ``"eventTime": null`` without eventVersion is one too: the reference decoder says so.)"""
    return record.eventVersion is not msgspec.UNSET or record.eventTime is not None


class _EventBridgeInput(msgspec.Struct, gc=False, rename={"detail_type": "detail-type"}):
    detail_type: str
    detail: FastRecord


class _RecordInput(FastRecord, gc=False, rename={"detail_type": "detail-type"}):
    # Present only to notice an input that is also EventBridge-shaped (that shape takes precedence).
    detail_type: Any = msgspec.UNSET
    detail: Any = msgspec.UNSET


class _LogFileInput(msgspec.Struct, gc=False, rename={"detail_type": "detail-type"}):
    Records: list[FastRecord]
    detail_type: Any = msgspec.UNSET
    detail: Any = msgspec.UNSET
    eventVersion: Any = msgspec.UNSET
    userIdentity: Any = msgspec.UNSET


SKIPPED = "skipped"  # what fast decoding returns for an EventBridge event of another detail-type


def detail_of(env: _EventBridgeInput) -> FastRecord | str | None:
    """The record of a decoded EventBridge event, SKIPPED, or None (the reference path decides)."""
    if env.detail_type not in CLOUDTRAIL_DETAIL_TYPES:
        return None if env.detail_type == STATE_CHANGE else SKIPPED
    return env.detail if _complete(env.detail) else None

_FAST_ERRORS = (msgspec.DecodeError, RecursionError)
_ORJSON_MAX_DEPTH = 1024


def fast_ok() -> bool:
    """msgspec's nesting limit is Python's recursion limit: it must stay below orjson's."""
    return sys.getrecursionlimit() <= _ORJSON_MAX_DEPTH


class FastDecoder:
    """Decodes one input the fast way, or says it cannot (then use :func:`decode`).

    ``decode_line(raw)`` returns a :class:`FastRecord`, :data:`SKIPPED`, or ``None``. It tries the
    shape that succeeded last first, so a stream of bare records costs one decode per input too.
    """

    __slots__ = ("_eventbridge", "_record", "_eventbridge_first")

    def __init__(self) -> None:
        self._eventbridge = msgspec.json.Decoder(_EventBridgeInput)
        self._record = msgspec.json.Decoder(_RecordInput)
        self._eventbridge_first = True

    def decode_line(self, raw: Any) -> FastRecord | str | None:
        """``raw`` must be ASCII (the caller checks: memoryviews have no ``isascii``)."""
        if self._eventbridge_first:
            try:
                env = self._eventbridge.decode(raw)
            except _FAST_ERRORS:
                return self._as_record(raw, switch=True)
            return detail_of(env)
        result = self._as_record(raw, switch=False)
        if result is None:
            try:
                env = self._eventbridge.decode(raw)
            except _FAST_ERRORS:
                return None
            self._eventbridge_first = True
            return detail_of(env)
        return result

    def _as_record(self, raw: Any, switch: bool) -> FastRecord | None:
        try:
            rec = self._record.decode(raw)
        except _FAST_ERRORS:
            return None
        if rec.detail_type is not msgspec.UNSET and rec.detail is not msgspec.UNSET:
            return None  # also an EventBridge event: the reference path classifies it
        if not _complete(rec):
            return None
        if switch:
            self._eventbridge_first = False
        return rec

    def decode_document(self, raw: bytes) -> list[FastRecord] | None:
        """The records of a CloudTrail log file (``{"Records": [...]}``), or None."""
        if not raw.isascii() or not fast_ok():
            return None
        try:
            doc = msgspec.json.decode(raw, type=_LogFileInput)
        except _FAST_ERRORS:
            return None
        if (doc.detail_type is not msgspec.UNSET and doc.detail is not msgspec.UNSET) or (
            doc.eventVersion is not msgspec.UNSET and doc.userIdentity is not msgspec.UNSET
        ):
            return None
        for record in doc.Records:
            if not _complete(record):
                return None
        return doc.Records


def _project(record: FastRecord) -> dict[str, Any]:
    """A plain-dict record with every field the engine reads, and only those (never a session token)."""
    ident = record.userIdentity
    identity: dict[str, Any] = {"type": ident.type, "arn": ident.arn}
    for name in ("invokedBy", "accessKeyId", "principalId"):
        value = getattr(ident, name)
        if value is not None:
            identity[name] = value
    if ident.sessionContext is not None:
        identity["sessionContext"] = {"ec2RoleDelivery": ident.sessionContext.ec2RoleDelivery}
    out: dict[str, Any] = {"userIdentity": identity}
    if record.eventVersion is not msgspec.UNSET:
        out["eventVersion"] = record.eventVersion
    for name in _TOP_FIELDS:
        value = getattr(record, name)
        if value is not None:
            out[name] = value
    params = record.requestParameters
    if params is not None:
        out["requestParameters"] = {
            name: value for name in _PARAMETER_FIELDS if (value := getattr(params, name)) is not None
        }
    response = record.responseElements
    if response is not None:
        creds = response.credentials
        out["responseElements"] = projected = {
            "credentials": None if creds is None else {"accessKeyId": creds.accessKeyId}
        }
        if response.instancesSet is not None:
            projected["instancesSet"] = response.instancesSet
    return out


# What a projected record keeps (never a session token): top-level fields and requestParameters fields.
_TOP_FIELDS = ("eventTime", "eventName", "eventSource", "awsRegion", "sourceIPAddress", "vpcEndpointId",
               "vpcEndpointAccountId", "eventID", "errorCode", "eventType", "serviceEventDetails")  # fmt: skip
_PARAMETER_FIELDS = ("roleArn", "roleSessionName", "instancesSet", "instanceId", "dryRun")


def _project_dict(record: dict[str, Any]) -> dict[str, Any]:
    """:func:`_project` for a record of the reference decoder (same decisions, no session token)."""
    if is_state_change(record):
        return record  # already reduced by classify
    ident = record["userIdentity"]
    identity = {name: ident[name] for name in ("type", "arn", "invokedBy", "accessKeyId", "principalId") if name in ident}
    context = ident.get("sessionContext")
    if isinstance(context, dict):
        identity["sessionContext"] = {"ec2RoleDelivery": context.get("ec2RoleDelivery")}
    out: dict[str, Any] = {"userIdentity": identity}
    if "eventVersion" in record:
        out["eventVersion"] = record["eventVersion"]
    for name in _TOP_FIELDS:
        if name in record:
            out[name] = record[name]
    params = record.get("requestParameters")
    if isinstance(params, dict):
        out["requestParameters"] = {name: params[name] for name in _PARAMETER_FIELDS if name in params}
    response = record.get("responseElements")
    if isinstance(response, dict):
        creds = response.get("credentials")
        out["responseElements"] = projected = {
            "credentials": {"accessKeyId": creds.get("accessKeyId")} if isinstance(creds, dict) else None
        }
        if "instancesSet" in response:
            projected["instancesSet"] = response["instancesSet"]
    return out


def matters(record: FastRecord) -> bool:
    """True when the record is made with EC2 instance credentials or may be EC2 issuing them (SPEC §3):
    the only records that can change state or raise a finding."""
    ident = record.userIdentity
    if ident.type == "AssumedRole" and type(ident.arn) is str and _is_instance_arn(ident.arn):
        return True
    name = record.eventName
    if name == "AssumeRole":
        return ident.invokedBy == "ec2.amazonaws.com"
    return type(name) is str and name in SIGNAL_NAMES  # a lifecycle or address signal (§11, §13), anyone's


def _is_instance_arn(arn: str) -> bool:
    known = _INSTANCE_ARNS.get(arn)
    if known is None:
        if len(_INSTANCE_ARNS) >= 1 << 16:
            _INSTANCE_ARNS.clear()
        known = _INSTANCE_ARNS[arn] = SESSION_ARN.fullmatch(arn) is not None
    return known


_INSTANCE_ARNS: dict[str, bool] = {}
_FAST = FastDecoder()


def decode_fast(raw: bytes | bytearray) -> Decoded:
    """:func:`decode`, faster, for inputs that are mostly records that do not matter.

    Same ``malformed`` and ``skipped``; ``records`` holds only the records that :func:`matters` —
    as plain dicts restricted to the fields the engine reads (``Engine.apply`` on them decides exactly
    as on the full record; there is no session token in them) — and ``ignored`` counts the other
    CloudTrail records of the input. ``len(records) + ignored`` is what ``decode`` would return in
    ``records``. The byte-level :func:`detector.core.prefilter.may_matter` is not needed here: the
    decode itself tells, at the cost of validating the input (which SPEC §2 requires anyway).
    """
    if isinstance(raw, (bytes, bytearray)) and raw.isascii() and fast_ok():
        result = _FAST.decode_line(raw)
        if result is not None:
            out = Decoded()
            if result is SKIPPED:
                out.skipped = True
            elif matters(result):  # type: ignore[arg-type]
                out.records.append(_project(result))  # type: ignore[arg-type]
            else:
                out.ignored = 1
            return out
    out = decode(raw)
    if out.records and not may_matter(raw):  # the byte-level prefilter: no record here can matter
        out.ignored, out.records = len(out.records), []
    elif out.records:
        kept = [_project_dict(r) for r in out.records if _dict_matters(r)]
        out.ignored = len(out.records) - len(kept)
        out.records = kept
    return out


def _dict_matters(record: dict[str, Any]) -> bool:
    if is_state_change(record):
        return True
    identity = record["userIdentity"]
    arn = identity.get("arn")
    if identity.get("type") == "AssumedRole" and isinstance(arn, str) and _is_instance_arn(arn):
        return True
    name = record.get("eventName")
    if name == "AssumeRole":
        return identity.get("invokedBy") == "ec2.amazonaws.com"
    return isinstance(name, str) and name in SIGNAL_NAMES


# --- the engine's record type ---------------------------------------------------------------------
#
# ``Engine.apply`` decides on one record type: a :class:`FastRecord` (a CloudTrail record, as the fast
# decoder builds it) or a :class:`StateChange` (SPEC §10/§11). A plain-dict record — from the reference
# decoder, which also reads what the fast one refuses — is converted once by :func:`as_record`, which is
# as lenient as the decisions are: a sub-object of the wrong type reads as absent, as it always did.


class StateChange(msgspec.Struct, gc=False, omit_defaults=True):
    """An ``EC2 Instance State-change Notification`` reduced to what SPEC §11 reads (see :func:`classify`)."""

    eventTime: Any = None  # the event's ``time``
    instance_id: Any = None
    state: Any = None
    id: Any = None  # EventBridge's event id: a repeated delivery is the same event


Record = FastRecord | StateChange


def as_record(record: dict[str, Any]) -> FastRecord | StateChange | None:
    """The engine's record for a plain-dict record of :func:`classify` (None when it has no
    ``userIdentity`` object: nothing the engine would decide). Reads only the fields the engine reads;
    never keeps a session token."""
    if record.get("detail-type") == STATE_CHANGE:
        detail = record.get("detail")
        if not isinstance(detail, dict):
            return StateChange(record.get("eventTime"))  # no signal in it
        return StateChange(record.get("eventTime"), detail.get("instance-id"), detail.get("state"), record.get("id"))
    try:
        return msgspec.convert(record, FastRecord)  # every field of the type the struct declares: the usual case
    except msgspec.ValidationError:
        pass  # a sub-object of another type: read as absent, field by field
    ident = record.get("userIdentity")
    if not isinstance(ident, dict):
        return None
    context = ident.get("sessionContext")
    params = record.get("requestParameters")
    response = record.get("responseElements")
    if isinstance(response, dict):
        creds = response.get("credentials")
        response = _Response(
            _Credentials(creds.get("accessKeyId")) if isinstance(creds, dict) else None, response.get("instancesSet")
        )
    else:
        response = None
    get = record.get
    return FastRecord(
        _Identity(
            ident.get("type"),
            ident.get("arn"),
            ident.get("invokedBy"),
            ident.get("accessKeyId"),
            ident.get("principalId"),
            _SessionContext(context.get("ec2RoleDelivery")) if isinstance(context, dict) else None,
        ),
        get("eventVersion", msgspec.UNSET), get("eventTime"), get("eventName"), get("eventSource"), get("awsRegion"),
        get("sourceIPAddress"), get("vpcEndpointId"), get("vpcEndpointAccountId"), get("eventID"), get("errorCode"),
        get("eventType"),
        _Parameters(*(params.get(name) for name in _PARAMETER_FIELDS)) if isinstance(params, dict) else None,
        response,
        get("serviceEventDetails"),
    )  # fmt: skip


# --- records routed between the service's stages ----------------------------------------------------
#
# The route stage writes each record that matters to the sessions topic once; the detect stage reads it
# back as the engine's record type, not as JSON to parse into dicts and convert again. A value is one tag
# byte and the msgpack of the struct (lossless: msgpack keeps every JSON type). A record msgpack cannot
# hold (an integer beyond 64 bits, say) is written as JSON, as every value was before this format; JSON
# values are read too (records on the topic during an upgrade). JSON here is msgspec's, which, unlike
# orjson, keeps integers beyond 64 bits.

_ROUTED_RECORD = 1
_ROUTED_CHANGE = 2
_routed_encoder = msgspec.msgpack.Encoder()
_routed_record = msgspec.msgpack.Decoder(FastRecord)
_routed_change = msgspec.msgpack.Decoder(StateChange)


def encode_routed(record: dict[str, Any] | FastRecord | StateChange) -> bytes:
    """The sessions-topic value of a record (a plain-dict record of :func:`decode_fast`, or the
    engine's record type); :func:`decode_routed` reads it back."""
    value = as_record(record) if isinstance(record, dict) else record
    if value is not None:
        tag = _ROUTED_CHANGE if type(value) is StateChange else _ROUTED_RECORD
        try:
            return bytes((tag,)) + _routed_encoder.encode(value)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
            pass  # not representable in msgpack: JSON, as before
    if not isinstance(record, dict):
        record = _project(record) if isinstance(record, FastRecord) else _state_change_dict(record)  # type: ignore[arg-type]
    return msgspec.json.encode(record)


def decode_routed(value: bytes | None) -> FastRecord | StateChange | None:
    """The record of a sessions-topic value written by :func:`encode_routed`, or by an older version
    (JSON of the record); None when it is neither."""
    if not value:
        return None
    tag = value[0]
    try:
        if tag == _ROUTED_RECORD:
            return _routed_record.decode(memoryview(value)[1:])
        if tag == _ROUTED_CHANGE:
            return _routed_change.decode(memoryview(value)[1:])
    except (msgspec.DecodeError, RecursionError):
        return None
    try:
        parsed = msgspec.json.decode(value)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not (is_cloudtrail_record(parsed) or is_state_change(parsed)):
        return None
    return as_record(parsed)


def _state_change_dict(change: StateChange) -> dict[str, Any]:
    """The plain-dict state-change record of :func:`classify` for ``change``."""
    out = {"detail-type": STATE_CHANGE, "eventTime": change.eventTime, "detail": {"instance-id": change.instance_id, "state": change.state}}
    if change.id is not None:
        out["id"] = change.id
    return out
