"""The detection core: ``Engine.apply(state, record) -> [FindingChange]`` (SPEC §3-§5, §8).

Pure and synchronous: no I/O, no clock (time is the records' ``eventTime``), no logging. The replay
command, the Kafka service and state restoration all drive this same function.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import msgspec

from .addresses import V4, AddressIndex, format_address, is_global, parse_address
from .registry import _ALL as _ALL_HOMES
from .records import SIGNAL_NAMES, STATE_CHANGE, FastRecord, Record, StateChange, as_record
from .registry import EMPTY_REGISTRY, Registry
from .state import (
    _INSTANCE_KEY_MASK,
    L_PREV,
    L_PREV_STATE,
    L_RESET_IDS,
    L_START,
    L_STATE,
    L_STOP,
    STOPPED,
    TERMINATED,
    instance_bits,
    instance_text,
    MAX_EVENT_IDS,
    MAX_REMOTE_ADDRESSES,
    DetectorState,
    FindingGroup,
    Session,
    SessionIndex,
    pack_key,
    parse_session_key,
)

INSIDE_AWS = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.InsideAWS"
OUTSIDE_AWS = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OutsideAWS"
AFTER_STOP = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.AfterInstanceStopped"  # SPEC §11
OTHER_INSTANCE = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OtherInstance"  # SPEC §12
IMDSV1 = "Policy:EC2/InstanceCredentialsDeliveredByIMDSv1"  # SPEC §13

HIGH = 8
MEDIUM = 5
LOW = 2

DEFAULT_STOP_GRACE_SECONDS = 600.0
MAX_API_PAIRS = 1024  # distinct eventSource/eventName pairs counted per group (OTHER included)
MAX_ERROR_CODES = 64
OTHER = "\x00other"  # the key counting what is beyond those bounds

# SPEC §11: state-change states.
_STOP_STATES = {"stopping": STOPPED, "stopped": STOPPED, "shutting-down": TERMINATED, "terminated": TERMINATED}
_START_STATES = frozenset({"pending", "running"})
_EC2 = "ec2.amazonaws.com"

# Origin kinds (SPEC §4), also the `originKind` evidence field.
ORIGIN_SERVICE = "AWS_SERVICE"
ORIGIN_ENDPOINT = "VPC_ENDPOINT"
ORIGIN_REGISTRY = "REGISTRY_ADDRESS"
ORIGIN_EXPECTED = "EXPECTED_NETWORK"
ORIGIN_AWS = "AWS_ADDRESS"
ORIGIN_PRIVATE = "PRIVATE_ADDRESS"
ORIGIN_OUTSIDE = "OUTSIDE_AWS"

_SESSION_ARN = re.compile(
    r"arn:([a-z][a-z0-9-]*):sts::([0-9]{12}):assumed-role/([\w+=,.@-]{1,128}|aws:ec2-instance)/(i-(?:[0-9a-f]{17}|[0-9a-f]{8}))"
)
_ROLE_ARN = re.compile(r"arn:([a-z][a-z0-9-]*):iam::([0-9]{12}):role/(?:[\w+=,.@/-]*/)?([\w+=,.@-]{1,128})")
_INSTANCE_ID = re.compile(r"i-(?:[0-9a-f]{17}|[0-9a-f]{8})")
_ACCOUNT = re.compile(r"[0-9]{12}")


class MalformedRecord(ValueError):
    """An instance-credential record that lacks what the decision needs (goes to the dead letters)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(slots=True)
class FindingChange:
    group: FindingGroup
    new: bool


@dataclass(slots=True)
class Counters:
    records: int = 0
    issuance_records: int = 0
    origin: dict[str, int] | None = None  # instance-credential records by origin kind

    def __post_init__(self) -> None:
        self.origin = {}

    @property
    def instance_records(self) -> int:
        return sum(self.origin.values())  # type: ignore[union-attr]


def parse_event_time(value: Any) -> float:
    if not isinstance(value, str):
        raise MalformedRecord("bad_field", "eventTime missing or not a string")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedRecord("bad_field", f"eventTime {value[:40]!r} is not ISO 8601") from None
    if dt.tzinfo is None:
        raise MalformedRecord("bad_field", f"eventTime {value[:40]!r} has no time zone")
    try:
        dt.astimezone(timezone.utc)  # e.g. 0001-01-01T00:00:00+01:00 is year 0 in UTC: not renderable
    except OverflowError:
        raise MalformedRecord("bad_field", f"eventTime {value[:40]!r} is outside the UTC calendar") from None
    return dt.timestamp()


def is_service_call(identity: dict[str, Any], source: Any) -> bool:
    """SPEC §4.1: an AWS service acting on the caller's behalf."""
    return bool(identity.get("invokedBy")) or (
        isinstance(source, str) and (source.endswith(".amazonaws.com") or source.startswith("AWS Internal"))
    )


def check_decidable(record: dict[str, Any]) -> None:
    """Raise :class:`MalformedRecord` for an instance-credential record ``Engine.apply`` would reject.

    Lets a stage that only routes records (the service's first stage) dead-letter the original input
    instead of passing an undecidable record on.
    """
    parse_event_time(record.get("eventTime"))
    source = record.get("sourceIPAddress")
    if is_service_call(record["userIdentity"], source):
        return
    vpce = record.get("vpcEndpointId")
    if isinstance(vpce, str) and vpce.startswith("vpce-"):
        return
    if not isinstance(source, str) or parse_address(source) is None:
        raise MalformedRecord("bad_field", f"sourceIPAddress {str(source)[:60]!r} is neither an address nor a service")


def route_keys(record: dict[str, Any] | Record) -> list[str]:
    """The instance IDs a record concerns (SPEC §10: the keys of its routed copies), empty when the
    detector does not keep it: the instance of its session (any role), of the credentials an issuance
    record issues, and of its lifecycle or address signals. The service's route stage and the sharded
    replay (``--jobs`` 3 or more) route with it.

    Raises :class:`MalformedRecord` for an instance-credential record :meth:`Engine.apply` could not
    decide. A decoded record (not a dict) is checked only when it concerns several instances: with one,
    the engine that applies it rejects it as it would unrouted.
    """
    if isinstance(record, dict):
        parts = session_parts(record)
        if parts is not None:
            check_decidable(record)
        return record_instances(record, parts)
    keys = record_instances(record)
    if len(keys) > 1 and type(record) is not StateChange:
        as_dict = msgspec.to_builtins(record)
        if session_parts(as_dict) is not None:
            check_decidable(as_dict)
    return keys


def session_parts(record: dict[str, Any]) -> tuple[str, str, str, str, str] | None:
    """``(session_key, partition, account, role, instance_id)`` if made with instance credentials."""
    identity = record.get("userIdentity")
    if not isinstance(identity, dict) or identity.get("type") != "AssumedRole":
        return None
    arn = identity.get("arn")
    if not isinstance(arn, str):
        return None
    m = _SESSION_ARN.fullmatch(arn)
    if m is None:
        return None
    return arn, m.group(1), m.group(2), m.group(3), m.group(4)


def issuance(record: FastRecord) -> tuple[str, int, str, str, str, str, str | None] | None:
    """For EC2's own AssumeRole that issues instance credentials (SPEC §3): ``(session_key, packed_key,
    partition, account, role, instance_id, new access key or None)``; else None."""
    if record.eventName != "AssumeRole" or record.userIdentity.invokedBy != "ec2.amazonaws.com":
        return None
    params = record.requestParameters
    if params is None:
        return None
    issued = issuance_key(params.roleSessionName, params.roleArn)
    if issued is None:
        return None
    access_key = None
    response = record.responseElements
    if response is not None and response.credentials is not None:
        access_key = response.credentials.accessKeyId  # never the sessionToken
        if type(access_key) is not str:
            access_key = None
    return (*issued, access_key)


def issuance_parts(record: dict[str, Any]) -> tuple[str, str, str, str, str, str | None] | None:
    """:func:`issuance` of a plain-dict record: ``(session_key, partition, account, role, instance_id,
    access key)``."""
    converted = as_record(record)
    issued = issuance(converted) if type(converted) is FastRecord else None
    if issued is None:
        return None
    key, _, partition, account, role, instance_id, access_key = issued
    return key, partition, account, role, instance_id, access_key


def issuance_key(instance_id: Any, role_arn: Any) -> tuple[str, int, str, str, str, str] | None:
    """``(session_key, packed_key, partition, account, role, instance_id)`` of the session EC2's
    ``AssumeRole`` issues credentials for, from its ``roleSessionName`` and ``roleArn``. Memoized (EC2
    rotates each instance's credentials every few hours: the same pair comes back)."""
    if type(instance_id) is not str or type(role_arn) is not str:
        return None
    memo_key = (instance_id, role_arn)
    hit = _ISSUED.get(memo_key, _MISS)
    if hit is not _MISS:
        return hit  # type: ignore[return-value]
    if len(_ISSUED) >= _CACHE_LARGE:
        _ISSUED.clear()
    m = _ROLE_ARN.fullmatch(role_arn) if _INSTANCE_ID.fullmatch(instance_id) else None
    if m is None:
        _ISSUED[memo_key] = None
        return None
    partition, account, role = m.group(1), m.group(2), m.group(3)
    key = f"arn:{partition}:sts::{account}:assumed-role/{role}/{instance_id}"
    hit = _ISSUED[memo_key] = key, pack_key(partition, account, role, instance_id), partition, account, role, instance_id
    return hit


_ISSUED: dict[tuple[str, str], tuple[str, int, str, str, str, str] | None] = {}


def finding_id(finding_type: str, session_key: str, remote_account: str | None, other_instance: str | None = None) -> str:
    """The id of a finding group: (type, session key, remote account) — and for SPEC §12 the other
    instance J, appended only then, so the ids of every other group stay what they were."""
    material = "\x1f".join((finding_type, session_key, remote_account or ""))
    if other_instance is not None:
        material += "\x1f" + other_instance
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def _instance_ids(items: Any) -> list[str]:
    """``instanceId`` of each element of an EC2 ``instancesSet`` (``{"items": [...]}``)."""
    if isinstance(items, dict):
        items = items.get("items")
    if not isinstance(items, list):
        return []
    return [item["instanceId"] for item in items if isinstance(item, dict) and isinstance(item.get("instanceId"), str)]


def signals(record: Record) -> tuple[str, list[str], str | None]:
    """The lifecycle and address signals of a record (SPEC §11, §13): ``(kind, instance IDs, state)``;
    kind ``stop`` (state ``stopped``/``terminated``), ``start`` (resets first-use addresses too),
    ``reset`` (AssociateAddress), or ``""`` for none. A failed (``errorCode``) or DryRun call is none."""
    if type(record) is StateChange:
        instance_id, state = record.instance_id, record.state
        if not isinstance(instance_id, str):
            return "", [], None
        if state in _STOP_STATES:
            return "stop", [instance_id], _STOP_STATES[state]
        if state in _START_STATES:
            return "start", [instance_id], None
        return "", [], None
    name = record.eventName
    if type(name) is not str or name not in SIGNAL_NAMES or record.errorCode:
        return "", [], None
    params = record.requestParameters
    if params is not None and params.dryRun is True:
        return "", [], None
    if name == "BidEvictedEvent":
        details = record.serviceEventDetails
        ids = details.get("instanceIdSet") if isinstance(details, dict) else None
        if not isinstance(ids, list):
            return "", [], None
        return "stop", [i for i in ids if isinstance(i, str)], TERMINATED
    if record.eventSource != _EC2:
        return "", [], None
    if name == "AssociateAddress":
        instance_id = params.instanceId if params is not None else None
        return ("reset", [instance_id], None) if isinstance(instance_id, str) else ("", [], None)
    response = record.responseElements
    ids = _instance_ids(response.instancesSet) if response is not None else []
    if not ids and params is not None:
        ids = _instance_ids(params.instancesSet)
    if name == "StartInstances":
        return "start", ids, None
    return "stop", ids, TERMINATED if name == "TerminateInstances" else STOPPED


def record_instances(record: dict[str, Any] | Record, parts: Any = False) -> list[str]:
    """Every instance a record concerns (SPEC §10: its partitioning keys): the instance of its session,
    the instance an issuance record issues credentials for, and the instances of its signals.
    ``parts``: a plain-dict record's :func:`session_parts` when the caller has them."""
    if isinstance(record, dict):
        if parts is False:
            parts = session_parts(record)
        name = record.get("eventName")
        if not (name == "AssumeRole" or record.get("detail-type") == STATE_CHANGE or (type(name) is str and name in SIGNAL_NAMES)):
            return [] if parts is None else [parts[4]]  # the usual record: no issuance, no signal
        converted = as_record(record)
        if converted is None:
            return [] if parts is None else [parts[4]]
        record = converted
    elif parts is False:
        identity = getattr(record, "userIdentity", None)
        arn = identity.arn if identity is not None and identity.type == "AssumedRole" else None
        parsed = parse_session_key(arn) if type(arn) is str else None
        parts = None if parsed is None else (arn, *parsed[1:])
    out: list[str] = []
    if parts is not None:
        out.append(parts[4])
    elif type(record) is not StateChange:
        issued = issuance(record)  # type: ignore[arg-type]
        if issued is not None:
            out.append(issued[5])
    kind, ids, _ = signals(record)
    if kind:
        out.extend(i for i in ids if i not in out and instance_bits(i) is not None)
    return out


@dataclass(slots=True)
class Origin:
    kind: str
    owner: str | None = None  # account that owns the endpoint or address, when known
    address: str | None = None  # the source address, normalised, when it is one
    family: int = 0
    vpce: str | None = None


# Entries per memo table; a full table is cleared (bounded memory, no LRU work). While the index holds
# fewer sessions than _CACHE_LARGE, a table may hold that many: the working set of a few tens of
# thousands of sessions (each with its ARN, public address and endpoint) then fits, where 16k thrashed.
# Beyond that it never fits (a million sessions), so the tables go back to _CACHE_LIMIT at their next
# clear and memory stays bounded (≈ 4 MB per table).
_CACHE_LIMIT = 1 << 14
_CACHE_LARGE = 1 << 16
_NOT_ADDRESS = (0, 0, None)
_MISS = object()
_SERVICE_ORIGIN: tuple[str, str | None, str | None, int, int, str | None] = (ORIGIN_SERVICE, None, None, 0, 0, None)


class Engine:
    """Context of the decision (registry, AWS ranges) plus the pure ``apply``.

    ``apply`` memoizes what repeats across records — the parse of a session ARN, of an ``eventTime``
    string, and the classification of a source address against the registry and AWS's ranges (dropped
    whenever ``registry`` or ``aws_ranges`` is replaced) — in bounded tables. Results are the same as
    computing everything afresh for every record.
    """

    def __init__(
        self,
        registry: Registry = EMPTY_REGISTRY,
        aws_ranges: AddressIndex[Any] | None = None,
        stop_grace_seconds: float = DEFAULT_STOP_GRACE_SECONDS,
        imdsv1_findings: bool = True,
    ) -> None:
        self.counters = Counters()
        self.stop_grace_seconds = stop_grace_seconds
        self.imdsv1_findings = imdsv1_findings
        self._instances = registry.has_instances  # SPEC §12 needs an inventory
        self._arns: dict[str, tuple[int, str, str, str, str] | None] = {}
        self._times: dict[str, float] = {}
        self._addresses: dict[str, tuple[int, int, str | None]] = {}
        # Classifications of addresses against the registry and the ranges; origin tuples of calls
        # without invokedBy: (source, home account) without a VPC endpoint, (source, endpoint,
        # endpoint owner or None) through one. Both are dropped whenever the registry or the ranges
        # are replaced (the setters below), so a reload takes effect at the next record.
        self._classes: dict[tuple[int, int], tuple[str | None, Any, bool, bool]] = {}
        self._origins: dict[tuple[Any, ...], tuple[str, str | None, str | None, int, int, str | None]] = {}
        self._registry = registry
        self._aws_ranges: AddressIndex[Any] = aws_ranges if aws_ranges is not None else AddressIndex()
        self._limit = _CACHE_LARGE  # entries per memo table (see _CACHE_LARGE), set by _fit
        self._gids: dict[tuple[str, str, str | None, str | None], str] = {}  # finding ids of groups (a hash each)

    def _fit(self, state: DetectorState) -> None:
        """Size the memo tables for ``state``'s index (called on memo misses only)."""
        self._limit = _CACHE_LARGE if len(state.sessions) < _CACHE_LARGE else _CACHE_LIMIT

    @property
    def registry(self) -> Registry:
        return self._registry

    @registry.setter
    def registry(self, registry: Registry) -> None:
        self._registry = registry
        self._instances = registry.has_instances
        self._classes.clear()
        self._origins.clear()

    @property
    def aws_ranges(self) -> AddressIndex[Any]:
        return self._aws_ranges

    @aws_ranges.setter
    def aws_ranges(self, ranges: AddressIndex[Any]) -> None:
        self._aws_ranges = ranges
        self._classes.clear()
        self._origins.clear()

    # --- memo tables -------------------------------------------------------------------------------

    def _session_arn(self, arn: str, state: DetectorState) -> tuple[int, str, str, str, str] | None:
        """``(packed key, partition, account, role, instance_id)`` of an instance session ARN, else None.
        On a miss, the memo tables are sized for ``state``'s index first (:meth:`_fit`)."""
        arns = self._arns
        try:
            return arns[arn]
        except KeyError:
            pass
        self._fit(state)
        if len(arns) >= self._limit:
            arns.clear()
        parsed = arns[arn] = parse_session_key(arn)
        return parsed

    def _event_time(self, value: Any) -> float:
        if type(value) is str:
            ts = self._times.get(value)
            if ts is not None:
                return ts
            ts = parse_event_time(value)
            if len(self._times) >= self._limit:
                self._times.clear()
            self._times[value] = ts
            return ts
        return parse_event_time(value)

    def _address(self, source: str) -> tuple[int, int, str | None]:
        """``(family, value, normalised address)`` of ``source``; family 0 when it is not an address."""
        memo = self._addresses
        hit = memo.get(source)
        if hit is None:
            parsed = parse_address(source)
            if parsed is None:
                hit = (0, 0, None)
            elif parsed[0] == V4 and ":" not in source:
                hit = (V4, parsed[1], source)  # inet_pton takes only the canonical dotted quad: it is the form
            else:
                hit = (parsed[0], parsed[1], format_address(*parsed))
            if len(memo) >= self._limit:
                memo.clear()
            memo[source] = hit
        return hit

    def _classify(self, family: int, value: int) -> tuple[str | None, Any, bool, bool]:
        """``(registry owner, expected-network payload, in AWS ranges, global)`` of an address (global
        is computed only for an address neither owned nor in AWS's ranges, the only case that reads
        it; else False); dropped whenever ``registry`` or ``aws_ranges`` is replaced."""
        memo = self._classes
        key = (family, value)
        hit = memo.get(key)
        if hit is None:
            registry, ranges = self._registry, self._aws_ranges
            owner = registry.owners.lookup(family, value)
            in_aws = ranges.lookup(family, value) is not None
            hit = (
                owner,
                registry.expected.lookup(family, value),
                in_aws,
                # only read when the address is neither owned nor in AWS's ranges: ipaddress is slow
                owner is None and not in_aws and is_global(family, value),
            )
            if len(memo) >= self._limit:
                memo.clear()
            memo[key] = hit
        return hit

    # --- SPEC §4 -----------------------------------------------------------------------------------

    def _origin(
        self, source: Any, invoked_by: Any, vpce: Any, vpce_account: Any, home: str
    ) -> tuple[str, str | None, str | None, int, int, str | None]:
        """``(kind, owner, address, family, value, vpce)`` of a call (SPEC §4)."""
        is_str = isinstance(source, str)
        if invoked_by or (is_str and (source.endswith(".amazonaws.com") or source.startswith("AWS Internal"))):
            return ORIGIN_SERVICE, None, None, 0, 0, None
        family, value, address = self._address(source) if is_str else _NOT_ADDRESS
        if isinstance(vpce, str) and vpce.startswith("vpce-"):
            if not (isinstance(vpce_account, str) and _ACCOUNT.fullmatch(vpce_account)):
                vpce_account = self.registry.endpoint_owner.get(vpce)
            return ORIGIN_ENDPOINT, vpce_account, address, family, value, vpce
        if not family:
            raise MalformedRecord("bad_field", f"sourceIPAddress {str(source)[:60]!r} is neither an address nor a service")
        owner, expected, in_aws, is_glob = self._classify(family, value)
        if owner is not None:
            return ORIGIN_REGISTRY, owner, address, family, value, None
        if expected is not None and (home in expected or _ALL_HOMES in expected):
            return ORIGIN_EXPECTED, None, address, family, value, None
        if in_aws:
            return ORIGIN_AWS, None, address, family, value, None
        if not is_glob:
            return ORIGIN_PRIVATE, None, address, family, value, None
        return ORIGIN_OUTSIDE, None, address, family, value, None

    def origin(self, record: dict[str, Any], identity: dict[str, Any], home: str) -> Origin:
        kind, owner, address, family, _, vpce = self._origin(
            record.get("sourceIPAddress"),
            identity.get("invokedBy"),
            record.get("vpcEndpointId"),
            record.get("vpcEndpointAccountId"),
            home,
        )
        return Origin(kind, owner, address, family, vpce)

    # --- SPEC §3, §5 -------------------------------------------------------------------------------

    def apply(self, state: DetectorState, record: Any, only: str | None = None) -> list[FindingChange]:
        """Apply one record to ``state``; return the finding groups it opened or changed.

        ``record`` is the engine's record type (:data:`detector.core.records.Record`: a ``FastRecord``
        of the fast decoder, or a ``StateChange``), or a plain-dict record of the reference decoder
        (:func:`detector.core.records.classify`), converted once. ``only`` (an instance ID) limits the
        record's effect to what concerns that instance: the service applies one routed copy per instance
        (SPEC §10). Raises :class:`MalformedRecord` for an instance-credential record that cannot be
        decided.
        """
        if isinstance(record, dict):
            record = as_record(record)
        self.counters.records += 1
        if record is None:
            return []  # no userIdentity object: nothing to decide
        if type(record) is StateChange:
            if not self._repeated_signal(state, record, only):
                self._signals(state, record, only)
            return []
        name = record.eventName
        signal = type(name) is str and name in SIGNAL_NAMES
        if signal and self._repeated_signal(state, record, only):
            return []  # a repeated delivery of a reset already applied: the same event changes nothing more
        identity = record.userIdentity
        changes: list[FindingChange] = []
        arn = identity.arn
        if identity.type == "AssumedRole" and type(arn) is str:
            parsed = self._arns.get(arn, _MISS)
            if parsed is _MISS:
                parsed = self._session_arn(arn, state)
            if parsed is not None and (only is None or only == parsed[4]):
                changes = self._session_record(state, arn, parsed, record, identity)  # type: ignore[arg-type]
        if name == "AssumeRole" and identity.invokedBy == "ec2.amazonaws.com":
            issued = issuance(record)
            if issued is not None and (only is None or only == issued[5]):
                self._enrich(state, record.eventTime, issued[0], issued[1], issued[6])
        elif signal:
            self._signals(state, record, only)
        return changes

    def _repeated_signal(self, state: DetectorState, record: Record, only: str | None) -> bool:
        """Whether ``record`` is a repeated delivery (same event ID) of an address reset already applied
        (SPEC §13): applied again, it would forget what was learnt since the first delivery."""
        event_id = _signal_id(record)
        if event_id is None:
            return False
        kind, ids, _ = signals(record)
        if kind not in ("start", "reset"):
            return False  # stop signals are idempotent
        for instance_id in ids:
            bits = instance_bits(instance_id) if only is None or instance_id == only else None
            entry = state.lifecycle_entry(bits) if bits is not None else None
            if entry is not None and entry[L_RESET_IDS] and event_id in entry[L_RESET_IDS]:
                return True
        return False

    def _signals(self, state: DetectorState, record: Record, only: str | None) -> None:
        """Apply a record's lifecycle and address signals (SPEC §11, §13) after its own decision (the
        resetting record itself is judged against the old baseline)."""
        kind, ids, instance_state = signals(record)
        if not kind:
            return
        try:
            ts = self._event_time(record.eventTime)
        except MalformedRecord:
            if type(record) is StateChange:
                raise  # nothing else in it: a malformed event
            return  # a signal of a record that is otherwise not ours: best effort
        state.advance(ts)
        for instance_id in ids:
            if only is not None and instance_id != only:
                continue
            bits = instance_bits(instance_id)
            if bits is None:
                continue
            if kind == "stop":
                state.stop_signal(bits, ts, instance_state)  # type: ignore[arg-type]
                continue
            if kind == "start":
                state.start_signal(bits, ts)
            state.reset_signal(bits, ts, _signal_id(record))

    def _session_record(
        self, state: DetectorState, key: str, parsed: tuple[int, str, str, str, str], record: FastRecord, identity: Any
    ) -> list[FindingChange]:
        """One record made with instance credentials (SPEC §3): the session touched, its credentials
        remembered, the decision of SPEC §5, then the rules of §11-§13."""
        packed, _, home, _, _ = parsed
        event_ts = self._event_time(record.eventTime)
        origin = self._call_origin(record, identity, home)  # raises for a source that is not an address
        kind = origin[0]
        by_origin = self.counters.origin
        by_origin[kind] = by_origin.get(kind, 0) + 1  # type: ignore[index,union-attr]
        if event_ts > state.stream_time:
            state.stream_time = event_ts
        s = state.touch(key, packed)
        ix = state.sessions
        access_key = identity.accessKeyId
        if type(access_key) is str:
            ix.add_access_key(s, access_key, event_ts)
        context = identity.sessionContext
        delivery = context.ec2RoleDelivery if context is not None else None
        if type(delivery) is str:
            ix.add_delivery(s, delivery)
        else:
            delivery = None
        changes: list[FindingChange] = []
        # SPEC §5 (an AWS service or an expected network: never a finding, nothing to learn)
        verdict = None if kind == ORIGIN_SERVICE or kind == ORIGIN_EXPECTED else self._decide(ix, s, origin, home)
        if verdict is not None:
            finding_type, remote, severity = verdict
            change = self._record_finding(
                state, ix, s, key, record, identity, event_ts, origin, delivery, finding_type, remote, severity
            )
            if change is not None:
                changes.append(change)
        # SPEC §11-§13: only where they can apply (a lifecycle entry, an inventory, IMDSv1)
        entry = state.lifecycle_entry(packed & _INSTANCE_KEY_MASK) if state.lifecycle else None
        if entry is not None or self._instances or (delivery == "1.0" and self.imdsv1_findings):
            changes += self._part_two(state, s, key, packed, home, origin, delivery, record, identity, event_ts, entry)
        return changes

    def _call_origin(
        self, record: FastRecord, identity: Any, home: str
    ) -> tuple[str, str | None, str | None, int, int, str | None]:
        """:meth:`_origin` of a record, memoized per (source, home account) or, through a VPC endpoint,
        per (source, endpoint, endpoint account) — dropped with the registry or the ranges."""
        if identity.invokedBy:
            return _SERVICE_ORIGIN
        source = record.sourceIPAddress
        vpce = record.vpcEndpointId
        if type(source) is not str:
            return self._origin(source, None, vpce, record.vpcEndpointAccountId, home)  # raises
        vpce_account = None
        memo_key: tuple[Any, ...] | None
        if isinstance(vpce, str) and vpce.startswith("vpce-"):  # no home account in this origin
            vpce_account = record.vpcEndpointAccountId
            memo_key = (source, vpce, vpce_account) if vpce_account is None or type(vpce_account) is str else None
        else:
            memo_key = (source, home)
        origins = self._origins
        hit = origins.get(memo_key) if memo_key is not None else None
        if hit is None:
            hit = self._origin(source, None, vpce, vpce_account, home)  # raises for a non-address
            if memo_key is not None:
                if len(origins) >= self._limit:
                    origins.clear()
                origins[memo_key] = hit
        return hit

    # --- SPEC §11-§13 ------------------------------------------------------------------------------

    def _part_two(
        self, state: DetectorState, s: int, key: str, packed: int, home: str, origin: Any, delivery: str | None,
        record: Any, identity: Any, event_ts: float, entry: list[Any] | None,
    ) -> list[FindingChange]:  # fmt: skip
        """The rules decided independently of SPEC §5 for one instance-credential record: IMDSv1 (§13,
        every origin), use after stop (§11) and from another instance (§12), not for an AWS service."""
        ix = state.sessions
        out: list[FindingChange] = []
        if delivery == "1.0" and self.imdsv1_findings:
            change = self._record_finding(state, ix, s, key, record, identity, event_ts, origin, delivery, IMDSV1, None, LOW)
            if change is not None:
                out.append(change)
        kind = origin[0]
        if kind == ORIGIN_SERVICE:
            return out
        if entry is not None:
            evidence = self._after_stop(entry, ix, s, event_ts, identity.accessKeyId)
            if evidence is not None:
                if origin[2] is not None:
                    evidence["address"] = origin[2]
                change = self._record_finding(
                    state, ix, s, key, record, identity, event_ts, origin, delivery, AFTER_STOP, None, HIGH,
                    evidence=evidence,
                )  # fmt: skip
                if change is not None:
                    out.append(change)
        owner = origin[1]
        if (
            self._instances
            and (kind == ORIGIN_ENDPOINT or kind == ORIGIN_REGISTRY)
            and origin[3]
            and owner is not None
            and (owner == home or self._registry.is_trusted(owner))
        ):
            registry = self._registry
            vpce = origin[5]
            hit = registry.other_instance((origin[3], origin[4]), vpce, _instance_text(packed))
            if hit is not None:
                other, other_account = hit
                evidence = {"otherInstanceId": other, "otherInstanceAccountId": other_account, "address": origin[2]}
                if vpce is not None:
                    evidence["vpcEndpointId"] = vpce
                    vpc = registry.endpoint_vpc.get(vpce)
                    if vpc is not None:
                        evidence["vpc"] = vpc
                change = self._record_finding(
                    state, ix, s, key, record, identity, event_ts, origin, delivery, OTHER_INSTANCE, None, HIGH,
                    other=other, evidence=evidence,
                )  # fmt: skip
                if change is not None:
                    out.append(change)
        return out

    def _after_stop(
        self, entry: list[Any], ix: SessionIndex, s: int, t: float, access_key: Any
    ) -> dict[str, Any] | None:
        """SPEC §11: the evidence when a record at eventTime ``t`` comes after the instance's stop time T
        plus the grace, and the instance has not started since T (clause a) or the record's access key
        was known before T (clause b); else None."""
        grace = self.stop_grace_seconds
        first = ix.key_first_seen(s, access_key) if isinstance(access_key, str) else None
        stop = entry[L_STOP]
        if stop is not None and t > stop + grace:  # the current life stopped at T; no start since
            evidence: dict[str, Any] = {"instanceState": entry[L_STATE], "stoppedAt": stop, "clause": "a"}
        else:
            prev, start = entry[L_PREV], entry[L_START]
            if prev is None or not t > prev + grace:
                return None
            evidence = {"instanceState": entry[L_PREV_STATE], "stoppedAt": prev, "startedAt": start}
            if start is not None and start > t:
                evidence["clause"] = "a"  # the record comes before the instance started again
            elif first is not None and first <= prev:
                evidence["clause"] = "b"
            else:
                return None
        if first is not None:
            evidence["accessKeyFirstSeen"] = first
        return evidence

    def decide(self, session: Session, origin: Origin, home: str) -> tuple[str, str | None, int] | None:
        """The decision table of SPEC §5; updates the session's baseline. ``(type, remote, severity)``."""
        parsed = parse_address(origin.address) if origin.address is not None else None
        value = parsed[1] if parsed is not None else 0
        packed = (origin.kind, origin.owner, origin.address, origin.family, value, origin.vpce)
        if session.attached:
            return self._decide(session._ix, session._s(), packed, home)  # type: ignore[arg-type]
        scratch = SessionIndex()  # a detached session: decide on a copy, then write the baseline back
        key = f"arn:{session.partition}:sts::{session.account}:assumed-role/{session.role}/{session.instance_id}"
        scratch[key] = session
        view = scratch[key]
        verdict = self._decide(scratch, view._s(), packed, home)
        session.endpoints = view.endpoints
        session.addresses = view.addresses
        session.tofu_v4, session.tofu_v6 = view.tofu_v4, view.tofu_v6
        return verdict

    def _decide(
        self, ix: SessionIndex, s: int, origin: tuple[str, str | None, str | None, int, int, str | None], home: str
    ) -> tuple[str, str | None, int] | None:
        kind, owner, address, family, value, vpce = origin
        registry = self.registry
        if kind == ORIGIN_SERVICE or kind == ORIGIN_EXPECTED:
            return None
        if kind == ORIGIN_ENDPOINT or kind == ORIGIN_REGISTRY:
            if owner is None:  # VPC endpoint of unknown owner: remembered, never a finding
                ix.add_endpoint(s, vpce, None)  # type: ignore[arg-type]
                return None
            if owner == home or registry.is_trusted(owner):
                if vpce is not None:
                    ix.add_endpoint(s, vpce, owner)
                elif address is not None:
                    ix.add_address(s, address)
                return None
            return INSIDE_AWS, owner, MEDIUM if registry.is_affiliated(owner) else HIGH
        if kind == ORIGIN_AWS:
            if home in registry.inventoried:
                return INSIDE_AWS, None, HIGH
            if family == V4:
                known = ix.tofu_v4_value(s)
                if known is None:
                    text = ix.tofu_v4(s)  # a restored value not written canonically, compared as text
                    if text is None:
                        ix.set_tofu_v4_value(s, value)  # address is value written canonically
                        return None
                    if text == address:
                        return None
                elif known == value:
                    return None
            else:
                known6 = ix.tofu_v6(s)
                if known6 is None:
                    ix.set_tofu_v6(s, address)
                    return None
                if known6 == address:
                    return None
            return INSIDE_AWS, None, HIGH
        return OUTSIDE_AWS, None, HIGH  # private (no VPC endpoint) or outside AWS

    # --- helpers -----------------------------------------------------------------------------------

    def _enrich(self, state: DetectorState, event_time: Any, key: str, packed: int, access_key: str | None) -> None:
        try:
            event_ts = self._event_time(event_time)
        except MalformedRecord:
            return  # enrichment is best effort; the record itself is never a finding
        self.counters.issuance_records += 1
        state.advance(event_ts)
        s = state.touch(key, packed)
        if access_key:
            state.sessions.add_access_key(s, access_key, event_ts)

    def _record_finding(
        self,
        state: DetectorState,
        ix: SessionIndex,
        s: int,
        key: str,
        record: Any,
        identity: Any,
        event_ts: float,
        origin: tuple[str, str | None, str | None, int, int, str | None],
        delivery: str | None,
        finding_type: str,
        remote: str | None,
        severity: int,
        other: str | None = None,
        evidence: dict[str, Any] | None = None,
    ) -> FindingChange | None:
        ids = self._gids
        gid = ids.get((finding_type, key, remote, other))
        if gid is None:
            if len(ids) >= self._limit:
                ids.clear()
            gid = ids[(finding_type, key, remote, other)] = finding_id(finding_type, key, remote, other)
        group = state.groups.get(gid)
        event_id = record.eventID
        new = group is None
        kind, _, address, _, _, vpce = origin
        if group is None:
            instance_id, account, role, partition = ix.parts(s)
            group = FindingGroup(
                id=gid,
                type=finding_type,
                session_key=key,
                remote_account=remote,
                count=0,
                first_ts=event_ts,
                last_ts=event_ts,
                account=account,
                partition=partition,
                role=role,
                instance_id=instance_id,
                remote_addresses=[],
                baseline=ix.baseline(s),
                deliveries=[],
                created_at=state.stream_time,
                event_ids=[],
                version=0,
                other_instance=other,
            )
            state.groups[gid] = group
            groups = ix.groups(s)
            if gid not in groups:
                ix.set_groups(s, groups + (gid,))
        elif isinstance(event_id, str) and event_id in group.event_ids:
            return None  # the same CloudTrail event delivered again: already counted
        group.count += 1
        group.version += 1
        if isinstance(event_id, str):
            group.event_ids.append(event_id)
            if len(group.event_ids) > MAX_EVENT_IDS:
                del group.event_ids[0]
        group.first_ts = min(group.first_ts, event_ts)
        group.last_ts = max(group.last_ts, event_ts)
        group.severity = severity
        group.affiliated = self.registry.is_affiliated(remote) if remote else False
        region = record.awsRegion
        group.region = region if isinstance(region, str) else group.region
        access_key = identity.accessKeyId
        group.access_key_id = access_key if isinstance(access_key, str) else (ix.access_keys(s)[-1:] or [None])[0]
        principal = identity.principalId
        group.principal_id = principal if isinstance(principal, str) else group.principal_id
        api = record.eventName
        group.api = api if isinstance(api, str) else group.api
        service_name = record.eventSource
        group.service_name = service_name if isinstance(service_name, str) else group.service_name
        group.ip = address
        group.origin = kind
        group.vpce = vpce
        if address and address not in group.remote_addresses and len(group.remote_addresses) < MAX_REMOTE_ADDRESSES:
            group.remote_addresses.append(address)
        if delivery is not None and delivery not in group.deliveries:
            group.deliveries.append(delivery)
        if evidence is not None:
            group.evidence = evidence
        _count_call(group, record)
        group.updated_at = state.stream_time
        state.note_group(group)
        return FindingChange(group, new)


def _signal_id(record: Record) -> str | None:
    """The event ID of a signal record: CloudTrail's ``eventID``, or an EventBridge event's ``id``."""
    event_id = record.id if type(record) is StateChange else record.eventID
    return event_id if isinstance(event_id, str) else None


def _count_call(group: FindingGroup, record: FastRecord) -> None:
    """SPEC §13: the group's eventSource/eventName pairs and errorCodes, counted (bounded)."""
    source, name = record.eventSource, record.eventName
    pair = f"{source if type(source) is str else ''}\x1f{name if type(name) is str else ''}"
    calls = group.api_calls
    count = calls.get(pair)
    if count is not None:  # the usual case: a pair seen before
        calls[pair] = count + 1
    elif len(calls) < MAX_API_PAIRS:
        calls[pair] = 1
    else:
        calls[OTHER] = calls.get(OTHER, 0) + 1
    code = record.errorCode
    if code is not None:
        code = code if isinstance(code, str) else str(code)
        codes = group.error_codes
        if codes is None:
            codes = group.error_codes = {}
        if code not in codes and len(codes) >= MAX_ERROR_CODES:
            code = OTHER
        codes[code] = codes.get(code, 0) + 1


def _instance_text(packed: int) -> str:
    bits = packed & _INSTANCE_KEY_MASK
    return instance_text(bits)
