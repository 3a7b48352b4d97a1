"""Detector state: the session index (SPEC §6) and the open finding groups (SPEC §8).

No I/O. Time is *stream time* (the latest ``eventTime`` seen), so replay and service age entries
identically and a backtest over days of logs behaves as the live service did.

The session index is built for a million entries in a few hundred megabytes at most: there is no Python
object per session. A session key (the role session ARN ``arn:<p>:sts::<account>:assumed-role/<role>/
<instance>``) is packed into one integer — an interned id of the ``(partition, account, role)`` prefix
shared by every instance of the role, plus the instance ID's hex digits — and maps to a *slot*. Each
field of a session lives in a column (``array``/``bytearray``) at that slot: first/last seen, the newest
access key (20 bytes), ``ec2RoleDelivery`` values (a code), the trust-on-first-use IPv4 address (4
bytes), the first baseline endpoint and address (interned ids), LRU links. A session's finding ids and
its access keys older than the newest (packed bytes) are in two small tables of the sessions that have
them; what few sessions carry more (several endpoints or addresses, an IPv6 first-use address, odd
values) keeps it in a side table. See docs/performance.md for the measured bytes per session.

``DetectorState.sessions`` is a :class:`SessionIndex`: a mapping from session key (the ARN string) to
:class:`Session`, in least-recently-used order, with the ``OrderedDict`` operations the changelog and
the service use (``get``, ``[key] = session``, ``move_to_end``, ``pop``, ``popitem``, iteration). A
``Session`` read from it is a *view* of the slot: reading and writing it reads and writes the index.
A ``Session`` built directly (``Session(...)``, ``Session.from_data``) is detached until stored.

Every entry and group can be turned into plain JSON-ready data and back (``to_data``/``from_data``):
the changelog that makes state survive restarts (issue 4) stores exactly that.
"""

from __future__ import annotations

import re
import socket
import struct
import sys
from array import array
from collections.abc import Iterator
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


# --- session keys ----------------------------------------------------------------------------------

# The role is an IAM role name, or the reserved ``aws:ec2-instance`` (SPEC §10); other ``aws:`` roles
# (``:`` is not in IAM role names) never match.
SESSION_ARN = re.compile(
    r"arn:([a-z][a-z0-9-]*):sts::([0-9]{12}):assumed-role/([\w+=,.@-]{1,128}|aws:ec2-instance)/i-([0-9a-f]{17}|[0-9a-f]{8})"
)
_INSTANCE_BITS = 68  # 17 hex digits
_SHORT_BIT = 1 << _INSTANCE_BITS  # set for an 8-digit instance ID
_PREFIX_SHIFT = _INSTANCE_BITS + 1
_INSTANCE_MASK = (1 << _INSTANCE_BITS) - 1

# Interned (partition, account, role) prefixes, shared by every index in the process: a role has many
# instances, so the strings are stored once. Grows with the number of distinct instance roles seen.
_PREFIX_IDS: dict[tuple[str, str, str], int] = {}
_PREFIXES: list[tuple[str, str, str, str]] = []  # (partition, account, role, "arn:...:assumed-role/<role>/")


def _prefix_id(partition: str, account: str, role: str) -> int:
    triple = (partition, account, role)
    pid = _PREFIX_IDS.get(triple)
    if pid is None:
        pid = len(_PREFIXES)
        _PREFIXES.append((partition, account, role, f"arn:{partition}:sts::{account}:assumed-role/{role}/"))
        _PREFIX_IDS[triple] = pid
    return pid


def pack_key(partition: str, account: str, role: str, instance_id: str) -> int:
    """The packed form of ``arn:<partition>:sts::<account>:assumed-role/<role>/<instance_id>``."""
    digits = instance_id[2:]
    value = int(digits, 16)
    if len(digits) == 8:
        value |= _SHORT_BIT
    return (_prefix_id(partition, account, role) << _PREFIX_SHIFT) | value


def parse_session_key(arn: str) -> tuple[int, str, str, str, str] | None:
    """``(packed key, partition, account, role, instance_id)`` for a role session ARN of an instance."""
    m = SESSION_ARN.fullmatch(arn)
    if m is None:
        return None
    partition, account, role, digits = m.groups()
    value = int(digits, 16) | (_SHORT_BIT if len(digits) == 8 else 0)
    return (_prefix_id(partition, account, role) << _PREFIX_SHIFT) | value, partition, account, role, "i-" + digits


def _instance_id(packed: int) -> str:
    value = packed & _INSTANCE_MASK
    return f"i-{value:08x}" if packed & _SHORT_BIT else f"i-{value:017x}"


def key_string(packed: int | str) -> str:
    """The session key (ARN string) of a packed key (an unpackable key is kept as its string)."""
    if isinstance(packed, str):
        return packed
    return _PREFIXES[packed >> _PREFIX_SHIFT][3] + _instance_id(packed)


_INSTANCE_KEY_MASK = _SHORT_BIT | _INSTANCE_MASK


def instance_bits(instance_id: Any) -> int | None:
    """The instance part of a packed key for an instance ID (``i-`` + 8 or 17 lowercase hex), else None:
    the key of the instance's lifecycle entry."""
    if type(instance_id) is not str or not _INSTANCE_ID.fullmatch(instance_id):
        return None
    digits = instance_id[2:]
    return int(digits, 16) | (_SHORT_BIT if len(digits) == 8 else 0)


def instance_text(bits: int) -> str:
    return _instance_id(bits)


_INSTANCE_ID = re.compile(r"i-(?:[0-9a-f]{17}|[0-9a-f]{8})")


def _key_parts(packed: int) -> tuple[str, str, str, str]:
    """``(instance_id, account, role, partition)`` of a packed key."""
    partition, account, role, _ = _PREFIXES[packed >> _PREFIX_SHIFT]
    return _instance_id(packed), account, role, partition


def _pack_any(key: str) -> int | str:
    parsed = parse_session_key(key) if isinstance(key, str) else None
    if parsed is None:
        if not isinstance(key, str):
            raise TypeError(f"session keys are strings, got {type(key).__name__}")
        return key
    return parsed[0]


# --- interned baseline values ----------------------------------------------------------------------

_INTERN_LIMIT = 1 << 22  # beyond this many distinct values, new ones go to the side table instead


class _Interned:
    """Values shared by many sessions (VPC endpoint/owner pairs, home-network addresses) as small ids."""

    __slots__ = ("ids", "values")

    def __init__(self) -> None:
        self.ids: dict[Any, int] = {}
        self.values: list[Any] = [None]  # id 0 means "none"

    def id(self, value: Any) -> int:
        i = self.ids.get(value)
        if i is None:
            if len(self.values) >= _INTERN_LIMIT:
                return 0
            i = len(self.values)
            self.values.append(value)
            self.ids[value] = i
        return i


_ENDPOINTS = _Interned()  # (vpce, owner or None)
_ADDRESSES = _Interned()  # baseline address strings

# --- per-slot columns ------------------------------------------------------------------------------

# Bits of the flags byte.
F_AK = 0x01  # the newest access key is in the 20-byte access key column
F_TOFU4 = 0x02  # the trust-on-first-use IPv4 address is set
F_EXTRA = 0x04  # the slot has an entry in the side table
F_GROUPS = 0x40  # the slot has finding groups (in the groups table: one id, or a tuple of several)
F_OLDER = 0x80  # the access keys older than the newest are in the older-keys table (packed bytes)
_DELIVERY_SHIFT = 3  # bits 3-5: the ec2RoleDelivery values seen, as a code
_DELIVERY_MASK = 0x38
_DELIVERY_CODES: dict[tuple[str, ...], int] = {(): 0, ("1.0",): 1, ("2.0",): 2, ("1.0", "2.0"): 3, ("2.0", "1.0"): 4}
_DELIVERY_TUPLES: dict[int, tuple[str, ...]] = {v: k for k, v in _DELIVERY_CODES.items()}
_DELIVERY_SEEN = frozenset((code, v) for values, code in _DELIVERY_CODES.items() for v in values)
_DELIVERY_EXTRA = 7  # other values: the tuple is in the side table
_AK_LEN = 20
_OLDER_LEN = _AK_LEN + 8  # an older access key and its first-seen time, in SessionIndex._old
_ZERO_AK = bytes(_AK_LEN)

# Side-table entry: a list indexed by these.
X_KEYS = 0  # access keys older than the newest (F_AK set), or all of them (F_AK clear)
X_DELIVERIES = 1
X_ENDPOINTS = 2  # dict vpce -> owner, when there are several (else the endpoint column)
X_ADDRESSES = 3  # tuple, when there are several (else the address column)
X_TOFU6 = 4
X_GROUPS = 5  # unused in the side table (the groups table holds them); kept in the changelog's side entry
X_PARTS = 6  # (instance_id, account, role, partition) when not derived from the key
X_TOFU4 = 7  # a first-use IPv4 address not written canonically (never made by the engine)
X_KEY_TIMES = 8  # first-seen times of the X_KEYS keys (a parallel tuple; None: unknown), SPEC §11
_X_EMPTY = ((), None, None, None, None, (), None, None, ())

_NONE = -1
_UNKNOWN = float("nan")  # an access key's first-seen time that is not known
_OLDER_TIMES = [struct.Struct(f"<{n}d") for n in range(MAX_ACCESS_KEYS)]  # by number of older keys
_GROW_MIN = 1024


def _ipv4_text(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))


def _ipv4_value(text: str) -> int | None:
    """The integer of a dotted-quad IPv4 address written canonically, else None."""
    try:
        packed = socket.inet_aton(text)
    except (OSError, ValueError):
        return None
    value = int.from_bytes(packed, "big")
    return value if _ipv4_text(value) == text else None


def _ak_bytes(key: str) -> bytes | None:
    if len(key) == _AK_LEN and key.isascii():
        return key.encode("ascii")
    return None


class SessionIndex:
    """The session index: session key -> :class:`Session`, least recently used first (see module doc)."""

    __slots__ = (
        "_slots",
        "_keys",
        "_prev",
        "_next",
        "_head",
        "_tail",
        "_first",
        "_last",
        "_ak",
        "_flags",
        "_tofu4",
        "_ep",
        "_addr",
        "_akt",
        "_extra",
        "_grp",
        "_old",
        "_free",
        "_cap",
    )

    def __init__(self) -> None:
        self._slots: dict[int | str, int] = {}
        self._keys: list[int | str | None] = []
        self._prev = array("i")
        self._next = array("i")
        self._head = _NONE
        self._tail = _NONE
        self._first = array("d")
        self._last = array("d")
        self._ak = bytearray()
        self._flags = bytearray()
        self._tofu4 = array("I")
        self._ep = array("I")
        self._addr = array("I")
        self._akt = array("d")  # first-seen eventTime of the newest access key (F_AK set), SPEC §11
        self._extra: dict[int, list[Any]] = {}
        # Finding group ids by slot: the one id itself, or a tuple of several. About a fifth of sessions
        # have a group (SPEC §13's IMDSv1 group): a side-table entry each cost ~250 bytes, this ~75.
        self._grp: dict[int, str | tuple[str, ...]] = {}
        # Access keys older than the newest, when each is a 20-character ASCII key (always, from AWS):
        # per key its 20 bytes and its first-seen time (a double, NaN: unknown), packed in one bytes
        # object — ~140 bytes a rotated session against ~400 for a side-table entry of tuples.
        self._old: dict[int, bytes] = {}
        self._free: list[int] = []
        self._cap = 0

    # --- slots -----------------------------------------------------------------------------------

    def _grow(self) -> None:
        old = self._cap
        add = max(_GROW_MIN, old >> 3)
        self._keys.extend([None] * add)
        zeros_i = array("i", bytes(4 * add))
        self._prev.extend(zeros_i)
        self._next.extend(zeros_i)
        zeros_d = array("d", bytes(8 * add))
        self._first.extend(zeros_d)
        self._last.extend(zeros_d)
        self._ak.extend(bytes(_AK_LEN * add))
        self._flags.extend(bytes(add))
        zeros_u = array("I", bytes(4 * add))
        self._tofu4.extend(zeros_u)
        self._ep.extend(zeros_u)
        self._addr.extend(zeros_u)
        self._akt.extend(zeros_d)
        self._cap = old + add
        self._free.extend(range(old + add - 1, old - 1, -1))  # popped from the end: lowest first

    def _new_slot(self, packed: int | str, now: float) -> int:
        """A fresh slot for ``packed``, linked at the most recently used end."""
        if not self._free:
            self._grow()
        s = self._free.pop()
        self._keys[s] = packed
        self._slots[packed] = s
        self._first[s] = now
        self._last[s] = now
        self._flags[s] = 0
        self._ep[s] = 0
        self._addr[s] = 0
        self._link_tail(s)
        return s

    def _link_tail(self, s: int) -> None:
        """Link the unlinked slot ``s`` at the most recently used end."""
        tail = self._tail
        self._prev[s] = tail
        self._next[s] = _NONE
        if tail == _NONE:
            self._head = s
        else:
            self._next[tail] = s
        self._tail = s

    def _unlink(self, s: int) -> None:
        p = self._prev[s]
        n = self._next[s]
        if p == _NONE:
            self._head = n
        else:
            self._next[p] = n
        if n == _NONE:
            self._tail = p
        else:
            self._prev[n] = p

    def _touch(self, s: int) -> None:
        """Move slot ``s`` to the most recently used end (``DetectorState.touch`` inlines this)."""
        if s != self._tail:
            self._unlink(s)
            self._link_tail(s)

    def _drop(self, s: int) -> int | str:
        """Remove slot ``s``; return its packed key."""
        packed = self._keys[s]
        assert packed is not None
        self._unlink(s)
        del self._slots[packed]
        self._keys[s] = None
        self._drop_sides(s)
        self._flags[s] = 0
        self._free.append(s)
        return packed

    def _drop_sides(self, s: int) -> None:
        """Forget slot ``s``'s side-table entries (extras, finding group ids, older keys); the caller sets
        its flags."""
        flags = self._flags[s]
        if flags & F_EXTRA:
            del self._extra[s]
        if flags & F_GROUPS:
            del self._grp[s]
        if flags & F_OLDER:
            del self._old[s]

    def _x(self, s: int) -> list[Any]:
        """The side-table entry of ``s``, created empty if absent."""
        if self._flags[s] & F_EXTRA:
            return self._extra[s]
        entry = list(_X_EMPTY)
        self._extra[s] = entry
        self._flags[s] |= F_EXTRA
        return entry

    def _xget(self, s: int, field: int) -> Any:
        if self._flags[s] & F_EXTRA:
            return self._extra[s][field]
        return _X_EMPTY[field]

    # --- field access by slot (the engine's hot path uses these) ---------------------------------

    def parts(self, s: int) -> tuple[str, str, str, str]:
        """``(instance_id, account, role, partition)``."""
        override = self._xget(s, X_PARTS)
        if override is not None:
            return override  # type: ignore[no-any-return]
        packed = self._keys[s]
        assert isinstance(packed, int)
        return _key_parts(packed)

    def _older(self, s: int) -> tuple[tuple[str, ...], tuple[float | None, ...]]:
        """The access keys older than the newest, and their first-seen times (``()``: none known)."""
        if self._flags[s] & F_OLDER:
            raw = self._old[s]
            n = len(raw) // _OLDER_LEN
            times = _OLDER_TIMES[n].unpack_from(raw, n * _AK_LEN)
            keys = tuple(raw[i * _AK_LEN : (i + 1) * _AK_LEN].decode("ascii") for i in range(n))
            return keys, tuple(None if v != v else v for v in times)
        return self._xget(s, X_KEYS), self._xget(s, X_KEY_TIMES)

    def _set_older(self, s: int, older: tuple[str, ...], older_times: tuple[float | None, ...]) -> None:
        flags = self._flags[s]
        if flags & F_OLDER:
            del self._old[s]
            self._flags[s] = flags = flags & ~F_OLDER & 0xFF
        if older and len(older) < len(_OLDER_TIMES) and all(len(k) == _AK_LEN and k.isascii() for k in older):
            n = len(older)
            self._old[s] = "".join(older).encode("ascii") + _OLDER_TIMES[n].pack(
                *(_UNKNOWN if v is None else v for v in older_times)
            )
            self._flags[s] = flags | F_OLDER
            older, older_times = (), ()
        if older or flags & F_EXTRA:
            x = self._x(s)
            x[X_KEYS] = older
            x[X_KEY_TIMES] = older_times if any(t is not None for t in older_times) else ()

    def access_keys(self, s: int) -> tuple[str, ...]:
        older = self._older(s)[0] if self._flags[s] & (F_OLDER | F_EXTRA) else ()
        if self._flags[s] & F_AK:
            base = s * _AK_LEN
            return (*older, self._ak[base : base + _AK_LEN].decode("ascii"))
        return older  # type: ignore[no-any-return]

    def key_times(self, s: int) -> tuple[float | None, ...]:
        """First-seen eventTimes of :meth:`access_keys` (parallel; None where unknown)."""
        older, times = self._older(s)
        if len(times) != len(older):
            times = (None,) * len(older)
        if self._flags[s] & F_AK:
            t = self._akt[s]
            return (*times, None if t != t else t)  # NaN: unknown
        return times  # type: ignore[no-any-return]

    def key_first_seen(self, s: int, key: str) -> float | None:
        """When ``key`` was first known for this session (the earliest eventTime it was seen or issued at)."""
        for k, t in zip(self.access_keys(s), self.key_times(s)):
            if k == key:
                return t
        return None

    def set_access_keys(self, s: int, keys: tuple[str, ...], times: tuple[float | None, ...] | None = None) -> None:
        keys = tuple(keys)
        times = tuple(times) if times is not None and len(times) == len(keys) else (None,) * len(keys)
        raw = _ak_bytes(keys[-1]) if keys else None
        if raw is not None:
            base = s * _AK_LEN
            self._ak[base : base + _AK_LEN] = raw
            self._flags[s] |= F_AK
            newest = times[-1]
            self._akt[s] = _UNKNOWN if newest is None else newest
            older, older_times = keys[:-1], times[:-1]
        else:
            self._flags[s] &= ~F_AK & 0xFF
            older, older_times = keys, times
        self._set_older(s, older, older_times)

    def add_access_key(self, s: int, key: str, ts: float | None = None) -> None:
        """Remember ``key`` as the newest access key, seen (or issued) at eventTime ``ts``."""
        flags = self._flags[s]
        if flags & F_AK and len(key) == _AK_LEN and key.isascii():  # the usual case: the newest again
            base = s * _AK_LEN
            if self._ak.startswith(key.encode("ascii"), base, base + _AK_LEN):
                if ts is not None and not ts >= self._akt[s]:  # earlier, or the time was unknown (NaN)
                    self._akt[s] = ts
                return
        elif not flags & (F_AK | F_EXTRA):  # a session's first key: set_access_keys(s, (key,)), inlined
            raw = _ak_bytes(key)
            if raw is not None:
                base = s * _AK_LEN
                self._ak[base : base + _AK_LEN] = raw
                self._flags[s] = flags | F_AK
                self._akt[s] = _UNKNOWN if ts is None else ts
                return
        keys = self.access_keys(s)
        times = self.key_times(s)
        if keys and keys[-1] == key:
            known = times[-1]
            if ts is not None and (known is None or ts < known):
                self.set_access_keys(s, keys, times[:-1] + (ts,))
            return
        if key in keys:
            i = keys.index(key)
            known = times[i]
            if ts is None or (known is not None and known < ts):
                ts = known
            keys, times = keys[:i] + keys[i + 1 :], times[:i] + times[i + 1 :]
        self.set_access_keys(s, (keys + (key,))[-MAX_ACCESS_KEYS:], (times + (ts,))[-MAX_ACCESS_KEYS:])

    def deliveries(self, s: int) -> tuple[str, ...]:
        code = (self._flags[s] & _DELIVERY_MASK) >> _DELIVERY_SHIFT
        if code == _DELIVERY_EXTRA:
            return self._extra[s][X_DELIVERIES]  # type: ignore[no-any-return]
        return _DELIVERY_TUPLES[code]

    def set_deliveries(self, s: int, values: tuple[str, ...]) -> None:
        values = tuple(values)
        code = _DELIVERY_CODES.get(values)
        if code is None:
            self._x(s)[X_DELIVERIES] = values
            code = _DELIVERY_EXTRA
        elif self._flags[s] & F_EXTRA:
            self._extra[s][X_DELIVERIES] = None
        self._flags[s] = (self._flags[s] & ~_DELIVERY_MASK & 0xFF) | (code << _DELIVERY_SHIFT)

    def add_delivery(self, s: int, value: str) -> None:
        if ((self._flags[s] & _DELIVERY_MASK) >> _DELIVERY_SHIFT, value) in _DELIVERY_SEEN:
            return
        values = self.deliveries(s)
        if value not in values:
            self.set_deliveries(s, values + (value,))

    def endpoints(self, s: int) -> dict[str, str | None] | None:
        several = self._xget(s, X_ENDPOINTS)
        if several is not None:
            return dict(several)
        ep = self._ep[s]
        if ep:
            vpce, owner = _ENDPOINTS.values[ep]
            return {vpce: owner}
        return None

    def set_endpoints(self, s: int, endpoints: dict[str, str | None] | None) -> None:
        if self._flags[s] & F_EXTRA:
            self._extra[s][X_ENDPOINTS] = None
        self._ep[s] = 0
        if not endpoints:
            return
        if len(endpoints) == 1:
            ((vpce, owner),) = endpoints.items()
            ep = _ENDPOINTS.id((vpce, owner))
            if ep:
                self._ep[s] = ep
                return
        self._x(s)[X_ENDPOINTS] = dict(endpoints)

    def add_endpoint(self, s: int, vpce: str, owner: str | None) -> None:
        ep = self._ep[s]
        if ep:
            known, known_owner = _ENDPOINTS.values[ep]
            if known == vpce:
                if known_owner is None and owner is not None:
                    self.set_endpoints(s, {vpce: owner})
                return
        endpoints = self.endpoints(s) or {}
        if endpoints.get(vpce) is None:
            endpoints[vpce] = owner
            self.set_endpoints(s, endpoints)

    def addresses(self, s: int) -> tuple[str, ...]:
        several = self._xget(s, X_ADDRESSES)
        if several is not None:
            return several  # type: ignore[no-any-return]
        a = self._addr[s]
        return (_ADDRESSES.values[a],) if a else ()

    def set_addresses(self, s: int, addresses: tuple[str, ...]) -> None:
        addresses = tuple(addresses)
        if self._flags[s] & F_EXTRA:
            self._extra[s][X_ADDRESSES] = None
        self._addr[s] = 0
        if not addresses:
            return
        if len(addresses) == 1:
            a = _ADDRESSES.id(addresses[0])
            if a:
                self._addr[s] = a
                return
        self._x(s)[X_ADDRESSES] = addresses

    def add_address(self, s: int, address: str) -> None:
        addresses = self.addresses(s)
        if address not in addresses and len(addresses) < MAX_REMOTE_ADDRESSES:
            self.set_addresses(s, addresses + (address,))

    def tofu_v4(self, s: int) -> str | None:
        if self._flags[s] & F_TOFU4:
            return _ipv4_text(self._tofu4[s])
        return self._xget(s, X_TOFU4)  # type: ignore[no-any-return]

    def tofu_v4_value(self, s: int) -> int | None:
        """The first-use IPv4 address as an integer (what the engine compares)."""
        return self._tofu4[s] if self._flags[s] & F_TOFU4 else None

    def set_tofu_v4_value(self, s: int, value: int) -> None:
        """:meth:`set_tofu_v4` for an address already parsed and written canonically."""
        self._tofu4[s] = value
        self._flags[s] |= F_TOFU4
        if self._flags[s] & F_EXTRA:
            self._extra[s][X_TOFU4] = None

    def set_tofu_v4(self, s: int, address: str | None) -> None:
        value = _ipv4_value(address) if address is not None else None
        if value is not None:
            self.set_tofu_v4_value(s, value)
            return
        self._flags[s] &= ~F_TOFU4 & 0xFF
        if address is not None or self._flags[s] & F_EXTRA:  # not written canonically: kept as text
            self._x(s)[X_TOFU4] = address

    def tofu_v6(self, s: int) -> str | None:
        return self._xget(s, X_TOFU6)  # type: ignore[no-any-return]

    def set_tofu_v6(self, s: int, address: str | None) -> None:
        if address is not None or self._flags[s] & F_EXTRA:
            self._x(s)[X_TOFU6] = address

    def groups(self, s: int) -> tuple[str, ...]:
        if self._flags[s] & F_GROUPS:
            g = self._grp[s]
            return (g,) if type(g) is str else g  # type: ignore[return-value]
        return ()

    def set_groups(self, s: int, groups: tuple[str, ...]) -> None:
        groups = tuple(groups)
        if groups:
            self._grp[s] = groups[0] if len(groups) == 1 and type(groups[0]) is str else groups
            self._flags[s] |= F_GROUPS
        elif self._flags[s] & F_GROUPS:
            del self._grp[s]
            self._flags[s] &= ~F_GROUPS & 0xFF

    def set_parts(self, s: int, parts: tuple[str, str, str, str]) -> None:
        packed = self._keys[s]
        if isinstance(packed, int) and _key_parts(packed) == parts:
            if self._flags[s] & F_EXTRA:
                self._extra[s][X_PARTS] = None
            return
        self._x(s)[X_PARTS] = tuple(parts)

    def baseline(self, s: int) -> dict[str, Any]:
        endpoints = self.endpoints(s) or {}
        return {
            "vpcEndpoints": [{"vpcEndpointId": vpce, "ownerAccountId": owner} for vpce, owner in endpoints.items()],
            "addresses": list(self.addresses(s)),
            "firstUseIpv4": self.tofu_v4(s),
            "firstUseIpv6": self.tofu_v6(s),
        }

    def values_of(self, s: int) -> dict[str, Any]:
        """The slot as ``Session.to_data`` data."""
        instance_id, account, role, partition = self.parts(s)
        data = {
            "instanceId": instance_id,
            "account": account,
            "role": role,
            "partition": partition,
            "firstSeen": self._first[s],
            "lastSeen": self._last[s],
            "accessKeys": list(self.access_keys(s)),
            "deliveries": list(self.deliveries(s)),
            "endpoints": self.endpoints(s) or {},
            "addresses": list(self.addresses(s)),
            "tofuV4": self.tofu_v4(s),
            "tofuV6": self.tofu_v6(s),
            "groups": list(self.groups(s)),
        }
        times = self.key_times(s)
        if any(t is not None for t in times):  # SPEC §11; absent when none is known (data of part one)
            data["accessKeyTimes"] = list(times)
        return data

    def _store(self, s: int, data: dict[str, Any]) -> None:
        """Write ``to_data``-shaped ``data`` into slot ``s`` (whose key is already set)."""
        self._drop_sides(s)
        self._flags[s] = 0
        self._ep[s] = 0
        self._addr[s] = 0
        self.set_parts(s, (data["instanceId"], data["account"], data["role"], data["partition"]))
        self._first[s] = data["firstSeen"]
        self._last[s] = data["lastSeen"]
        self.set_access_keys(s, tuple(data.get("accessKeys", ())), data.get("accessKeyTimes"))
        self.set_deliveries(s, tuple(data.get("deliveries", ())))
        self.set_endpoints(s, dict(data["endpoints"]) if data.get("endpoints") else None)
        self.set_addresses(s, tuple(data.get("addresses", ())))
        self.set_tofu_v4(s, data.get("tofuV4"))
        self.set_tofu_v6(s, data.get("tofuV6"))
        self.set_groups(s, tuple(data.get("groups", ())))

    # --- the mapping -----------------------------------------------------------------------------

    def slot(self, key: str) -> int | None:
        packed = _pack_any(key)
        return self._slots.get(packed)

    def __len__(self) -> int:
        return len(self._slots)

    def __bool__(self) -> bool:
        return bool(self._slots)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.slot(key) is not None

    def _iter_slots(self) -> Iterator[int]:
        s = self._head
        nxt = self._next
        while s != _NONE:
            following = nxt[s]  # read first: the caller may remove s
            yield s
            s = following

    def __iter__(self) -> Iterator[str]:
        for s in list(self._iter_slots()):
            packed = self._keys[s]
            assert packed is not None
            yield key_string(packed)

    def keys(self) -> list[str]:
        return list(self)

    def values(self) -> list[Session]:
        return [Session._view(self, s) for s in list(self._iter_slots())]

    def items(self) -> list[tuple[str, Session]]:
        out = []
        for s in list(self._iter_slots()):
            packed = self._keys[s]
            assert packed is not None
            out.append((key_string(packed), Session._view(self, s)))
        return out

    def __getitem__(self, key: str) -> Session:
        s = self.slot(key)
        if s is None:
            raise KeyError(key)
        return Session._view(self, s)

    def get(self, key: str, default: Any = None) -> Any:
        s = self.slot(key)
        return default if s is None else Session._view(self, s)

    def __setitem__(self, key: str, session: Session) -> None:
        """Store ``session`` under ``key``: a new key goes to the most recently used end, as in a dict."""
        data = session.to_data()
        packed = _pack_any(key)
        s = self._slots.get(packed)
        if s is None:
            s = self._new_slot(packed, data["firstSeen"])
        self._store(s, data)

    def __delitem__(self, key: str) -> None:
        s = self.slot(key)
        if s is None:
            raise KeyError(key)
        self._drop(s)

    def pop(self, key: str, *default: Any) -> Any:
        s = self.slot(key)
        if s is None:
            if default:
                return default[0]
            raise KeyError(key)
        session = Session.from_data(self.values_of(s))
        self._drop(s)
        return session

    def popitem(self, last: bool = True) -> tuple[str, Session]:
        s = self._tail if last else self._head
        if s == _NONE:
            raise KeyError("popitem(): session index is empty")
        session = Session.from_data(self.values_of(s))
        return key_string(self._drop(s)), session

    def move_to_end(self, key: str, last: bool = True) -> None:
        s = self.slot(key)
        if s is None:
            raise KeyError(key)
        if last:
            self._touch(s)
        elif s != self._head:
            self._unlink(s)
            head = self._head
            self._prev[s] = _NONE
            self._next[s] = head
            self._prev[head] = s
            self._head = s

    def clear(self) -> None:
        for s in list(self._iter_slots()):
            self._drop(s)

    def __repr__(self) -> str:
        return f"<SessionIndex of {len(self)} sessions>"


_FIELDS = (
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


class Session:
    """One instance-credential session, keyed by role session ARN (the key of the index).

    Attributes: ``instance_id``, ``account``, ``role``, ``partition``, ``first_seen``, ``last_seen``,
    ``access_keys`` (tuple, oldest first), ``deliveries`` (tuple), ``endpoints`` (dict vpce -> owner, or
    None; a copy — assign to change it), ``addresses`` (tuple), ``tofu_v4``, ``tofu_v6``, ``groups``
    (tuple of finding ids). A view of an index slot reads and writes the index; a session evicted from
    the index since the view was taken raises ``KeyError``.
    """

    __slots__ = ("_ix", "_slot", "_packed", "_d")

    def __init__(self, instance_id: str, account: str, role: str, partition: str, now: float) -> None:
        self._ix: SessionIndex | None = None
        self._slot = _NONE
        self._packed: int | str | None = None
        self._d: dict[str, Any] = {
            "instance_id": instance_id,
            "account": account,
            "role": role,
            "partition": partition,
            "first_seen": now,
            "last_seen": now,
            "access_keys": (),
            "key_times": (),
            "deliveries": (),
            "endpoints": None,
            "addresses": (),
            "tofu_v4": None,
            "tofu_v6": None,
            "groups": (),
        }

    @classmethod
    def _view(cls, index: SessionIndex, slot: int) -> Session:
        view = cls.__new__(cls)
        view._ix = index
        view._slot = slot
        view._packed = index._keys[slot]
        view._d = {}
        return view

    def _s(self) -> int:
        """The live slot of a view (re-resolved if the slot was reused)."""
        ix = self._ix
        assert ix is not None
        if ix._keys[self._slot] is not self._packed and ix._keys[self._slot] != self._packed:
            s = ix._slots.get(self._packed)  # type: ignore[arg-type]
            if s is None:
                raise KeyError(f"session {key_string(self._packed)} is no longer in the index")  # type: ignore[arg-type]
            self._slot = s
        return self._slot

    @property
    def attached(self) -> bool:
        return self._ix is not None

    # --- fields ----------------------------------------------------------------------------------

    def _get(self, name: str) -> Any:
        if self._ix is None:
            return self._d[name]
        ix, s = self._ix, self._s()
        if name == "first_seen":
            return ix._first[s]
        if name == "last_seen":
            return ix._last[s]
        if name in ("instance_id", "account", "role", "partition"):
            return ix.parts(s)[("instance_id", "account", "role", "partition").index(name)]
        return getattr(ix, name)(s)

    def _set(self, name: str, value: Any) -> None:
        if self._ix is None:
            if name in ("access_keys", "deliveries", "addresses", "groups"):
                value = tuple(value)
            self._d[name] = value
            return
        ix, s = self._ix, self._s()
        if name == "first_seen":
            ix._first[s] = value
        elif name == "last_seen":
            ix._last[s] = value
        elif name in ("instance_id", "account", "role", "partition"):
            parts = list(ix.parts(s))
            parts[("instance_id", "account", "role", "partition").index(name)] = value
            ix.set_parts(s, tuple(parts))  # type: ignore[arg-type]
        else:
            getattr(ix, "set_" + name)(s, value)

    instance_id = property(lambda self: self._get("instance_id"), lambda self, v: self._set("instance_id", v))
    account = property(lambda self: self._get("account"), lambda self, v: self._set("account", v))
    role = property(lambda self: self._get("role"), lambda self, v: self._set("role", v))
    partition = property(lambda self: self._get("partition"), lambda self, v: self._set("partition", v))
    first_seen = property(lambda self: self._get("first_seen"), lambda self, v: self._set("first_seen", v))
    last_seen = property(lambda self: self._get("last_seen"), lambda self, v: self._set("last_seen", v))
    access_keys = property(lambda self: self._get("access_keys"), lambda self, v: self._set("access_keys", v))
    deliveries = property(lambda self: self._get("deliveries"), lambda self, v: self._set("deliveries", v))
    addresses = property(lambda self: self._get("addresses"), lambda self, v: self._set("addresses", v))
    tofu_v4 = property(lambda self: self._get("tofu_v4"), lambda self, v: self._set("tofu_v4", v))
    tofu_v6 = property(lambda self: self._get("tofu_v6"), lambda self, v: self._set("tofu_v6", v))
    groups = property(lambda self: self._get("groups"), lambda self, v: self._set("groups", v))

    @property
    def endpoints(self) -> dict[str, str | None] | None:
        value = self._get("endpoints")
        return dict(value) if value else None

    @endpoints.setter
    def endpoints(self, value: dict[str, str | None] | None) -> None:
        self._set("endpoints", dict(value) if value else None)

    # --- updates ---------------------------------------------------------------------------------

    def add_access_key(self, key: str) -> None:
        if self._ix is not None:
            self._ix.add_access_key(self._s(), key)
            return
        keys = self._d["access_keys"]
        if keys and keys[-1] == key:
            return
        known = dict(zip(keys, self._d["key_times"]))
        if key in keys:
            keys = tuple(k for k in keys if k != key)
        self._d["access_keys"] = keys = (keys + (key,))[-MAX_ACCESS_KEYS:]
        self._d["key_times"] = tuple(known.get(k) for k in keys)

    def add_delivery(self, value: str) -> None:
        if self._ix is not None:
            self._ix.add_delivery(self._s(), value)
        elif value not in self._d["deliveries"]:
            self._d["deliveries"] = self._d["deliveries"] + (value,)

    def add_endpoint(self, vpce: str, owner: str | None) -> None:
        if self._ix is not None:
            self._ix.add_endpoint(self._s(), vpce, owner)
            return
        endpoints = self._d["endpoints"]
        if endpoints is None:
            endpoints = self._d["endpoints"] = {}
        if endpoints.get(vpce) is None:
            endpoints[vpce] = owner

    def add_address(self, address: str) -> None:
        if self._ix is not None:
            self._ix.add_address(self._s(), address)
            return
        addresses = self._d["addresses"]
        if address not in addresses and len(addresses) < MAX_REMOTE_ADDRESSES:
            self._d["addresses"] = addresses + (address,)

    def baseline(self) -> dict[str, Any]:
        if self._ix is not None:
            return self._ix.baseline(self._s())
        return {
            "vpcEndpoints": [
                {"vpcEndpointId": vpce, "ownerAccountId": owner} for vpce, owner in (self._d["endpoints"] or {}).items()
            ],
            "addresses": list(self._d["addresses"]),
            "firstUseIpv4": self._d["tofu_v4"],
            "firstUseIpv6": self._d["tofu_v6"],
        }

    def to_data(self) -> dict[str, Any]:
        if self._ix is not None:
            return self._ix.values_of(self._s())
        d = self._d
        data = {
            "instanceId": d["instance_id"],
            "account": d["account"],
            "role": d["role"],
            "partition": d["partition"],
            "firstSeen": d["first_seen"],
            "lastSeen": d["last_seen"],
            "accessKeys": list(d["access_keys"]),
            "deliveries": list(d["deliveries"]),
            "endpoints": dict(d["endpoints"] or {}),
            "addresses": list(d["addresses"]),
            "tofuV4": d["tofu_v4"],
            "tofuV6": d["tofu_v6"],
            "groups": list(d["groups"]),
        }
        times = d["key_times"]
        if len(times) == len(d["access_keys"]) and any(t is not None for t in times):
            data["accessKeyTimes"] = list(times)
        return data

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Session:
        s = cls(data["instanceId"], data["account"], data["role"], data["partition"], data["firstSeen"])
        d = s._d
        d["last_seen"] = data["lastSeen"]
        d["access_keys"] = tuple(data.get("accessKeys", ()))
        d["key_times"] = tuple(data.get("accessKeyTimes") or ())
        d["deliveries"] = tuple(data.get("deliveries", ()))
        d["endpoints"] = dict(data["endpoints"]) if data.get("endpoints") else None
        d["addresses"] = tuple(data.get("addresses", ()))
        d["tofu_v4"] = data.get("tofuV4")
        d["tofu_v6"] = data.get("tofuV6")
        d["groups"] = tuple(data.get("groups", ()))
        return s

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Session) and self.to_data() == other.to_data()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        where = "view" if self._ix is not None else "detached"
        return f"<Session {where} {self.to_data()!r}>"


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
        # SPEC part two
        "other_instance",  # §12: the other instance J of the group (type, session key, J)
        "evidence",  # §11/§12: the rule's evidence of the latest record (dict, additionalInfo fields)
        "api_calls",  # §13: {"<eventSource>\x1f<eventName>": count} of the group's records
        "error_codes",  # §13: {errorCode: count}, None until the first errorCode
    )

    def __init__(self, **values: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, values.get(name))
        if self.api_calls is None:
            self.api_calls = {}

    def to_data(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__slots__}
        data["remote_addresses"] = list(self.remote_addresses)
        data["deliveries"] = list(self.deliveries)
        data["event_ids"] = list(self.event_ids)
        for name in ("other_instance", "evidence"):  # absent rather than null: entries of part one stay as they were
            if data[name] is None:
                del data[name]
        return data

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> FindingGroup:
        group = cls(**data)
        group.remote_addresses = list(data.get("remote_addresses") or [])
        group.deliveries = list(data.get("deliveries") or [])
        group.event_ids = list(data.get("event_ids") or [])
        group.share_strings(True)
        return group

    def share_strings(self, containers: bool) -> None:
        """Point the fields that many groups have alike (account, role, region, API, ...) at one copy of
        each string; ``containers``: the ``deliveries`` values and ``api_calls`` names too. A group holds
        the strings of the record that made it, otherwise: with a fifth of sessions having a group (SPEC
        §13's IMDSv1 groups), those copies were ~700 bytes a group."""
        intern = sys.intern
        for name in _SHARED_FIELDS:
            value = getattr(self, name)
            if type(value) is str:
                setattr(self, name, intern(value))
        if containers:
            self.deliveries = [intern(v) if type(v) is str else v for v in self.deliveries or ()]
            calls = self.api_calls
            if calls:
                self.api_calls = {intern(k) if type(k) is str else k: n for k, n in calls.items()}


_SHARED_FIELDS = ("type", "account", "region", "partition", "role", "api", "service_name", "origin", "vpce")


# Lifecycle entries (SPEC §11): a list indexed by these.
L_START = 0  # the latest start signal's time, or None
L_STOP = 1  # T: the earliest stop signal since the latest start, or None (running)
L_LAST = 2  # the latest stop signal's time since the latest start
L_STATE = 3  # its instance state: "stopped" or "terminated"
L_PREV = 4  # T of the life before the latest start (kept for clause b), or None
L_PREV_STATE = 5
L_RESET = 6  # the latest address reset's time (SPEC §13), or None
L_RESET_IDS = 7  # eventIDs of the latest resets, newest last: a repeated delivery does not reset again
LIFECYCLE_FIELDS = 8
MAX_RESET_IDS = 4
STOPPED = "stopped"
TERMINATED = "terminated"
LIFECYCLE_PREFIX = "l:"  # changelog key prefix of a lifecycle entry (``l:<instance-id>``)


def lifecycle_newest(entry: list[Any]) -> float:
    """The newest signal time of a lifecycle entry (it expires a session TTL after that)."""
    return max(
        (t for t in (entry[L_START], entry[L_LAST], entry[L_PREV], entry[L_RESET]) if t is not None),
        default=float("-inf"),
    )


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
        "created",
        "_next_sweep",
        "lifecycle",
        "_next_lifecycle_sweep",
    )

    def __init__(self, config: EngineConfig | None = None, track_changes: bool = False) -> None:
        self.config = config or EngineConfig()
        self.sessions = SessionIndex()
        self.groups: dict[str, FindingGroup] = {}
        self.stream_time = 0.0
        self.expired = 0  # sessions dropped by idle TTL
        self.evicted = 0  # sessions dropped by the LRU cap
        # Change tracking for the changelog: keys written since the last drain.
        self.track_changes = track_changes
        self.changed: set[str] = set()
        self.removed: set[str] = set()
        self.created = False  # whether the last touch() created its entry
        self._next_sweep = 0.0
        # SPEC §11: per instance with a lifecycle signal, keyed by instance_bits(instance ID): a list
        # indexed by L_* (see Lifecycle below). Kept for the session TTL after its newest signal.
        self.lifecycle: dict[int, list[Any]] = {}
        self._next_lifecycle_sweep = 0.0

    def advance(self, event_time: float) -> float:
        if event_time > self.stream_time:
            self.stream_time = event_time
        return self.stream_time

    def session(self, key: str, instance_id: str, account: str, role: str, partition: str) -> Session:
        """The live entry for ``key``, created if absent or idle past the TTL; marks it used."""
        packed = _pack_any(key)
        s = self.touch(key, packed)
        ix = self.sessions
        if self.created:  # the parts of an existing entry stay as they are
            ix.set_parts(s, (instance_id, account, role, partition))
        return Session._view(ix, s)

    def touch(self, key: str, packed: int | str) -> int:
        """The slot of the live entry for ``key`` (packed as ``packed``), created if absent or idle past
        the TTL, moved to the most recently used end, ``last_seen`` set to stream time."""
        now = self.stream_time
        ix = self.sessions
        s = ix._slots.get(packed)
        if s is not None:
            if now - ix._last[s] > self.config.session_ttl_seconds:
                ix._drop(s)
                self.expired += 1
                s = None
            elif s != ix._tail:  # move to the most recently used end (SessionIndex._touch, inlined)
                prev, nxt = ix._prev, ix._next
                p = prev[s]
                n = nxt[s]
                if p == _NONE:
                    ix._head = n
                else:
                    nxt[p] = n
                prev[n] = p
                tail = ix._tail
                prev[s] = tail
                nxt[s] = _NONE
                nxt[tail] = s
                ix._tail = s
        self.created = s is None
        if s is None:
            s = ix._new_slot(packed, now)
            if len(ix._slots) > self.config.max_sessions:
                old = ix._drop(ix._head)
                self.evicted += 1
                self._note_removed(key_string(old))
        ix._last[s] = now
        if self.track_changes:
            self.changed.add(key)
            self.removed.discard(key)
        if now >= self._next_sweep:
            self.sweep()
        return s

    def _note_removed(self, key: str) -> None:
        if self.track_changes:
            self.removed.add(key)
            self.changed.discard(key)

    def sweep(self) -> None:
        """Drop sessions idle past the TTL (front of the LRU order) and stale finding groups."""
        now = self.stream_time
        horizon = now - self.config.session_ttl_seconds
        ix = self.sessions
        last = ix._last
        while ix._head != _NONE:
            s = ix._head
            if last[s] >= horizon:
                break
            packed = ix._drop(s)
            self.expired += 1
            if self.track_changes:
                self._note_removed(key_string(packed))
        lifecycle = self.lifecycle
        if lifecycle and now >= self._next_lifecycle_sweep:
            # A pass over every entry, so not every minute: an entry past its time is already ignored
            # by lifecycle_entry(); this only frees the memory.
            self._next_lifecycle_sweep = now + max(60.0, self.config.session_ttl_seconds / 16)
            for bits in [b for b, entry in lifecycle.items() if lifecycle_newest(entry) < horizon]:
                self.drop_lifecycle(bits)
        group_horizon = now - self.config.finding_ttl_seconds
        stale = [gid for gid, g in self.groups.items() if g.last_ts < group_horizon]
        if len(self.groups) - len(stale) > self.config.max_findings:
            # Over the cap: the least severe go first (SPEC §13's Low IMDSv1 groups can be many; they must
            # not push High findings out of the state), the oldest first among equals.
            by_age = sorted(self.groups.values(), key=lambda g: (g.severity or 0, g.last_ts))
            stale = [g.id for g in by_age[: len(self.groups) - self.config.max_findings]]
        for gid in stale:
            del self.groups[gid]
            if self.track_changes:
                self.removed.add("g:" + gid)
                self.changed.discard("g:" + gid)
        self._next_sweep = now + 60.0

    # --- SPEC §11, §13: lifecycle signals -------------------------------------------------------------

    def lifecycle_entry(self, bits: int) -> list[Any] | None:
        """The instance's lifecycle entry, None when it has none or it expired (a session TTL after its
        newest signal; dropped then)."""
        entry = self.lifecycle.get(bits)
        if entry is not None and lifecycle_newest(entry) < self.stream_time - self.config.session_ttl_seconds:
            self.drop_lifecycle(bits)
            return None
        return entry

    def drop_lifecycle(self, bits: int) -> None:
        del self.lifecycle[bits]
        if self.track_changes:
            name = LIFECYCLE_PREFIX + instance_text(bits)
            self.removed.add(name)
            self.changed.discard(name)

    def _lifecycle_entry(self, bits: int) -> list[Any]:
        entry = self.lifecycle_entry(bits)
        if entry is None:
            entry = self.lifecycle[bits] = [None] * LIFECYCLE_FIELDS
        if self.track_changes:
            name = LIFECYCLE_PREFIX + instance_text(bits)
            self.changed.add(name)
            self.removed.discard(name)
        return entry

    def stop_signal(self, bits: int, ts: float, instance_state: str) -> None:
        """A stop signal (SPEC §11) for the instance at eventTime ``ts``; ``instance_state`` is
        ``stopped`` or ``terminated``."""
        entry = self._lifecycle_entry(bits)
        start = entry[L_START]
        if start is not None and ts < start:  # a late signal of the previous life
            if entry[L_PREV] is None or ts < entry[L_PREV]:
                entry[L_PREV], entry[L_PREV_STATE] = ts, instance_state
            return
        if entry[L_STOP] is None or ts < entry[L_STOP]:
            entry[L_STOP] = ts
        last = entry[L_LAST]
        if last is None or ts > last or (ts == last and instance_state == TERMINATED):
            entry[L_LAST], entry[L_STATE] = ts, instance_state

    def start_signal(self, bits: int, ts: float) -> None:
        """A start signal (SPEC §11) at eventTime ``ts``: a later start opens a new life; the stop time of
        the life it ends is kept (clause b)."""
        entry = self._lifecycle_entry(bits)
        start = entry[L_START]
        if start is not None and ts <= start:
            return  # an older start arriving late: the latest start stays
        entry[L_START] = ts
        stop = entry[L_STOP]
        if stop is not None and stop < ts:
            entry[L_PREV], entry[L_PREV_STATE] = stop, entry[L_STATE]
            last = entry[L_LAST]
            if last is not None and last >= ts:  # a stop after the new start too: the new life's stop
                entry[L_STOP] = last
            else:
                entry[L_STOP] = entry[L_LAST] = entry[L_STATE] = None

    def reset_signal(self, bits: int, ts: float, event_id: Any) -> int:
        """An address reset (SPEC §13) at eventTime ``ts``: :meth:`reset_first_use`, unless the record
        with this ``eventID`` already reset the instance (a repeated delivery is the same event)."""
        if isinstance(event_id, str):
            entry = self.lifecycle_entry(bits)
            if entry is not None and entry[L_RESET_IDS] and event_id in entry[L_RESET_IDS]:
                return 0
            entry = self._lifecycle_entry(bits)
            entry[L_RESET_IDS] = [*(entry[L_RESET_IDS] or ())[1 - MAX_RESET_IDS :], event_id]
            if entry[L_RESET] is None or ts > entry[L_RESET]:
                entry[L_RESET] = ts
        return self.reset_first_use(bits)

    def reset_first_use(self, bits: int) -> int:
        """Forget the trust-on-first-use addresses of every session of the instance (SPEC §13);
        the number of sessions reset."""
        ix = self.sessions
        slots = ix._slots
        n = 0
        for pid in range(len(_PREFIXES)):
            packed = (pid << _PREFIX_SHIFT) | bits
            s = slots.get(packed)
            if s is None or not (ix._flags[s] & F_TOFU4 or ix.tofu_v4(s) is not None or ix.tofu_v6(s) is not None):
                continue
            ix.set_tofu_v4(s, None)
            ix.set_tofu_v6(s, None)
            n += 1
            if self.track_changes:
                key = key_string(packed)
                self.changed.add(key)
                self.removed.discard(key)
        return n

    def note_group(self, group: FindingGroup) -> None:
        group.share_strings(group.version == 1)  # a new group: its first call and delivery too
        if self.track_changes:
            name = "g:" + group.id
            self.changed.add(name)
            self.removed.discard(name)  # a group dropped and made again (the same id) since the last drain

    def drain_changes(self) -> tuple[set[str], set[str]]:
        changed, removed = self.changed, self.removed
        self.changed, self.removed = set(), set()
        return changed, removed
