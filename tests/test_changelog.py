"""The changelog encoding of state: draining changes and replaying them rebuilds the same state."""

from __future__ import annotations

from collections.abc import Iterator

from detector.core.changelog import apply_record, drain, source_offset
from detector.core.engine import Engine, MalformedRecord
from detector.core.records import decode
from detector.core.state import DetectorState, EngineConfig
from detector.demo import sample_world, world_messages
from detector.ipranges import load
from detector.registry import load_registry


def _engine() -> Engine:
    world = sample_world()
    return Engine(load_registry(world.registry), load()[0])


def _changelog_per_message(live: DetectorState) -> Iterator[tuple[bytes, bytes | None]]:
    """Apply the sample world to ``live``, draining its changes after each input, as the service does per batch."""
    engine = _engine()
    for value in world_messages(sample_world()):
        for record in decode(value).records:
            try:
                engine.apply(live, record)
            except MalformedRecord:
                continue  # the service dead-letters these; they change no state
        yield from drain(live)


def _snapshot(state: DetectorState) -> tuple[dict, dict]:
    return (
        {k: v.to_data() for k, v in state.sessions.items()},
        {k: v.to_data() for k, v in state.groups.items()},
    )


def test_replaying_the_drained_changelog_rebuilds_the_state() -> None:
    live = DetectorState(track_changes=True)
    log = list(_changelog_per_message(live))
    assert log, "the sample world changes state"
    restored = DetectorState()
    for key, value in log:
        apply_record(restored, key, value)
    assert _snapshot(restored) == _snapshot(live)
    assert list(restored.sessions) == list(live.sessions)  # LRU order survives
    assert restored.stream_time == max(s.last_seen for s in live.sessions.values())


def test_evictions_become_tombstones_and_remove_on_replay() -> None:
    live = DetectorState(EngineConfig(max_sessions=3), track_changes=True)
    restored = DetectorState(EngineConfig(max_sessions=3))
    for key, payload in _changelog_per_message(live):
        apply_record(restored, key, payload)
    assert live.evicted > 0
    assert list(restored.sessions) == list(live.sessions)


def test_source_offset_header() -> None:
    assert source_offset([("x", b"1"), ("source-offset", b"42")]) == 42
    assert source_offset([("source-offset", b"nope")]) is None
    assert source_offset(None) is None


def test_changelog_values_never_carry_session_tokens() -> None:
    blob = b"".join(v or b"" for _, v in _changelog_per_message(DetectorState(track_changes=True)))
    assert blob and b"sessionToken" not in blob and b"IQoJb3JpZ2lu" not in blob
