"""Order of application in the detect stage (pure): the merge of source runs by eventTime, and the
watermark hold that releases records as soon as every source has caught up with them."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from detector.core.ordering import Watermark, merge_runs, releasable


def t(second: int) -> str:
    return f"2026-11-28T10:{second // 60:02d}:{second % 60:02d}Z"


def test_merge_keeps_each_run_in_order_and_interleaves_by_time() -> None:
    a = [(t(1), "a1"), (t(5), "a5"), (t(3), "a3")]  # a run out of order stays in its order
    b = [(t(2), "b2"), (t(4), "b4")]
    assert merge_runs([a, b]) == ["a1", "b2", "b4", "a5", "a3"]
    assert merge_runs([[], b]) == ["b2", "b4"]


def test_watermark_is_the_least_newest_time_of_the_sources_still_heard_from() -> None:
    w = Watermark()
    assert w.mark(0.0, 1.0) == ""
    w.observe("p0", t(10), 0.0)
    w.observe("p1", t(7), 0.0)
    w.observe("p1", t(5), 0.1)  # an older record does not move a source back
    assert w.mark(0.2, 1.0) == t(7)
    w.observe("p0", t(12), 0.9)
    assert w.mark(1.2, 1.0) == t(12)  # p1 silent for the window: no longer waited for


def test_a_known_source_not_heard_from_yet_is_waited_for_the_window() -> None:
    w = Watermark(["p0", "p1"], now=0.0)
    w.observe("p0", t(10), 0.1)
    assert w.mark(0.5, 1.0) == ""  # p1 may still send something older
    assert w.mark(1.0, 1.0) == t(10)  # silent for the whole window: no longer waited for


def test_a_record_waits_for_the_other_sources_then_goes() -> None:
    held = [(0.0, t(10), "a"), (0.0, t(11), "b")]
    assert releasable(held, t(9), 0.1, 1.0) == 0
    assert releasable(held, t(10), 0.1, 1.0) == 1
    assert releasable(held, t(11), 0.1, 1.0) == 2
    assert releasable(held, t(0), 1.0, 1.0) == 2  # held the whole window: goes regardless


def test_a_record_is_not_overtaken_by_a_newer_one_released_before_it() -> None:
    # c at 10 (source C), then a blocker at 30 (source A, not yet caught up), then b at 5 (source B,
    # routed late): releasing c alone would apply 10 before 5.
    held = [(0.0, t(10), "c"), (0.0, t(30), "a"), (0.0, t(5), "b")]
    assert releasable(held, t(20), 0.1, 1.0) == 0
    assert releasable(held, t(30), 0.1, 1.0) == 3


SOURCES = st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=12).map(sorted), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(sources=SOURCES, schedule=st.lists(st.integers(0, 3), max_size=80), data=st.data())
def test_every_source_in_order_gives_an_order_by_time(sources: list[list[int]], schedule: list[int], data: Any) -> None:
    """Sources whose records come in time order, delivered interleaved in fetches of any size: what the
    hold releases, each batch merged by source, is in time order overall (no window expiry)."""
    pending = [list(s) for s in sources]
    held: list[tuple[float, str, int, str]] = []
    w = Watermark([f"s{i}" for i in range(len(sources))])  # the input partitions are known
    applied: list[str] = []
    now = 0.0

    def release(n: int) -> None:
        runs: dict[str, list[tuple[str, str]]] = {}
        for _, when, _, source in held[:n]:
            runs.setdefault(source, []).append((when, when))
        applied.extend(merge_runs(runs.values()))
        del held[:n]

    for pick in schedule + list(range(len(pending))) * 13:
        source = pick % len(pending)
        if not pending[source]:
            continue
        for _ in range(data.draw(st.integers(1, 3))):
            if pending[source]:
                when = t(pending[source].pop(0))
                held.append((now, when, len(held), f"s{source}"))
                w.observe(f"s{source}", when, now)
        now += 0.001
        release(releasable(held, w.mark(now, 1e9), now, 1e9))
    release(len(held))  # shutdown: whatever is left
    assert applied == sorted(applied)
    assert sorted(applied) == sorted(t(x) for s in sources for x in s)
