"""Generic fixtures shared by the test modules (others may append fixtures here)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
INVICTUS_CLOUDTRAIL = REPO / "tests" / "fixtures" / "invictus-aws" / "CloudTrail"


@pytest.fixture(scope="session")
def aws_ranges() -> Any:
    """The packaged AWS ip-ranges snapshot as the engine's address index."""
    from detector.ipranges import load

    return load()[0]


@pytest.fixture(scope="session")
def sample_world() -> Any:
    """The public sample world packaged in ``detector/data/sample-world`` (root, inputs, registry, expected)."""
    from detector.demo import sample_world as _sample_world

    return _sample_world()


@pytest.fixture(scope="session")
def invictus_dir() -> Path:
    """The real Invictus IR CloudTrail dataset (one stolen-instance-credential attack)."""
    return INVICTUS_CLOUDTRAIL


@pytest.fixture
def run_detector() -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """Run the real command line (``python -m detector ARGS...``) and return the completed process."""

    def run(*args: str, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "detector", *map(str, args)],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            cwd=REPO,
            timeout=timeout,
            check=False,
        )

    return run


# -- the Kafka test broker (tests/kafka_support.py): one per session, named in the header and summary ---
@pytest.fixture(scope="session")
def kafka_session_broker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from kafka_support import session_broker

    yield from session_broker(tmp_path_factory)


def pytest_report_header(config: pytest.Config) -> str:
    from kafka_support import planned_broker

    return f"kafka test broker: {planned_broker()}"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    from kafka_support import SESSION_BROKER

    for line in SESSION_BROKER:
        terminalreporter.write_line(line)
