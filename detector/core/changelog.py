"""State as a changelog: the encoding of state changes and their replay (issue 4). Pure, no I/O.

Each changed session entry, finding group or instance lifecycle entry (SPEC §11) becomes one record
keyed ``s:<session key>``, ``g:<finding id>`` or ``l:<instance id>``; an entry removed by TTL or LRU becomes
a tombstone (value ``None``). Every record carries the input offset (of the partition it belongs to) whose
processing produced it, so a restore can skip changes made by input that was never committed — that input
is consumed again and remakes them.

Values (issue 11; docs/operations.md, "Changelog values"): the first byte says the format.

- ``0x01`` — a session held wholly in the index columns (the usual case): the struct ``<BBddd I 20s``
  (this byte, the flags byte, first seen, last seen, first-seen time of the newest access key, first-use
  IPv4 address, newest access key), then, only when the session has a baseline VPC endpoint or address, a
  msgpack array ``[[vpce, owner] | nil, address | nil]``. Restore writes it straight into the columns.
- ``0x02`` — msgpack of the entry's plain data: a session's ``Session.to_data()`` (a session that carries
  more than the columns hold), a finding group's ``FindingGroup.to_data()``, a lifecycle entry's list.
- ``{`` or ``[`` — JSON of the same plain data, as every version before issue 11 wrote it; still restored.
"""

from __future__ import annotations

import gc
import re
import struct
from collections.abc import Iterable
from typing import Any

import msgspec
import orjson

from .state import (
    _ADDRESSES,
    _AK_LEN,
    _ENDPOINTS,
    _PREFIX_SHIFT,
    _SHORT_BIT,
    _X_EMPTY,
    F_EXTRA,
    F_GROUPS,
    F_OLDER,
    X_ADDRESSES,
    X_DELIVERIES,
    X_GROUPS,
    X_KEY_TIMES,
    X_KEYS,
    X_PARTS,
    LIFECYCLE_FIELDS,
    LIFECYCLE_PREFIX,
    DetectorState,
    FindingGroup,
    Session,
    SessionIndex,
    _pack_any,
    instance_bits,
    lifecycle_newest,
)

SESSION_PREFIX = "s:"
GROUP_PREFIX = "g:"
OFFSET_HEADER = "source-offset"

COLUMNS = 0x01  # value format: a session's columns (struct + optional msgpack tail)
DATA = 0x02  # value format: msgpack of the entry's plain data
_JSON_FIRST = (0x7B, 0x5B)  # "{", "[": a value written by a version before the binary formats

_HEAD = struct.Struct("<BBdddI20s")
_HEAD_LEN = _HEAD.size
_DATA_TAG = bytes([DATA])
_X_SIDE_EMPTY = list(_X_EMPTY)
_X_TUPLES = (X_KEYS, X_DELIVERIES, X_ADDRESSES, X_GROUPS, X_PARTS, X_KEY_TIMES)  # the rest: dict, str or None
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode

# Session-key prefixes (``arn:...:assumed-role/<role>/`` as bytes) already parsed, with their interned id:
# a restore then parses a key with a dictionary lookup and a check of its instance ID.
_PREFIX_OF: dict[bytes, int] = {}
_INSTANCE_ID = re.compile(rb"i-(?:[0-9a-f]{17}|[0-9a-f]{8})")
_instance_id = _INSTANCE_ID.fullmatch
_unpack_head = _HEAD.unpack_from


def _packed_key(key: bytes) -> int | str:
    """The packed session key of changelog key ``s:<session key>`` (bytes)."""
    cut = key.rfind(b"/") + 1
    pid = _PREFIX_OF.get(key[2:cut])
    if pid is not None:
        tail = key[cut:]
        if _instance_id(tail):
            return (pid << _PREFIX_SHIFT) | int(tail[2:], 16) | (_SHORT_BIT if len(tail) == 10 else 0)
    packed = _pack_any(key[2:].decode())
    if isinstance(packed, int):
        _PREFIX_OF[key[2:cut]] = packed >> _PREFIX_SHIFT
    return packed


# --- writing ------------------------------------------------------------------------------------------


def session_value(ix: SessionIndex, s: int) -> bytes:
    """The changelog value of slot ``s`` of ``ix``."""
    if not isinstance(ix._keys[s], int):
        return _DATA_TAG + _encode(ix.values_of(s))
    flags = ix._flags[s]
    base = s * _AK_LEN
    head = _HEAD.pack(
        COLUMNS, flags, ix._first[s], ix._last[s], ix._akt[s], ix._tofu4[s], ix._ak[base : base + _AK_LEN]
    )
    ep = ix._ep[s]
    addr = ix._addr[s]
    if ep or addr or flags & (F_EXTRA | F_GROUPS | F_OLDER):
        endpoint = _ENDPOINTS.values[ep] if ep else None
        address = _ADDRESSES.values[addr] if addr else None
        if flags & (F_EXTRA | F_GROUPS | F_OLDER):
            # the side entry as the changelog has it: the groups and older keys of their tables included
            side = list(ix._extra[s]) if flags & F_EXTRA else list(_X_EMPTY)
            side[X_GROUPS] = ix.groups(s)
            if flags & F_OLDER:
                older, times = ix._older(s)
                side[X_KEYS] = older
                side[X_KEY_TIMES] = times if any(t is not None for t in times) else ()
            return head + _encode((endpoint, address, side))
        return head + _encode((endpoint, address))
    return head


def drain(state: DetectorState) -> list[tuple[bytes, bytes | None]]:
    """The changelog records for every change since the last drain, as ``(key, value)``."""
    changed, removed = state.drain_changes()
    out: list[tuple[bytes, bytes | None]] = []
    ix = state.sessions
    groups = state.groups
    lifecycle = state.lifecycle
    for key in changed:
        if key.startswith(LIFECYCLE_PREFIX):
            entry = lifecycle.get(instance_bits(key[2:]))  # type: ignore[arg-type]
            if entry is not None:
                out.append((key.encode(), _DATA_TAG + _encode(entry)))
            continue
        if key.startswith(GROUP_PREFIX):
            group = groups.get(key[2:])
            if group is not None:
                out.append((key.encode(), _DATA_TAG + _encode(group.to_data())))
            continue
        s = ix.slot(key)
        if s is not None:
            out.append(((SESSION_PREFIX + key).encode(), session_value(ix, s)))
    for key in removed:
        name = key if key.startswith((GROUP_PREFIX, LIFECYCLE_PREFIX)) else SESSION_PREFIX + key
        out.append((name.encode(), None))
    return out


# --- replay -------------------------------------------------------------------------------------------


def _plain(name: bytes, value: bytes) -> Any:
    """The plain data of a ``DATA`` or JSON value."""
    first = value[0] if value else -1
    if first == DATA:
        return _decode(memoryview(value)[1:])
    if first in _JSON_FIRST:
        return orjson.loads(value)
    raise ValueError(f"changelog record {name[:80]!r} has a value of unknown format (first byte {first})")


def _side_entry(key: bytes, x: Any) -> list[Any]:
    """A side-table entry (``state.X_*``) as msgpack returned it: its tuples back from lists."""
    if type(x) is not list or len(x) != len(_X_EMPTY):
        raise ValueError(f"changelog record {key[:80]!r}: a malformed side-table entry")
    for i in _X_TUPLES:
        if x[i] is not None:
            x[i] = tuple(x[i])
    return x


def _apply_session(state: DetectorState, key: bytes, value: bytes | None) -> None:
    cut = key.rfind(b"/") + 1  # _packed_key, inlined for the usual case: a role seen before
    pid = _PREFIX_OF.get(key[2:cut])
    tail = key[cut:]
    if pid is not None and _instance_id(tail):
        packed: int | str = (pid << _PREFIX_SHIFT) | int(tail[2:], 16) | (_SHORT_BIT if len(tail) == 10 else 0)
    else:
        packed = _packed_key(key)
    ix = state.sessions
    s = ix._slots.get(packed)
    if value is None:
        if s is not None:
            ix._drop(s)
        return
    if not value or value[0] != COLUMNS:
        session = Session.from_data(_plain(key, value))
        if s is None:
            s = ix._new_slot(packed, session.first_seen)
        else:
            ix._touch(s)
        ix._store(s, session.to_data())
        last = session.last_seen
    else:
        if not isinstance(packed, int) or len(value) < _HEAD_LEN:
            raise ValueError(f"changelog record {key[:80]!r}: a column value for a key that is not an instance session")
        _, flags, first, last, akt, tofu4, ak = _unpack_head(value)
        if s is None:  # SessionIndex._new_slot, inlined: every column is written below
            free = ix._free
            if not free:
                ix._grow()
            s = free.pop()
            ix._keys[s] = packed
            ix._slots[packed] = s
            ix._link_tail(s)
        else:
            ix._drop_sides(s)
            ix._touch(s)
        ix._flags[s] = flags & ~(F_EXTRA | F_GROUPS | F_OLDER)
        ix._first[s] = first
        ix._last[s] = last
        ix._akt[s] = akt
        ix._tofu4[s] = tofu4
        base = s * _AK_LEN
        ix._ak[base : base + _AK_LEN] = ak
        if len(value) > _HEAD_LEN:
            endpoint, address, *extra = _decode(memoryview(value)[_HEAD_LEN:])
            if extra:
                side = _side_entry(key, extra[0])
                groups = side[X_GROUPS]
                if groups:
                    side[X_GROUPS] = ()
                    ix.set_groups(s, groups)
                older, times = side[X_KEYS], side[X_KEY_TIMES]
                side[X_KEYS] = side[X_KEY_TIMES] = ()
                if side != _X_SIDE_EMPTY:
                    ix._extra[s] = side
                    ix._flags[s] |= F_EXTRA
                if older:
                    ix._set_older(s, older, times if len(times) == len(older) else (None,) * len(older))
            ep = _ENDPOINTS.id(tuple(endpoint)) if endpoint is not None else 0
            ix._ep[s] = ep
            if endpoint is not None and not ep:  # the intern table is full: kept in the side table
                ix.set_endpoints(s, {endpoint[0]: endpoint[1]})
            a = _ADDRESSES.id(address) if address is not None else 0
            ix._addr[s] = a
            if address is not None and not a:
                ix.set_addresses(s, (address,))
        else:
            ix._ep[s] = 0
            ix._addr[s] = 0
    if last > state.stream_time:
        state.stream_time = last


def apply_record(state: DetectorState, key: bytes, value: bytes | None) -> None:
    """Replay one changelog record into ``state`` (the caller filters by source offset)."""
    kind = key[:2]
    if kind == b"s:":
        _apply_session(state, key, value)
        return
    if kind == b"g:":
        gid = key[2:].decode()
        if value is None:
            state.groups.pop(gid, None)
            return
        state.groups[gid] = FindingGroup.from_data(_plain(key, value))
        return
    if kind == b"l:":
        bits = instance_bits(key[2:].decode())
        if bits is None:
            raise ValueError(f"changelog key {key[:80]!r} does not name an instance")
        if value is None:
            state.lifecycle.pop(bits, None)
            return
        entry = _plain(key, value)
        if not isinstance(entry, list) or len(entry) != LIFECYCLE_FIELDS:
            raise ValueError(f"changelog record {key[:80]!r} is not a lifecycle entry")
        state.lifecycle[bits] = entry
        state.advance(lifecycle_newest(entry))
        return
    raise ValueError(f"changelog key {key[:80]!r} is neither a session, a finding group nor a lifecycle entry")


def apply_records(state: DetectorState, messages: Iterable[Any], committed: int) -> tuple[int, int]:
    """Replay changelog messages (with ``key``, ``value``, ``headers``) into ``state``, skipping those
    whose source offset is at or past ``committed``; returns ``(applied, skipped)``."""
    applied = skipped = 0
    header = OFFSET_HEADER
    # No cycles are made here, while the collector would walk the whole heap (every finding group) again
    # and again as the restore allocates: paused for the batch, nothing else runs meanwhile.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for msg in messages:
            headers = msg.headers
            if headers:
                name, raw = headers[0]
                if name == header and len(headers) == 1 and type(raw) is bytes and raw.isdigit():
                    offset: int | None = int(raw)
                else:
                    offset = source_offset(headers)
                if offset is not None and offset >= committed:
                    skipped += 1
                    continue
            key = msg.key
            if key[:2] == b"s:":
                _apply_session(state, key, msg.value)
            else:
                apply_record(state, key, msg.value)
            applied += 1
    finally:
        if collecting:
            gc.enable()
    return applied, skipped


def source_offset(headers: Any) -> int | None:
    for name, raw in headers or ():
        if name == OFFSET_HEADER:
            try:
                return int(raw)
            except (TypeError, ValueError):
                return None
    return None
