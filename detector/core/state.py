"""Detector state: the session index (SPEC §6) and the open finding groups (SPEC §8).

Plain data with ``__slots__``; no I/O. The index is an ``OrderedDict`` in least-recently-used order, so
both the idle TTL and the LRU cap evict from the front in O(evicted). Time is *stream time* (the latest
``eventTime`` seen), so replay and service age entries identically and a backtest over days of logs
behaves as the live service did.

Every entry and group can be turned into plain JSON-ready data and back (``to_data``/``from_data``):
the changelog that makes state survive restarts (issue 4) stores exactly that.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_ACCESS_KEYS = 4  # recent access key IDs kept per session (credentials rotate every few hours)
MAX_REMOTE_ADDRESSES = 16
MAX_EVENT_IDS = 64  # recent eventIDs per finding group: CloudTrail may deliver an event twice


@dataclass(slots=True)
class EngineConfig:
    session_ttl_seconds: float = 12 * 3600.0
    max_sessions: int = 1_000_000
    finding_ttl_seconds: float = 7 * 24 * 3600.0
    max_findings: int = 100_000


class Session:
    """One instance-credential session, keyed by role session ARN (kept as the dict key)."""

    __slots__ = (
        "instance_id",
        "account",
        "role",
        "partition",
        "first_seen",
        "last_seen",
        "access_keys",
        "deliveries",
        "endpoints",
        "addresses",
        "tofu_v4",
        "tofu_v6",
        "groups",
    )

    def __init__(self, instance_id: str, account: str, role: str, partition: str, now: float) -> None:
        self.instance_id = instance_id
        self.account = account
        self.role = role
        self.partition = partition
        self.first_seen = now
        self.last_seen = now
        self.access_keys: tuple[str, ...] = ()
        self.deliveries: tuple[str, ...] = ()  # ec2RoleDelivery values seen ("1.0", "2.0")
        self.endpoints: dict[str, str | None] | None = None  # baseline VPC endpoints -> owner
        self.addresses: tuple[str, ...] = ()  # baseline addresses owned by home/trusted accounts
        self.tofu_v4: str | None = None  # first AWS (owner unknown) IPv4 seen: trust on first use
        self.tofu_v6: str | None = None
        self.groups: tuple[str, ...] = ()  # ids of finding groups opened for this session

    def add_access_key(self, key: str) -> None:
        keys = self.access_keys
        if keys and keys[-1] == key:
            return
        if key in keys:
            keys = tuple(k for k in keys if k != key)
        self.access_keys = (keys + (key,))[-MAX_ACCESS_KEYS:]

    def add_delivery(self, value: str) -> None:
        if value not in self.deliveries:
            self.deliveries = self.deliveries + (value,)

    def add_endpoint(self, vpce: str, owner: str | None) -> None:
        if self.endpoints is None:
            self.endpoints = {}
        if self.endpoints.get(vpce) is None:
            self.endpoints[vpce] = owner

    def add_address(self, address: str) -> None:
        if address not in self.addresses and len(self.addresses) < MAX_REMOTE_ADDRESSES:
            self.addresses = self.addresses + (address,)

    def baseline(self) -> dict[str, Any]:
        return {
            "vpcEndpoints": [
                {"vpcEndpointId": vpce, "ownerAccountId": owner} for vpce, owner in (self.endpoints or {}).items()
            ],
            "addresses": list(self.addresses),
            "firstUseIpv4": self.tofu_v4,
            "firstUseIpv6": self.tofu_v6,
        }

    def to_data(self) -> dict[str, Any]:
        return {
            "instanceId": self.instance_id,
            "account": self.account,
            "role": self.role,
            "partition": self.partition,
            "firstSeen": self.first_seen,
            "lastSeen": self.last_seen,
            "accessKeys": list(self.access_keys),
            "deliveries": list(self.deliveries),
            "endpoints": self.endpoints or {},
            "addresses": list(self.addresses),
            "tofuV4": self.tofu_v4,
            "tofuV6": self.tofu_v6,
            "groups": list(self.groups),
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Session:
        s = cls(data["instanceId"], data["account"], data["role"], data["partition"], data["firstSeen"])
        s.last_seen = data["lastSeen"]
        s.access_keys = tuple(data.get("accessKeys", ()))
        s.deliveries = tuple(data.get("deliveries", ()))
        s.endpoints = dict(data["endpoints"]) if data.get("endpoints") else None
        s.addresses = tuple(data.get("addresses", ()))
        s.tofu_v4 = data.get("tofuV4")
        s.tofu_v6 = data.get("tofuV6")
        s.groups = tuple(data.get("groups", ()))
        return s


class FindingGroup:
    """One finding: every record of (type, session, remote account) aggregated (SPEC §8)."""

    __slots__ = (
        "id",
        "type",
        "session_key",
        "remote_account",
        "affiliated",
        "severity",
        "count",
        "first_ts",
        "last_ts",
        "account",
        "region",
        "partition",
        "role",
        "instance_id",
        "access_key_id",
        "principal_id",
        "api",
        "service_name",
        "ip",
        "origin",
        "vpce",
        "remote_addresses",
        "baseline",
        "deliveries",
        "created_at",
        "updated_at",
        "event_ids",
        "version",
    )

    def __init__(self, **values: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, values.get(name))

    def to_data(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__slots__}
        data["remote_addresses"] = list(self.remote_addresses)
        data["deliveries"] = list(self.deliveries)
        data["event_ids"] = list(self.event_ids)
        return data

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> FindingGroup:
        group = cls(**data)
        group.remote_addresses = list(data.get("remote_addresses") or [])
        group.deliveries = list(data.get("deliveries") or [])
        group.event_ids = list(data.get("event_ids") or [])
        return group


class DetectorState:
    """Everything the detector remembers; mutated only by :func:`detector.core.engine.apply`."""

    __slots__ = (
        "config",
        "sessions",
        "groups",
        "stream_time",
        "expired",
        "evicted",
        "changed",
        "removed",
        "track_changes",
        "_next_sweep",
    )

    def __init__(self, config: EngineConfig | None = None, track_changes: bool = False) -> None:
        self.config = config or EngineConfig()
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.groups: dict[str, FindingGroup] = {}
        self.stream_time = 0.0
        self.expired = 0  # sessions dropped by idle TTL
        self.evicted = 0  # sessions dropped by the LRU cap
        # Change tracking for the changelog: keys written since the last drain.
        self.track_changes = track_changes
        self.changed: set[str] = set()
        self.removed: set[str] = set()
        self._next_sweep = 0.0

    def advance(self, event_time: float) -> float:
        if event_time > self.stream_time:
            self.stream_time = event_time
        return self.stream_time

    def session(self, key: str, instance_id: str, account: str, role: str, partition: str) -> Session:
        """The live entry for ``key``, created if absent or idle past the TTL; marks it used."""
        now = self.stream_time
        sessions = self.sessions
        entry = sessions.get(key)
        if entry is not None:
            if now - entry.last_seen > self.config.session_ttl_seconds:
                del sessions[key]
                self.expired += 1
                entry = None
            else:
                sessions.move_to_end(key)
        if entry is None:
            entry = Session(instance_id, account, role, partition, now)
            sessions[key] = entry
            if len(sessions) > self.config.max_sessions:
                old_key, _ = sessions.popitem(last=False)
                self.evicted += 1
                self._note_removed(old_key)
        entry.last_seen = now
        if self.track_changes:
            self.changed.add(key)
            self.removed.discard(key)
        if now >= self._next_sweep:
            self.sweep()
        return entry

    def _note_removed(self, key: str) -> None:
        if self.track_changes:
            self.removed.add(key)
            self.changed.discard(key)

    def sweep(self) -> None:
        """Drop sessions idle past the TTL (front of the LRU order) and stale finding groups."""
        now = self.stream_time
        horizon = now - self.config.session_ttl_seconds
        sessions = self.sessions
        while sessions:
            key, entry = next(iter(sessions.items()))
            if entry.last_seen >= horizon:
                break
            del sessions[key]
            self.expired += 1
            self._note_removed(key)
        group_horizon = now - self.config.finding_ttl_seconds
        stale = [gid for gid, g in self.groups.items() if g.last_ts < group_horizon]
        if len(self.groups) - len(stale) > self.config.max_findings:
            by_age = sorted(self.groups.values(), key=lambda g: g.last_ts)
            stale = [g.id for g in by_age[: len(self.groups) - self.config.max_findings]]
        for gid in stale:
            del self.groups[gid]
            if self.track_changes:
                self.removed.add("g:" + gid)
                self.changed.discard("g:" + gid)
        self._next_sweep = now + 60.0

    def note_group(self, group: FindingGroup) -> None:
        if self.track_changes:
            self.changed.add("g:" + group.id)

    def drain_changes(self) -> tuple[set[str], set[str]]:
        changed, removed = self.changed, self.removed
        self.changed, self.removed = set(), set()
        return changed, removed
