"""State as a changelog: the encoding of state changes and their replay (issue 4). Pure, no I/O.

Each changed session entry, finding group or instance lifecycle entry (SPEC §11) becomes one record
keyed ``s:<session key>``, ``g:<finding id>`` or ``l:<instance id>``; an entry removed by TTL or LRU becomes a tombstone (value ``None``). Every record
carries the input offset (of the partition it belongs to) whose processing produced it, so a restore can
skip changes made by input that was never committed — that input is consumed again and remakes them.
"""

from __future__ import annotations

from typing import Any

import orjson

from .state import LIFECYCLE_FIELDS, LIFECYCLE_PREFIX, DetectorState, FindingGroup, Session, instance_bits, lifecycle_newest

SESSION_PREFIX = "s:"
GROUP_PREFIX = "g:"
OFFSET_HEADER = "source-offset"


def drain(state: DetectorState) -> list[tuple[bytes, bytes | None]]:
    """The changelog records for every change since the last drain, as ``(key, value)``."""
    changed, removed = state.drain_changes()
    out: list[tuple[bytes, bytes | None]] = []
    sessions = state.sessions
    groups = state.groups
    lifecycle = state.lifecycle
    for key in changed:
        if key.startswith(LIFECYCLE_PREFIX):
            entry = lifecycle.get(instance_bits(key[2:]))  # type: ignore[arg-type]
            if entry is not None:
                out.append((key.encode(), orjson.dumps(entry)))
            continue
        if key.startswith(GROUP_PREFIX):
            group = groups.get(key[2:])
            if group is not None:
                out.append((key.encode(), orjson.dumps(group.to_data())))
            continue
        session = sessions.get(key)
        if session is not None:
            out.append(((SESSION_PREFIX + key).encode(), orjson.dumps(session.to_data())))
    for key in removed:
        name = key if key.startswith((GROUP_PREFIX, LIFECYCLE_PREFIX)) else SESSION_PREFIX + key
        out.append((name.encode(), None))
    return out


def apply_record(state: DetectorState, key: bytes, value: bytes | None) -> None:
    """Replay one changelog record into ``state`` (the caller filters by source offset)."""
    name = key.decode()
    if name.startswith(GROUP_PREFIX):
        gid = name[2:]
        if value is None:
            state.groups.pop(gid, None)
            return
        group = FindingGroup.from_data(orjson.loads(value))
        state.groups[gid] = group
        return
    if name.startswith(LIFECYCLE_PREFIX):
        bits = instance_bits(name[2:])
        if bits is None:
            raise ValueError(f"changelog key {name[:80]!r} does not name an instance")
        if value is None:
            state.lifecycle.pop(bits, None)
            return
        entry = orjson.loads(value)
        if not isinstance(entry, list) or len(entry) != LIFECYCLE_FIELDS:
            raise ValueError(f"changelog record {name[:80]!r} is not a lifecycle entry")
        state.lifecycle[bits] = entry
        state.advance(lifecycle_newest(entry))
        return
    if not name.startswith(SESSION_PREFIX):
        raise ValueError(f"changelog key {name[:80]!r} is neither a session, a finding group nor a lifecycle entry")
    session_key = name[2:]
    sessions = state.sessions
    if value is None:
        sessions.pop(session_key, None)
        return
    session = Session.from_data(orjson.loads(value))
    sessions[session_key] = session
    sessions.move_to_end(session_key)
    if session.last_seen > state.stream_time:
        state.stream_time = session.last_seen


def source_offset(headers: Any) -> int | None:
    for name, raw in headers or ():
        if name == OFFSET_HEADER:
            try:
                return int(raw)
            except (TypeError, ValueError):
                return None
    return None
