"""The split replay (``--jobs 2``): a forked scanner decodes and sorts every line, this process applies
the ones that may matter. Its results must be those of the one-process replay and of the reference
path, whatever the input: messy lines, lines cut across blocks, generated labelled worlds."""

from __future__ import annotations

import os
import random
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from test_prefilter import mutations, reference_replay, sample_lines
from worldgen import make_world, summarize, write_world

import detector.replay
from detector.core.engine import Engine
from detector.core.state import DetectorState
from detector.replay import InputError, Replayer, default_jobs


class SplitReplayer(Replayer):
    """A Replayer that counts the files it replayed in two processes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.splits = 0

    def _feed_lines_split(self, *args: Any) -> None:
        self.splits += 1
        super()._feed_lines_split(*args)


def replay(engine: Engine, inputs: list[Any], jobs: int) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    replayer = SplitReplayer(engine, DetectorState(), jobs=jobs)
    summary = replayer.run([str(p) for p in inputs])
    return summary.as_dict(), replayer.findings(), replayer.splits


@pytest.fixture
def split_every_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detector.replay, "SPLIT_MIN_BYTES", 1)


@pytest.fixture(scope="module")
def engine_parts(sample_world: Any, aws_ranges: Any) -> tuple[Any, Any]:
    from detector.registry import load_registry

    return load_registry(sample_world.registry), aws_ranges


def big_jsonl(path: Path) -> int:
    """A plain JSON Lines file of at least ``SPLIT_MIN_BYTES``: the JSON Lines inputs of generated
    worlds one after another (their lines, not their labels, matter here). Returns its line count."""
    parts: list[bytes] = []
    size = seed = 0
    while size < detector.replay.SPLIT_MIN_BYTES:
        for name, data in make_world(seed, n_accounts=12, instances_per_account=20).inputs:
            if name.endswith(".jsonl"):
                parts.append(data if data.endswith(b"\n") else data + b"\n")
                size += len(parts[-1])
        seed += 1
    body = b"".join(parts)
    path.write_bytes(body)
    return body.count(b"\n")


def messy_body(sample_world: Any, seed: int) -> bytes:
    """The sample world's lines with mutations, blank lines, CRLF, non-ASCII and no final newline."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    for raw in sample_lines(sample_world):
        lines.append(raw)
        if rng.random() < 0.2:
            mutated = rng.choice(mutations(raw, rng)).replace(b"\n", b"")
            if b"1e400" not in mutated:  # the fast decoder's documented difference
                lines.append(mutated)
        if rng.random() < 0.03:
            lines.append(rng.choice([b"", b"   ", b"\r", b"{}", b"not json", "caf\u00e9".encode()]))
    return b"\n".join(lines)


@pytest.mark.usefixtures("split_every_file")
@pytest.mark.parametrize("handoff", ["records", "offsets", "auto"])
@pytest.mark.parametrize("block", [64, 1000, 1 << 20])
def test_split_replay_equals_one_process_and_reference_on_a_messy_stream(
    block: int, handoff: str, sample_world: Any, engine_parts: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever way the scanner hands lines over: records it decoded (msgpack), or offsets."""
    registry, ranges = engine_parts
    monkeypatch.setattr(detector.replay, "SPLIT_HANDOFF", handoff)
    body = messy_body(sample_world, block)
    (tmp_path / "a.jsonl").write_bytes(body)
    (tmp_path / "b.jsonl").write_bytes(body.replace(b"\n", b"\r\n") + b"\n")
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    expected = reference_replay(Engine(registry, ranges), [str(p) for p in inputs])
    monkeypatch.setattr(detector.replay, "BLOCK", block)  # the forked scanner inherits it
    one = replay(Engine(registry, ranges), inputs, jobs=1)
    two = replay(Engine(registry, ranges), inputs, jobs=2)
    assert one == (*expected, 0)
    assert two == (*expected, 2)
    assert expected[0]["malformed"] > 0 and expected[1]


@pytest.mark.usefixtures("split_every_file")
@pytest.mark.parametrize(("seed", "handoff"), [(0, "records"), (1, "offsets"), (2, "auto")])
def test_split_replay_of_generated_worlds_matches_their_labels(
    seed: int, handoff: str, aws_ranges: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detector.registry import load_registry

    monkeypatch.setattr(detector.replay, "SPLIT_HANDOFF", handoff)
    world = make_world(seed, n_accounts=3, instances_per_account=3)
    paths = write_world(world, tmp_path)
    jsonl = [p for p in paths if p.name.endswith(".jsonl")]
    assert jsonl, "the world has JSON Lines inputs to split"
    registry = load_registry(str(tmp_path / "registry.json"))
    summary, findings, splits = replay(Engine(registry, aws_ranges), paths, jobs=2)
    assert splits == len(jsonl)
    assert summarize(findings) == world.expected
    assert summary["records"] == len(world.records_in_order) + world.state_changes
    assert summary["instance_records"] == world.instance_records
    assert summary["malformed"] == world.malformed
    assert summary["skipped"] == world.skipped
    assert (summary, findings) == replay(Engine(registry, aws_ranges), paths, jobs=1)[:2]


def test_only_large_plain_json_lines_files_are_split(engine_parts: Any, tmp_path: Path) -> None:
    import gzip

    registry, ranges = engine_parts
    big = tmp_path / "big.jsonl"
    lines = big_jsonl(big)
    small = tmp_path / "small.jsonl"
    small.write_bytes(big.read_bytes()[:100_000])  # cut mid-line: its last line is malformed
    zipped = tmp_path / "big.jsonl.gz"
    zipped.write_bytes(gzip.compress(big.read_bytes(), compresslevel=1))
    one = replay(Engine(registry, ranges), [big, small, zipped], jobs=1)
    two = replay(Engine(registry, ranges), [big, small, zipped], jobs=2)
    assert two[2] == 1  # the big plain file only
    assert one[:2] == two[:2]
    summary = two[0]
    assert summary["records"] > 2 * lines * 0.9 and summary["instance_records"] > 0 and summary["malformed"] > 0
    assert two[1]


@pytest.mark.usefixtures("split_every_file")
def test_records_that_msgpack_cannot_carry_are_decoded_by_the_parent(
    sample_world: Any, engine_parts: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An integer beyond 64 bits in a field the fast decoder keeps: the block goes over as offsets."""
    monkeypatch.setattr(detector.replay, "SPLIT_HANDOFF", "records")
    lines = sample_lines(sample_world)
    odd = [re.sub(rb'"eventVersion":"1\.(08|10)"', b'"eventVersion":123456789012345678901234567890', line) for line in lines]
    assert any(b"123456789012345678901234567890" in line and b"/i-" in line for line in odd)
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\n".join(odd) + b"\n")
    expected = reference_replay(Engine(*engine_parts), [str(path)])
    assert replay(Engine(*engine_parts), [path], jobs=2) == (*expected, 1)
    assert expected[1]  # findings: the odd records were applied


def killed(*args: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def failing(*args: Any) -> None:
    raise OSError(5, "Input/output error")


@pytest.mark.usefixtures("split_every_file")
@pytest.mark.parametrize(
    ("scanner", "message"),
    [
        (killed, r"a\.jsonl: the line scanner stopped \(exit code -9\)"),
        (failing, r"a\.jsonl: cannot read \(OSError: \[Errno 5\] Input/output error\)"),
    ],
)
def test_a_scanner_that_dies_or_fails_is_a_clear_error(
    scanner: Any, message: str, sample_world: Any, engine_parts: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\n".join(sample_lines(sample_world)))
    monkeypatch.setattr(detector.replay, "scan_lines", scanner)  # runs in the forked scanner only
    with pytest.raises(InputError, match=message):
        replay(Engine(*engine_parts), [path], jobs=2)


@pytest.mark.usefixtures("split_every_file")
def test_a_file_truncated_while_it_is_read_is_a_clear_error(
    sample_world: Any, engine_parts: Any, tmp_path: Path
) -> None:
    """Like a log rotated with copytruncate: an error, not a crash (a mapping of it would SIGBUS)."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\n".join(sample_lines(sample_world)) + b"\n")

    class Truncating(SplitReplayer):
        def _tally(self, skipped: int, counted: int) -> None:
            os.truncate(path, 0)  # after the scanner read a block, before this process reads its lines
            super()._tally(skipped, counted)

    with pytest.raises(InputError, match=r"a\.jsonl: the file shrank while it was read"):
        Truncating(Engine(*engine_parts), DetectorState(), jobs=2).run([str(path)])


def test_the_command_line_splits_by_default_with_the_same_results(run_detector: Any, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    big_jsonl(path)
    one = run_detector("replay", "--jobs", "1", path)
    two = run_detector("replay", "--jobs", "2", path)
    default = run_detector("replay", path)
    for proc in (one, two, default):
        assert proc.returncode == 0, proc.stderr.decode()
    assert one.stdout and one.stdout == two.stdout == default.stdout
    assert one.stderr == two.stderr == default.stderr  # the summary
    assert default_jobs() == (2 if len(os.sched_getaffinity(0)) >= 2 else 1)
    bad = run_detector("replay", "--jobs", "0", path)
    assert bad.returncode == 2 and b"--jobs" in bad.stderr
