"""``detector demo``: the screen is the findings table; dead letters are one summary line by reason."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import orjson
import pytest

from detector.demo import dead_letter_line, sample_world

pytestmark = pytest.mark.kafka


def test_dead_letter_line() -> None:
    assert dead_letter_line({}, "detector.dlq") == "dead letters: none (topic detector.dlq)"
    assert dead_letter_line({"invalid_json": 2, "unknown_shape": 1, "bad_record": 2}, "dlq") == (
        "dead letters: 5 malformed input(s) on topic dlq (bad_record 2, invalid_json 2, unknown_shape 1)"
    )


def test_demo_screen_has_one_dead_letter_line_and_no_log_lines(run_detector: Any) -> None:
    """The whole demo (a local broker, the service, the sample world): ~15 s, the demo's own pace."""
    world = sample_world()
    replay = run_detector("replay", "--registry", world.registry, *world.inputs)
    expected = orjson.loads(replay.stderr.decode().strip().splitlines()[-1])["summary"]["malformed_reasons"]
    proc = subprocess.run(
        [sys.executable, "-m", "detector", "demo", "--timeout", "90"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=150, check=False,
    )  # fmt: skip
    screen = proc.stdout.decode()
    assert proc.returncode == 0, screen[-3000:]
    lines = screen.splitlines()
    dead = [line for line in lines if line.startswith("dead letters:")]
    assert dead == [dead_letter_line(expected, "detector.dlq")], screen
    assert "dead_letter" not in screen and "[warning" not in screen and "[info" not in screen
    # every line between the table's header and the dead-letter line is a table row
    header = next(i for i, line in enumerate(lines) if line.startswith("severity"))
    rows = lines[header + 2 : lines.index(dead[0])]
    assert rows[-1] == "" and all(re.match(r"(HIGH|MEDIUM) \(\d\)", row) for row in rows[:-1]), rows
