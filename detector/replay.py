"""``detector replay``: the offline adapter around the core (SPEC §9), for backtests and acceptance.

Inputs stream: JSON Lines are read in blocks of a megabyte and cut at newlines, so memory grows with
sessions and findings, not with the number of records. Each line (and each ``.json`` document) goes
first to the fast decoder (:class:`detector.core.records.FastDecoder`: msgspec validates the whole
input and builds only the fields the engine reads); what it does not accept goes to the reference
:func:`detector.core.records.decode`, so malformed input is counted with the same reasons as before.
"""

from __future__ import annotations

import gzip
import io
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import orjson

from .core.engine import Engine, MalformedRecord
from .core.findings import render
from .core.prefilter import may_matter
from .core.records import _FAST_ERRORS, CLOUDTRAIL_DETAIL_TYPES, SKIPPED, Decoded, FastDecoder, FastRecord, classify, decode, fast_ok
from .core.state import DetectorState, FindingGroup

INPUT_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
BLOCK = 1 << 20  # bytes read at a time from a JSON Lines input


class InputError(Exception):
    """An input that cannot be read at all (missing file, unreadable directory)."""


@dataclass
class Summary:
    inputs: int = 0
    records: int = 0
    instance_records: int = 0
    malformed: int = 0
    skipped: int = 0
    findings: int = 0
    malformed_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "records": self.records,
            "instance_records": self.instance_records,
            "malformed": self.malformed,
            "skipped": self.skipped,
            "findings": self.findings,
            "malformed_reasons": self.malformed_reasons,
        }


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files in the order given; a directory becomes its input files in sorted path order."""
    out: list[str] = []
    for item in inputs:
        if item == "-":
            out.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            out.extend(
                str(p) for p in sorted(path.rglob("*")) if p.is_file() and p.name.lower().endswith(INPUT_SUFFIXES)
            )
        elif path.is_file():
            out.append(item)
        else:
            raise InputError(f"{item}: no such file or directory")
    return out


def _open(name: str) -> BinaryIO:
    if name == "-":
        raw: BinaryIO = sys.stdin.buffer
        head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
        return gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw
    try:
        handle: BinaryIO = open(name, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise InputError(f"{name}: cannot open ({exc.strerror or exc})") from None
    if handle.read(2) == b"\x1f\x8b":
        handle.seek(0)
        return gzip.GzipFile(fileobj=handle)  # type: ignore[return-value]
    handle.seek(0)
    return handle


def _lines(handle: IO[bytes]) -> Iterator[Decoded]:
    for line in handle:
        if line.strip():
            yield decode(line)


def iter_inputs(name: str) -> Iterator[Decoded]:
    """Decoded inputs of one file: a whole JSON document, else JSON Lines."""
    handle = _open(name)
    try:
        lowered = name.lower()
        if name == "-" or lowered.endswith((".jsonl", ".jsonl.gz")):
            yield from _lines(handle)
            return
        data = handle.read()
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            yield from _lines(io.BytesIO(data))  # a .json file that holds JSON Lines
            return
        yield classify(value)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # zlib.error: corrupt deflate data
        raise InputError(f"{name}: cannot read ({exc})") from None
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()


class Replayer:
    """Drives the core over decoded inputs and keeps the final state of every finding group."""

    def __init__(self, engine: Engine, state: DetectorState | None = None) -> None:
        self.engine = engine
        self.state = state or DetectorState()
        self.summary = Summary()
        self.final: dict[str, FindingGroup] = {}

    def _malformed(self, reason: str) -> None:
        self.summary.malformed += 1
        self.summary.malformed_reasons[reason] = self.summary.malformed_reasons.get(reason, 0) + 1

    def feed(self, decoded: Decoded) -> None:
        summary = self.summary
        if decoded.skipped:
            summary.skipped += 1
        for reason in decoded.malformed:
            self._malformed(reason)
        apply = self.engine.apply
        state = self.state
        final = self.final
        for record in decoded.records:
            summary.records += 1
            try:
                changes = apply(state, record)
            except MalformedRecord as exc:
                self._malformed(exc.reason)
                continue
            for change in changes:
                final[change.group.id] = change.group

    def feed_fast(self, record: FastRecord | str) -> None:
        """Apply one result of the fast decoder (a record, or :data:`SKIPPED`)."""
        summary = self.summary
        if record is SKIPPED:
            summary.skipped += 1
            return
        summary.records += 1
        try:
            changes = self.engine.apply_fast(self.state, record)
        except MalformedRecord as exc:
            self._malformed(exc.reason)
            return
        for change in changes:
            self.final[change.group.id] = change.group

    def feed_raw(self, raw: bytes) -> None:
        """One input the fast decoder did not take: the reference decode."""
        self.feed_reference(decode(raw), raw)

    def feed_reference(self, decoded: Decoded, raw: bytes) -> None:
        """Apply a reference decode of ``raw``. When ``raw`` cannot hold a record that matters
        (:func:`may_matter`), its records are counted without the engine's per-record checks."""
        if decoded.records and not may_matter(raw):
            count = len(decoded.records)
            decoded.records = []
            self.summary.records += count
            self.engine.counters.records += count
        self.feed(decoded)

    def _feed_lines(self, handle: IO[bytes]) -> None:
        fast = FastDecoder()
        decode_line = fast.decode_line
        as_record = fast._as_record
        eventbridge = fast._eventbridge.decode
        feed_raw = self.feed_raw
        apply_fast = self.engine.apply_fast
        counters = self.engine.counters
        state = self.state
        final = self.final
        summary = self.summary
        rest = b""
        while True:
            data = handle.read(BLOCK)
            if not data:
                break
            end = data.rfind(b"\n")
            if end < 0:
                rest += data
                continue
            pos = 0
            if rest:  # the line cut at the previous block's end (no copy of this block to join it)
                pos = data.find(b"\n") + 1
                self._feed_line(rest + data[: pos - 1], decode_line)
            rest = data[end + 1 :]
            ascii_ok = data.isascii() and fast_ok()
            view = memoryview(data)
            find = data.find
            counted = 0  # records that cannot matter: counted here, not passed to the engine
            applied = 0
            while pos <= end:
                nl = find(b"\n", pos, end + 1)
                line = view[pos:nl]
                pos = nl + 1
                if not ascii_ok and not line.tobytes().isascii():
                    result = None
                elif fast._eventbridge_first:  # FastDecoder.decode_line, inlined for the usual shape
                    try:
                        env = eventbridge(line)
                    except _FAST_ERRORS:
                        result = as_record(line, True)
                    else:
                        result = env.detail if env.detail_type in CLOUDTRAIL_DETAIL_TYPES else SKIPPED
                else:
                    result = decode_line(line)
                if result is None:
                    raw = line.tobytes()
                    if raw.strip():
                        feed_raw(raw)
                elif result is SKIPPED:
                    summary.skipped += 1
                else:
                    if result.eventName != "AssumeRole":
                        identity = result.userIdentity
                        # Engine.apply_fast would only count it: no instance session ARN without "/i-"
                        if identity.type != "AssumedRole" or type(identity.arn) is not str or "/i-" not in identity.arn:
                            counted += 1
                            continue
                    applied += 1  # feed_fast, inlined: this loop runs once per input line
                    try:
                        changes = apply_fast(state, result)
                    except MalformedRecord as exc:
                        self._malformed(exc.reason)
                        continue
                    for change in changes:
                        final[change.group.id] = change.group
            summary.records += counted + applied
            counters.records += counted
            view.release()
        self._feed_line(rest, decode_line)

    def _feed_line(self, raw: bytes, decode_line: Any) -> None:
        """One JSON Lines input outside the block loop (cut across blocks, or the last one)."""
        if raw.strip():
            result = decode_line(raw) if raw.isascii() and fast_ok() else None
            if result is None:
                self.feed_raw(raw)
            else:
                self.feed_fast(result)

    def _feed_file(self, name: str) -> None:
        handle = _open(name)
        try:
            lowered = name.lower()
            if name == "-" or lowered.endswith((".jsonl", ".jsonl.gz")):
                self._feed_lines(handle)
                return
            data = handle.read()
            records = FastDecoder().decode_document(data)
            if records is not None:
                for record in records:
                    self.feed_fast(record)
                return
            try:
                value = orjson.loads(data)
            except orjson.JSONDecodeError:
                self._feed_lines(io.BytesIO(data))  # a .json file that holds JSON Lines
                return
            self.feed_reference(classify(value), data)
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # zlib.error: corrupt deflate data
            raise InputError(f"{name}: cannot read ({exc})") from None
        finally:
            if handle is not sys.stdin.buffer:
                handle.close()

    def run(self, inputs: list[str]) -> Summary:
        for name in expand_inputs(inputs):
            self.summary.inputs += 1
            self._feed_file(name)
        self.summary.instance_records = self.engine.counters.instance_records
        self.summary.findings = len(self.final)
        return self.summary

    def findings(self) -> list[dict[str, Any]]:
        return [render(group) for group in self.final.values()]


def write_findings(findings: list[dict[str, Any]], out: IO[bytes]) -> None:
    for finding in findings:
        out.write(orjson.dumps(finding) + b"\n")
