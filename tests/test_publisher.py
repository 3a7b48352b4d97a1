"""FindingPublisher: when finding states go out and which input offsets they pin (pure bookkeeping)."""

from __future__ import annotations

from detector.core.engine import FindingChange
from detector.core.state import FindingGroup
from detector.service.publisher import FindingPublisher


def group(gid: str) -> FindingGroup:
    return FindingGroup(id=gid, version=1)


def test_new_group_goes_out_at_once_later_changes_wait_for_the_interval() -> None:
    pub = FindingPublisher(update_seconds=60)
    g = group("a")
    pub.observe(FindingChange(g, new=True), "p0", 10, now=1000.0)
    assert pub.take_due(1000.0) == [g]
    pub.published([g], 1000.0)
    pub.observe(FindingChange(g, new=False), "p0", 11, now=1010.0)
    assert pub.take_due(1010.0) == []  # held back
    assert pub.commit_bound("p0", 20) == 11  # ... and it pins its offset
    assert pub.commit_bound("p1", 5) == 5  # other partitions are free
    assert pub.take_due(1061.0) == [g]  # the interval passed
    assert pub.commit_bound("p0", 20) == 20


def test_pin_is_the_lowest_contributing_offset_and_flush_all_releases_it() -> None:
    pub = FindingPublisher(update_seconds=60)
    g = group("b")
    pub.observe(FindingChange(g, new=True), "p0", 3, now=0.0)
    pub.published(pub.take_due(0.0), 0.0)
    for offset in (9, 7, 12):  # merged by eventTime, offsets need not rise
        pub.observe(FindingChange(g, new=False), "p0", offset, now=1.0)
    assert pub.commit_bound("p0", 100) == 7
    assert pub.take_due(2.0, flush_all=True) == [g]
    assert pub.commit_bound("p0", 100) == 100


def test_first_change_after_a_quiet_period_goes_out_at_once_and_forget_drops_everything() -> None:
    pub = FindingPublisher(update_seconds=60)
    g = group("c")
    pub.observe(FindingChange(g, new=True), "p0", 1, now=0.0)
    pub.published(pub.take_due(0.0), 0.0)
    pub.observe(FindingChange(g, new=False), "p0", 2, now=120.0)
    assert pub.take_due(120.0) == [g] and not pub.pending
    pub.published([g], 120.0)
    pub.observe(FindingChange(g, new=False), "p0", 3, now=121.0)
    pub.forget(["c"])
    assert not pub.pending and "c" not in pub.last_published
