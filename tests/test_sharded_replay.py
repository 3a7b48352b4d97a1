"""The sharded replay (``--jobs`` 3 or more): this process reads and routes every record to the
applier of each instance it concerns (SPEC §10's route keys, the service's function), each applier
keeps its own state. Its results — findings, their order, the summary — must be those of ``--jobs 1``."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from worldgen import make_world, summarize, write_world

import detector.replay
from detector.core.engine import Engine
from detector.core.state import DetectorState
from detector.replay import InputError, Replayer, shard_of


def replay(engine: Engine, inputs: list[Any], jobs: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    replayer = Replayer(engine, DetectorState(), jobs=jobs)
    summary = replayer.run([str(p) for p in inputs])
    return summary.as_dict(), replayer.findings()


def test_shard_of_is_stable_and_spreads() -> None:
    assert shard_of("i-0123456789abcdef0", 3) == shard_of("i-0123456789abcdef0", 3)
    spread = {shard_of(f"i-{n:017x}", 3) for n in range(50)}
    assert spread == {0, 1, 2}
    # not Python's per-process hash: another interpreter agrees
    other = subprocess.run(
        [sys.executable, "-c", "from detector.replay import shard_of; print(shard_of('i-0123456789abcdef0', 7))"],
        capture_output=True, check=True,
    )
    assert int(other.stdout) == shard_of("i-0123456789abcdef0", 7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generated_part2_worlds_are_identical_with_every_jobs(seed: int, aws_ranges: Any, tmp_path: Path) -> None:
    """Every §5/§11-§13 case, multi-instance signals; plain, gzip and .json inputs alike."""
    from detector.registry import load_registry

    world = make_world(seed, n_accounts=4, instances_per_account=4, part2=True)
    paths = write_world(world, tmp_path)
    registry = load_registry(str(tmp_path / "registry.json"))
    one = replay(Engine(registry, aws_ranges), paths, jobs=1)
    assert summarize(one[1]) == world.expected
    for jobs in (2, 3, 4):
        assert replay(Engine(registry, aws_ranges), paths, jobs=jobs) == one, jobs


def test_sample_world_and_invictus_are_identical_with_every_jobs(
    run_detector: Any, sample_world: Any, invictus_dir: Path
) -> None:
    for args in (["--registry", sample_world.registry, *sample_world.inputs], [invictus_dir]):
        outputs = [run_detector("replay", "--jobs", str(jobs), *args) for jobs in (1, 2, 3)]
        assert all(proc.returncode == 0 for proc in outputs)
        assert outputs[0].stdout  # findings, in one order
        assert [proc.stdout for proc in outputs[1:]] == [outputs[0].stdout] * 2
        summaries = [proc.stderr.splitlines()[-1] for proc in outputs]
        assert summaries[1:] == [summaries[0]] * 2


def test_standard_input_and_gzip_are_sharded(run_detector: Any, sample_world: Any, tmp_path: Path) -> None:
    body = b"".join(Path(p).read_bytes().rstrip(b"\n") + b"\n" for p in sample_world.inputs if p.endswith(".jsonl"))
    zipped = tmp_path / "all.jsonl.gz"
    zipped.write_bytes(gzip.compress(body))
    one = run_detector("replay", "--jobs", "1", "--registry", sample_world.registry, zipped)
    three = run_detector("replay", "--jobs", "3", "--registry", sample_world.registry, zipped)
    piped = subprocess.run(
        [sys.executable, "-m", "detector", "replay", "--jobs", "3", "--registry", sample_world.registry, "-"],
        input=body, capture_output=True, check=True,
    )
    assert one.stdout and three.stdout == one.stdout == piped.stdout


class DyingApplier(Replayer):
    """A replay whose first applier is killed once records have been routed to it."""

    def run(self, *args: Any, **kwargs: Any) -> Any:
        original = detector.replay._Shards.route

        def route(shards: Any, record: Any) -> None:
            if shards.procs[0].is_alive():
                os.kill(shards.procs[0].pid, signal.SIGKILL)
                shards.procs[0].join()
            original(shards, record)

        detector.replay._Shards.route = route  # type: ignore[method-assign]
        try:
            return super().run(*args, **kwargs)
        finally:
            detector.replay._Shards.route = original  # type: ignore[method-assign]


def test_an_applier_that_dies_fails_the_replay(aws_ranges: Any, tmp_path: Path) -> None:
    from detector.registry import load_registry

    world = make_world(0, n_accounts=4, instances_per_account=4, part2=True)
    paths = write_world(world, tmp_path)
    replayer = DyingApplier(Engine(load_registry(str(tmp_path / "registry.json")), aws_ranges), DetectorState(), jobs=3)
    with pytest.raises(InputError, match="replay applier 0 stopped"):
        replayer.run([str(p) for p in paths])
    assert replayer.final == {}  # nothing merged as if complete


def test_sigterm_leaves_no_applier_behind(sample_world: Any) -> None:
    """SIGTERM to a replay reading standard input (kept open): it and its appliers are gone."""
    body = b"".join(Path(p).read_bytes().rstrip(b"\n") + b"\n" for p in sample_world.inputs if p.endswith(".jsonl"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "detector", "replay", "--jobs", "3", "--registry", sample_world.registry, "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(body)
    proc.stdin.flush()
    children: list[int] = []
    deadline = time.monotonic() + 20
    while len(children) < 2:
        assert time.monotonic() < deadline, "two appliers started"
        children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    proc.stdin.close()

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(c) for c in children):
        assert time.monotonic() < deadline, "an applier outlived the replay"
        time.sleep(0.02)
    assert proc.stdout is not None and proc.stdout.read() == b""


def test_jobs_accepts_more_than_two(run_detector: Any, sample_world: Any) -> None:
    assert run_detector("replay", "--jobs", "5", "--registry", sample_world.registry, *sample_world.inputs).returncode == 0
    bad = run_detector("replay", "--jobs", "0", *sample_world.inputs)
    assert bad.returncode == 2 and b"--jobs" in bad.stderr
