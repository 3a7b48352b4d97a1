"""The embedded default: the bundled sample world, and a readable table of findings."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO


@dataclass(frozen=True)
class World:
    root: Path
    inputs: list[str]
    registry: Path
    expected: Path


def sample_world() -> World:
    root = Path(str(resources.files("detector") / "data" / "sample-world"))
    names = (root / "files.txt").read_text().split()
    return World(root, [str(root / n) for n in names], root / "registry.json", root / "expected.json")


_COLUMNS = ("severity", "type", "account", "instance", "remote account", "count", "last seen", "id")


def table_row(finding: dict[str, Any]) -> tuple[str, ...]:
    action = finding["service"]["action"]["awsApiCallAction"]
    remote = action.get("remoteAccountDetails", {})
    sev = finding["severity"]
    return (
        f"{'HIGH' if sev >= 7 else 'MEDIUM'} ({sev})",
        finding["type"].rsplit(".", 1)[-1],
        finding["accountId"],
        finding["resource"]["instanceDetails"]["instanceId"],
        remote.get("accountId", "unknown" if remote else "-"),
        str(finding["service"]["count"]),
        finding["service"]["eventLastSeen"],
        finding["id"],
    )


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(_COLUMNS)]
    line = "  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def print_table(findings: list[dict[str, Any]], out: TextIO) -> None:
    out.write(format_table([table_row(f) for f in findings]) + "\n")
