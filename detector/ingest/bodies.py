"""Pure parsing for ``detector ingest``: SQS message bodies, CloudTrail log files, partition keys.

No I/O, no clock. :func:`parse_body` tells what an SQS message asks for: an EventBridge event to produce as
is, S3 objects to read, or nothing (an ``s3:TestEvent``, a removal). :class:`ObjectSplitter` turns the bytes
of one S3 object (gzip or plain, fed chunk by chunk) into its ``Records`` elements with memory bounded by
the largest record, never by the object. :func:`record_key` / :func:`event_key` give the instance ID the
output is keyed by (SPEC §10), or None.

Errors are :class:`BodyError` with a short ``reason`` (a metrics label).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import msgspec
import orjson

from ..core.engine import record_instances, session_parts
from ..core.records import SIGNAL_NAMES, STATE_CHANGE, _Parameters

# Reasons (the `reason` label of detector_ingest_failures_total).
INVALID_JSON = "invalid_json"  # the body (or an SNS Message) is not JSON
UNKNOWN_SHAPE = "unknown_shape"  # JSON, but neither an EventBridge event nor an S3 / CloudTrail notification
BAD_GZIP = "bad_gzip"  # an object starting like gzip that does not decompress
NOT_CLOUDTRAIL = "not_cloudtrail"  # an object that is not a CloudTrail log file ({"Records": [...]})

_LOG_FILE_HEAD = re.compile(rb"\s*\{\s*\"Records\"\s*:\s*\[")
_HEAD_BYTES = 64  # enough to see `{"Records":[` behind some whitespace
_GZIP_MAGIC = b"\x1f\x8b"


class BodyError(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class S3Object:
    bucket: str
    key: str
    size: int | None = None  # as the notification says (None when it does not)


@dataclass(frozen=True, slots=True)
class Body:
    """What one SQS message asks for: exactly one of ``event`` / ``objects`` / ``ignored`` is meaningful."""

    event: bytes | None = None  # an EventBridge event, the bytes to produce
    key: str | None = None  # ... and its partition key
    objects: tuple[S3Object, ...] = ()  # S3 objects to read and split
    ignored: str | None = None  # why nothing is to be done (a test event, a removal, a digest file)


# --------------------------------------------------------------------------------------------------
# message bodies
# --------------------------------------------------------------------------------------------------


def _loads(text: str | bytes, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BodyError(INVALID_JSON, f"{what} is not JSON ({exc})") from None


def is_log_object(key: str) -> bool:
    """A key a CloudTrail log file may have: not a digest file, not a folder marker."""
    return not key.endswith("/") and "/CloudTrail-Digest/" not in f"/{key}"


def parse_body(body: str | bytes) -> Body:
    """Classify an SQS message body (SPEC §14 "In"); raises :class:`BodyError`.

    - an EventBridge event (``detail-type`` and ``detail``): produced as is, keyed by instance ID;
      an EventBridge ``Object Created`` event of S3 names an object instead;
    - an S3 event notification (``Records`` of ``aws:s3`` events): its ``ObjectCreated:*`` objects;
    - CloudTrail's own log-delivery notification (``s3Bucket``, ``s3ObjectKey`` list): those objects;
    - any of these inside an SNS envelope (``Type`` ``Notification`` with a ``Message`` string);
    - ``s3:TestEvent`` (sent when a notification is configured): ignored.

    Objects named like CloudTrail digest files are left out (they hold no records).
    """
    value = _loads(body, "message body")
    text: str | bytes = body
    if isinstance(value, dict) and value.get("Type") == "Notification" and isinstance(value.get("Message"), str):
        text = value["Message"]
        value = _loads(text, "SNS Message")
    if not isinstance(value, dict):
        raise BodyError(UNKNOWN_SHAPE, f"message body is a JSON {type(value).__name__}, not an object")
    if "detail-type" in value and "detail" in value:
        return _eventbridge(value, text)
    if value.get("Event") == "s3:TestEvent":
        return Body(ignored="s3:TestEvent")
    if "Records" in value:
        return _objects(_s3_notification(value["Records"]))
    if "s3Bucket" in value and "s3ObjectKey" in value:
        bucket, keys = value["s3Bucket"], value["s3ObjectKey"]
        if not isinstance(bucket, str) or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise BodyError(UNKNOWN_SHAPE, "CloudTrail notification without a bucket name and a list of keys")
        return _objects([S3Object(bucket, k) for k in keys])
    raise BodyError(UNKNOWN_SHAPE, "neither an EventBridge event nor an S3 or CloudTrail notification")


def _objects(objects: list[S3Object]) -> Body:
    kept = tuple(o for o in objects if is_log_object(o.key))
    if kept:
        return Body(objects=kept)
    return Body(ignored="no log file named" if not objects else "digest files only")


def _eventbridge(event: dict[str, Any], text: str | bytes) -> Body:
    detail = event["detail"]
    if event.get("source") == "aws.s3" and event["detail-type"] == "Object Created" and isinstance(detail, dict):
        bucket, obj = detail.get("bucket"), detail.get("object")
        if isinstance(bucket, dict) and isinstance(obj, dict) and isinstance(bucket.get("name"), str) and isinstance(obj.get("key"), str):
            size = obj.get("size")
            return _objects([S3Object(bucket["name"], obj["key"], size if isinstance(size, int) else None)])
        raise BodyError(UNKNOWN_SHAPE, "S3 Object Created event without detail.bucket.name and detail.object.key")
    raw = text.encode() if isinstance(text, str) else bytes(text)
    return Body(event=raw, key=event_key(event))


def _s3_notification(records: Any) -> list[S3Object]:
    if not isinstance(records, list) or not records:
        raise BodyError(UNKNOWN_SHAPE, "Records is not a non-empty list of S3 events")
    out = []
    for rec in records:
        if not isinstance(rec, dict) or rec.get("eventSource") != "aws:s3" or not isinstance(rec.get("s3"), dict):
            raise BodyError(UNKNOWN_SHAPE, "Records holds something other than S3 events")
        if not str(rec.get("eventName", "")).startswith("ObjectCreated:"):
            continue  # removals, restores, replication: no new log file
        s3 = rec["s3"]
        bucket, obj = s3.get("bucket"), s3.get("object")
        if not (isinstance(bucket, dict) and isinstance(obj, dict) and isinstance(bucket.get("name"), str) and isinstance(obj.get("key"), str)):
            raise BodyError(UNKNOWN_SHAPE, "S3 event without s3.bucket.name and s3.object.key")
        size = obj.get("size")
        # S3 notifications URL-encode the key (a space is '+')
        out.append(S3Object(bucket["name"], unquote_plus(obj["key"]), size if isinstance(size, int) else None))
    return out


# --------------------------------------------------------------------------------------------------
# partition keys (SPEC §10: everything about one instance meets in one partition)
# --------------------------------------------------------------------------------------------------


def record_key(record: Any) -> str | None:
    """The instance ID a CloudTrail record (or an EC2 state-change event) is about (SPEC §10), or None.

    The first of :func:`detector.core.engine.record_instances`, the one definition the service
    repartitions by: the instance of an instance-credential session (any role, ``aws:ec2-instance``
    included; other ``aws:`` roles are AWS's own), the instance EC2's ``AssumeRole`` issues credentials
    for, else the first instance of a lifecycle or address signal (§11, §13; a failed or DryRun call is
    none). A record naming several instances is keyed by the first: the detector fans it out itself.
    """
    if not isinstance(record, dict):
        return None
    instances = record_instances(record)
    return instances[0] if instances else None


class _KeyIdentity(msgspec.Struct, gc=False):
    type: Any = None
    arn: Any = None
    invokedBy: Any = None


class _KeyResponse(msgspec.Struct, gc=False):
    instancesSet: Any = None


class _KeyFields(msgspec.Struct, gc=False, rename={"detail_type": "detail-type"}):
    """Every field :func:`record_key` reads, and only those: msgspec skips the rest without building it."""

    userIdentity: _KeyIdentity | None = None
    eventName: Any = None
    eventSource: Any = None
    errorCode: Any = None
    requestParameters: _Parameters | None = None  # the fields the engine reads, as the fast decoder has them
    responseElements: _KeyResponse | None = None
    serviceEventDetails: Any = None
    detail_type: Any = msgspec.UNSET  # an EventBridge-shaped element: left to record_key whole


_KEY_DECODER = msgspec.json.Decoder(_KeyFields)
_DECODE_ERRORS = (msgspec.DecodeError, RecursionError)
_SESSION_KEYS: dict[str, str | None] = {}  # session ARN -> its instance (or None); bounded, cleared when full


def raw_record_key(raw: Any) -> str | None:
    """:func:`record_key` of a record given as its JSON text (bytes), without parsing the whole record.

    The fields the key depends on are decoded into a small struct (the rest skipped); a record that may be
    an issuance or a signal is then keyed by :func:`record_key` itself on those fields, one of a session
    by its ARN (memoised). An element the struct does not fit (not an object, a field of another type, an
    EventBridge-shaped element) is parsed whole and keyed by :func:`record_key`, so the rules stay one.
    Raises :class:`BodyError` (``not_cloudtrail``) when ``raw`` is not JSON.
    """
    try:
        fields = _KEY_DECODER.decode(raw)
    except _DECODE_ERRORS:
        return _parsed_key(raw)
    if fields.detail_type is not msgspec.UNSET:
        return _parsed_key(raw)
    name = fields.eventName
    if name == "AssumeRole" or (type(name) is str and name in SIGNAL_NAMES):
        return record_key(msgspec.to_builtins(fields))
    identity = fields.userIdentity
    if identity is None or identity.type != "AssumedRole" or type(identity.arn) is not str:
        return None  # neither a session, nor an issuance, nor a signal (record_instances: no instance)
    arn = identity.arn
    try:
        return _SESSION_KEYS[arn]
    except KeyError:
        pass
    if len(_SESSION_KEYS) >= 1 << 16:
        _SESSION_KEYS.clear()
    parts = session_parts({"userIdentity": {"type": "AssumedRole", "arn": arn}})
    key = _SESSION_KEYS[arn] = parts[4] if parts is not None else None
    return key


def _parsed_key(raw: Any) -> str | None:
    try:
        value = orjson.loads(bytes(raw))
    except orjson.JSONDecodeError as exc:
        raise BodyError(NOT_CLOUDTRAIL, f"a Records element is not valid JSON ({exc})") from None
    return record_key(value)


def event_key(event: dict[str, Any]) -> str | None:
    """The instance ID of an EventBridge event: ``detail.instance-id`` of an EC2 state-change notification,
    else that of its CloudTrail ``detail``."""
    if event.get("detail-type") == STATE_CHANGE:
        return record_key(event)
    return record_key(event.get("detail"))


# --------------------------------------------------------------------------------------------------
# S3 objects -> records
# --------------------------------------------------------------------------------------------------


class ObjectSplitter:
    """The records of one CloudTrail log file, from its bytes fed in chunks of any size.

    Gzip (recognised by its magic bytes, not the key) or plain JSON ``{"Records": [...]}``. Decompression
    is bounded (``max_piece`` output bytes at a time) and the elements of ``Records`` are cut out of the
    text incrementally (:class:`RecordsSplitter`), so memory holds one piece and the record being cut,
    whatever the object's size. Each element comes out as its bytes exactly as in the file (the value to
    produce; :func:`raw_record_key` gives its key).
    """

    def __init__(self, max_piece: int = 1 << 20, max_record: int = 64 << 20) -> None:
        self.max_piece = max_piece
        self.compressed: bool | None = None  # decided by the first two bytes
        self.bytes_in = 0  # object bytes fed
        self._inflate: Any = None
        self._magic = b""
        self._records = RecordsSplitter(max_record)

    @property
    def bytes_out(self) -> int:
        """JSON bytes parsed (decompressed)."""
        return self._records.bytes_in

    def feed(self, chunk: bytes) -> Iterator[list[bytes]]:
        """The records completed by ``chunk``, in lists (a generator: consume it before feeding the next chunk)."""
        if not chunk:
            return
        self.bytes_in += len(chunk)
        if self.compressed is None:
            self._magic += chunk
            if len(self._magic) < 2:
                return
            chunk, self._magic = self._magic, b""
            self.compressed = chunk[:2] == _GZIP_MAGIC
            if self.compressed:
                self._inflate = zlib.decompressobj(wbits=31)
        if not self.compressed:
            yield self._records.feed(chunk)
            return
        data = chunk
        while data:
            try:
                piece = self._inflate.decompress(data, self.max_piece)
            except zlib.error as exc:
                raise BodyError(BAD_GZIP, f"object is not valid gzip ({exc})") from None
            data = self._inflate.unconsumed_tail
            if self._inflate.eof and self._inflate.unused_data:  # a multi-member gzip file: next member
                data = self._inflate.unused_data
                self._inflate = zlib.decompressobj(wbits=31)
            yield self._records.feed(piece)

    def close(self) -> Iterator[list[bytes]]:
        """The last records; raises :class:`BodyError` if the object ended early or was not a log file."""
        if self.compressed is None and self._magic:  # a one-byte object
            self.compressed = False
            yield self._records.feed(self._magic)
        if self.compressed and self._inflate is not None and not self._inflate.eof:
            raise BodyError(BAD_GZIP, "gzip stream ends early (truncated object)")
        yield self._records.close()


_WS = b" \t\r\n"
_OBJECT_END = re.compile(rb"\}(?=[ \t\r\n]*[,\]])")  # a '}' that may close an element of the array
# CloudTrail writes every record starting with eventVersion: then a '}' closes one only when the next record
# or the end of the array (and of the text so far) follows, which nested arrays of objects hardly ever fake.
_RECORD_START = b'{"eventVersion"'
_RECORD_END = re.compile(rb'\}(?=[ \t\r\n]*(?:,[ \t\r\n]*\{"eventVersion"|\][ \t\r\n]*\}[ \t\r\n]*\Z))')
_RECORD_SEARCH = 1 << 20  # past this many bytes (or at the end) without such a '}', any '}' may close it
_VALUE_END = re.compile(rb"[^ \t\r\n,\]](?=[ \t\r\n]*[,\]])")
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]]', re.DOTALL)  # strings and brackets, for the exact scan
_SCALAR = re.compile(rb"[^ \t\r\n,\]]+")
_RESCAN = 1024  # bytes searched again when more text comes (a candidate '}' may have lacked its delimiter)
_GUESSES = 16  # failed candidate ends of one element before the exact scan


class RecordsSplitter:
    """The elements of the top-level ``Records`` array of a JSON text fed in pieces, as their bytes.

    The common case is cut in bulk: CloudTrail writes every record starting with ``{"eventVersion"``, so
    the text from the current element up to the last ``}`` followed by ``,`` and such a start is a run of
    whole records, which msgspec splits into ``list[Raw]`` in one compiled pass — validating the JSON of
    the run, since it can only decode when every element in it is complete and well-formed (a ``{"`` of
    a string is always ``{\\"``, so a fake start can only be a nested object, whose cut leaves the run
    unbalanced). A run that does not decode, or holds non-UTF-8 bytes, is cut element by element below.

    Element by element, an end is found fast: the next ``}`` followed by ``,`` or ``]`` is a candidate, and
    the candidate is right when the bytes up to it parse as JSON (orjson). After ``_GUESSES`` wrong
    candidates (an element full of nested arrays of objects) an exact scan of its strings and brackets
    takes over, so the cost stays linear. An element longer than ``max_record`` bytes is an error, which
    bounds the memory whatever the input.
    """

    def __init__(self, max_record: int = 64 << 20) -> None:
        self.max_record = max_record
        self.bytes_in = 0
        self._buf = bytearray()
        self._state = "head"  # head -> value | delimiter -> tail -> done
        self._first = True
        self._scan = 0  # where the search for the current element's end resumes
        self._guesses = 0
        self._generic = False  # the current element is searched for with _OBJECT_END
        self._slow_until = 0  # a run that did not decode in bulk ends here: cut it element by element

    def feed(self, data: bytes, final: bool = False) -> list[bytes]:
        self.bytes_in += len(data)
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        if self._state == "head":
            if len(buf) < _HEAD_BYTES and not final:
                return out
            m = _LOG_FILE_HEAD.match(buf)
            if m is None:
                raise BodyError(NOT_CLOUDTRAIL, 'object does not start like a CloudTrail log file ({"Records": [...]})')
            pos, self._state = m.end(), "value"
        n = len(buf)
        while self._state in ("value", "delimiter"):
            while pos < n and buf[pos] in _WS:
                pos += 1
            if pos >= n:
                break
            c = buf[pos]
            if self._state == "delimiter" or (self._first and c == 0x5D):
                if c == 0x2C and self._state == "delimiter":  # ','
                    self._state, pos = "value", pos + 1
                elif c == 0x5D:  # ']'
                    self._state, pos = "tail", pos + 1
                else:
                    raise BodyError(NOT_CLOUDTRAIL, "Records is not a JSON array of records")
                continue
            if pos >= self._slow_until:
                cut = self._bulk(buf, pos, out)
                if cut:
                    pos, self._state, self._first, self._scan, self._guesses, self._generic = cut, "delimiter", False, 0, 0, False
                    continue
            found = self._element(buf, pos, final)
            if found is None:
                if n - pos > self.max_record:
                    raise BodyError(NOT_CLOUDTRAIL, f"a record longer than {self.max_record} bytes (or not JSON)")
                break
            end, raw = found
            out.append(raw)
            pos, self._state, self._first, self._scan, self._guesses, self._generic = end, "delimiter", False, 0, 0, False
        if self._state == "tail":
            rest = bytes(buf[pos:]).strip(_WS)
            if rest == b"}":
                self._state, pos = "done", len(buf)
            elif rest:
                raise BodyError(NOT_CLOUDTRAIL, "the log file holds more than its Records array")
        elif self._state == "done" and bytes(buf[pos:]).strip(_WS):
            raise BodyError(NOT_CLOUDTRAIL, "bytes after the end of the log file")
        del buf[:pos]
        self._slow_until = max(0, self._slow_until - pos)
        return out

    def close(self) -> list[bytes]:
        out = self.feed(b"", final=True)
        if self._state != "done":
            raise BodyError(NOT_CLOUDTRAIL, "object is not a complete CloudTrail log file (ends early or is not JSON)")
        return out

    def _bulk(self, buf: bytearray, start: int, out: list[bytes]) -> int:
        """Cut the run of whole records from ``start`` (see the class doc) into ``out``: the end of the run,
        or 0 when there is none or it does not decode (then ``_slow_until`` covers it)."""
        if not buf.startswith(_RECORD_START, start):
            return 0
        cut = _last_record_end(buf, start)
        if cut <= start:
            return 0
        run = b"[" + buf[start:cut] + b"]"
        if run.isascii() or _utf8(run):
            try:
                out.extend(map(bytes, _RUN_DECODER.decode(run)))
                return cut
            except _DECODE_ERRORS:
                pass
        self._slow_until = cut
        return 0

    def _element(self, buf: bytearray, start: int, final: bool) -> tuple[int, bytes] | None:
        """(end, raw bytes) of the element starting at ``start``, or None when it is not complete yet."""
        if buf[start] != 0x7B:
            pattern = _VALUE_END
        elif buf.startswith(_RECORD_START, start) and not self._generic:
            pattern = _RECORD_END
        else:
            pattern = _OBJECT_END
        scan = max(start, start + self._scan)
        while self._guesses < _GUESSES:
            m = pattern.search(buf, scan)
            if m is None:
                if pattern is _RECORD_END and (final or len(buf) - start > _RECORD_SEARCH):
                    self._generic, self._scan = True, 0  # not followed by another CloudTrail record
                    return self._element(buf, start, final)
                self._scan = max(scan, len(buf) - _RESCAN) - start
                return None
            end = m.end()
            raw = bytes(buf[start:end])
            try:
                orjson.loads(raw)
                return end, raw
            except orjson.JSONDecodeError:
                self._guesses += 1
                scan = end
        end = _exact_end(buf, start)
        if end is None:
            return None
        raw = bytes(buf[start:end])
        try:
            orjson.loads(raw)
            return end, raw
        except orjson.JSONDecodeError as exc:
            if final:
                raise BodyError(NOT_CLOUDTRAIL, f"a Records element is not valid JSON ({exc})") from None
            return None  # the text may end inside a string: wait for more


_RUN_DECODER = msgspec.json.Decoder(list[msgspec.Raw])
_NEXT_RECORD = b'{"eventVersion"'


def _last_record_end(buf: bytearray, start: int) -> int:
    """The end (exclusive) of the last ``}`` after ``start`` followed by ``,`` and ``{"eventVersion"``
    (whitespace allowed between), or -1."""
    hi = len(buf)
    while True:
        j = buf.rfind(_NEXT_RECORD, start + 1, hi)
        if j < 0:
            return -1
        k = j - 1
        while k > start and buf[k] in _WS:
            k -= 1
        if buf[k] == 0x2C:  # ','
            k -= 1
            while k > start and buf[k] in _WS:
                k -= 1
            if buf[k] == 0x7D:  # '}'
                return k + 1
        hi = j


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _exact_end(buf: bytearray, start: int) -> int | None:
    c = buf[start]
    if c not in (0x7B, 0x5B, 0x22):  # a number or a literal
        m = _SCALAR.match(buf, start)
        return m.end() if m and m.end() < len(buf) else None
    depth = 0
    for m in _TOKEN.finditer(buf, start):
        token = m.group()
        if token[0] == 0x22:
            if depth == 0:
                return m.end()
            continue
        depth += 1 if token in (b"{", b"[") else -1
        if depth == 0:
            return m.end()
    return None
