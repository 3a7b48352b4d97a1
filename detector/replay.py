"""``detector replay``: the offline adapter around the core (SPEC §9), for backtests and acceptance.

Inputs stream: JSON Lines are read in blocks of a megabyte and cut at newlines, so memory grows with
sessions and findings, not with the number of records. Each line (and each ``.json`` document) goes
first to the fast decoder (:class:`detector.core.records.FastDecoder`: msgspec validates the whole
input and builds only the fields the engine reads); what it does not accept goes to the reference
:func:`detector.core.records.decode`, so malformed input is counted with the same reasons as before.

With ``jobs`` 2 (the command line's default on two CPUs or more), a large plain JSON Lines file is
split between two processes: a forked scanner decodes and sorts every line, this process applies the
ones that may matter, in order (:meth:`Replayer._feed_lines_split`); the results are the same.
"""

from __future__ import annotations

import gzip
import io
import os
import signal
import sys
import time
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import msgspec
import orjson
from msgspec import UNSET

from .core.engine import Engine, MalformedRecord, check_decidable, parse_event_time, route_keys, session_parts
from .core.findings import render
from .core.prefilter import may_matter
from .core.records import (
    _FAST_ERRORS, CLOUDTRAIL_DETAIL_TYPES, SKIPPED, STATE_CHANGE, Decoded, FastDecoder, FastRecord, StateChange,
    classify, decode, fast_ok, matters,
)  # fmt: skip
from .core.state import DetectorState, FindingGroup

INPUT_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
BLOCK = 1 << 20  # bytes read at a time from a JSON Lines input
SPLIT_MIN_BYTES = 4 << 20  # smallest plain JSON Lines file replayed in two processes (jobs >= 2)
_RECORD, _LINE = ord("r"), ord("o")  # how the scanner of a split replay passes on a line
SPLIT_HANDOFF = "auto"  # "records" or "offsets" pins one way for every block (tests use both)


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
            "malformed_reasons": dict(sorted(self.malformed_reasons.items())),  # one order whatever --jobs
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


def _gunzip_if_gzip(handle: BinaryIO) -> BinaryIO:
    """``handle``, or a decompressing reader over it when its first bytes are gzip's magic number.
    ``handle`` must be seekable or have ``peek`` (a buffered reader)."""
    if hasattr(handle, "peek") and not handle.seekable():
        head = handle.peek(2)[:2]
    else:
        head = handle.read(2)
        handle.seek(0)
    return gzip.GzipFile(fileobj=handle) if head == b"\x1f\x8b" else handle  # type: ignore[return-value]


def _open(name: str) -> BinaryIO:
    if name == "-":
        raw: BinaryIO = sys.stdin.buffer
        head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
        return gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw
    try:
        handle: BinaryIO = open(name, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise InputError(f"{name}: cannot open ({exc.strerror or exc})") from None
    return _gunzip_if_gzip(handle)


@dataclass
class Source:
    """One input of a replay, local or remote: its name (a path, ``-``, ``s3://bucket/key``), how to open
    its bytes (gzip is recognised by its magic number), and what an unreadable one means.

    ``tolerant``: a source that fails while it is read (a corrupt or vanished S3 object) is counted as
    malformed (reason ``unreadable_input``) and the replay goes on; a local file that cannot be read is
    an error, as before. ``local``: a file of this machine (a large plain one may be split, ``--jobs``).
    ``done`` is called once the source has been read (or has failed)."""

    name: str
    open: Callable[[], BinaryIO]
    size: int | None = None
    tolerant: bool = False
    local: bool = True
    done: Callable[[], None] | None = None


def local_source(name: str) -> Source:
    size = None
    if name != "-":
        try:
            size = os.stat(name).st_size
        except OSError:
            size = None
    return Source(name, lambda: _open(name), size)


def iter_sources(inputs: list[str], remote: Callable[[str], Iterator[Source]] | None = None) -> Iterator[Source]:
    """The inputs' sources in the order given: a directory expanded (sorted paths), an ``s3://`` URL
    by ``remote`` (its objects in key order). Local paths are checked before anything is read."""
    expanded: list[list[str] | str] = []
    for item in inputs:
        if item.startswith("s3://"):
            if remote is None:
                raise InputError(f"{item}: s3:// inputs are not available here")
            expanded.append(item)
        else:
            expanded.append(expand_inputs([item]))
    for entry in expanded:
        if isinstance(entry, str):
            yield from remote(entry)  # type: ignore[misc]
        else:
            for name in entry:
                yield local_source(name)


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


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_jobs() -> int:
    """2 (a split replay) when this process may run on two CPUs or more, else 1. A sharded replay
    (``--jobs`` 3 or more) is never the default: on 2 CPUs it measured slower than both (this process,
    which reads and routes everything, is then the bottleneck; docs/performance.md)."""
    return 2 if usable_cpus() >= 2 else 1


def shard_of(instance_id: str, shards: int) -> int:
    """The applier of a sharded replay that keeps ``instance_id``: a stable hash (CRC-32), not
    Python's per-process ``hash``."""
    return zlib.crc32(instance_id.encode()) % shards


_BATCH = 2048  # records sent to an applier at a time


def _apply_process(conn: Any, engine: Engine, config: Any, siblings: list[Any]) -> None:
    """An applier of a sharded replay (a forked process): its own :class:`DetectorState`, fed batches
    ``(seqs, hints, only, records)`` of the records of its instances in stream order. Before each record
    its stream time is raised to ``hint`` (the stream time of the whole replay before that record), so
    times and TTLs are those of the one-process replay. At ``None`` it answers with its results.
    ``siblings``: the parent's ends of the earlier appliers' pipes, inherited by the fork and closed
    here, so that each applier sees the end of its pipe (and exits) when the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt is the parent's to report
    for sibling in siblings:
        sibling.close()
    state = DetectorState(config)
    apply = engine.apply
    final: dict[str, list[Any]] = {}  # group id -> [seq of the record that opened it, index, group]
    malformed: dict[str, int] = {}
    decode_records = msgspec.msgpack.Decoder(list[FastRecord]).decode
    try:
        while True:
            message = conn.recv()
            if message is None:
                break
            seqs, hints, only, blob, others = message
            records: list[Any] = decode_records(blob) if blob else []
            for pos, record in others:
                records.insert(pos, record)
            for i, record in enumerate(records):
                hint = hints[i]
                if hint > state.stream_time:
                    state.stream_time = hint
                try:
                    changes = apply(state, record, only.get(i))
                except MalformedRecord as exc:
                    malformed[exc.reason] = malformed.get(exc.reason, 0) + 1
                    continue
                for j, change in enumerate(changes):
                    entry = final.get(change.group.id)
                    if entry is None:
                        final[change.group.id] = [seqs[i], j, change.group]
                    else:
                        entry[2] = change.group
        counters = engine.counters
        conn.send((list(final.values()), malformed, counters.origin, counters.issuance_records))
    except EOFError:
        pass  # the parent is gone (interrupted or failed): nothing to report to
    finally:
        conn.close()


class _Shards:
    """The appliers of a sharded replay and what this process routes to them (:meth:`route`)."""

    def __init__(self, engine: Engine, config: Any, count: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.count = count
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for n in range(count):
            parent, child = context.Pipe()
            proc = context.Process(target=_apply_process, args=(child, engine, config, [*self.conns, parent]), name=f"detector-apply-{n}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self.seq = 0
        self.clock = 0.0  # the replay's stream time: the newest event time of the records routed so far
        self.last_time: Any = None
        self.buffers: list[list[Any]] = [[[], array("d"), {}, [], []] for _ in range(count)]
        self.encode = msgspec.msgpack.Encoder().encode

    def _dead(self, n: int) -> InputError:
        self.procs[n].join(timeout=1.0)
        return InputError(f"replay applier {n} stopped (exit code {self.procs[n].exitcode}); no findings written")

    def route(self, record: Any) -> None:
        """Send ``record`` to the applier of each instance it concerns (raises :class:`MalformedRecord`
        as :func:`route_keys` does; a record of no instance is only counted, as the engine would)."""
        keys = route_keys(record)
        seq = self.seq
        self.seq = seq + 1
        if not keys:
            return
        hint = self.clock
        event_time = record.get("eventTime") if isinstance(record, dict) else getattr(record, "eventTime", None)
        if event_time != self.last_time and type(event_time) is str:
            try:
                ts = parse_event_time(event_time)
            except MalformedRecord:
                ts = 0.0
            if ts > self.clock and self._advances(record):
                self.clock = ts
                self.last_time = event_time
        count = self.count
        many = len(keys) > 1  # one copy per instance, each applied only for its instance (as the service does)
        for key in keys:
            n = shard_of(key, count) if count > 1 else 0
            buffer = self.buffers[n]
            records = buffer[3]
            i = len(records) + len(buffer[4])
            buffer[0].append(seq)
            buffer[1].append(hint)
            if many:
                buffer[2][i] = key
            if type(record) is FastRecord:
                records.append(record)
            else:
                buffer[4].append((i, record))
            if i + 1 >= _BATCH:
                self._flush(n)

    @staticmethod
    def _advances(record: Any) -> bool:
        """Whether the engine moves its stream time for ``record`` (a routed record whose time parses):
        not for a session record it rejects (:func:`check_decidable`: its source is no address).
        Asked only when the record's time is the newest yet."""
        if isinstance(record, dict) or type(record) is StateChange:
            return True  # a dict was checked by route_keys; a state change has no source
        identity = getattr(record, "userIdentity", None)
        if identity is None or identity.type != "AssumedRole":
            return True
        as_dict = msgspec.to_builtins(record)
        if session_parts(as_dict) is None:
            return True
        try:
            check_decidable(as_dict)
        except MalformedRecord:
            return False
        return True

    def _flush(self, n: int) -> None:
        seqs, hints, only, records, others = self.buffers[n]
        if not seqs:
            return
        try:
            blob = self.encode(records) if records else b""
        except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError):
            others = sorted(others + [(i, r) for i, r in zip(self._positions(seqs, others), records, strict=True)])
            blob = b""
        try:
            self.conns[n].send((seqs, hints, only, blob, others))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise self._dead(n) from None
        self.buffers[n] = [[], array("d"), {}, [], []]

    @staticmethod
    def _positions(seqs: list[int], others: list[tuple[int, Any]]) -> list[int]:
        taken = {i for i, _ in others}
        return [i for i in range(len(seqs)) if i not in taken]

    def finish(self) -> list[tuple[list[list[Any]], dict[str, int], dict[str, int], int]]:
        """Flush every applier, tell it the stream ended, and collect its results."""
        for n in range(self.count):
            self._flush(n)
            try:
                self.conns[n].send(None)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                raise self._dead(n) from None
        results = []
        for n in range(self.count):
            try:
                results.append(self.conns[n].recv())
            except (EOFError, ConnectionResetError):
                raise self._dead(n) from None
        return results

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()


def scan_lines(
    read: Callable[[int], bytes],
    fast: FastDecoder,
    take: Callable[[Any, FastRecord | str | None, int, int], None],
    tally: Callable[[int, int], None],
) -> None:
    """Read JSON Lines in blocks of ``BLOCK`` bytes, cut them at newlines and sort every line.

    Each line is decoded by ``fast`` (its EventBridge shape inlined). A line that is another
    EventBridge event, or a CloudTrail record that cannot matter (:func:`records.matters`: not made
    with instance credentials, not EC2 issuing them, not a lifecycle signal's eventName;
    :meth:`Engine.apply` would only count it), is only
    counted: ``tally(skipped, counted)`` once per block. Every other line goes to
    ``take(line, result, start, end)`` in input order, with the decoder's result (a record,
    ``SKIPPED``, or ``None`` when the line needs the reference decode) and its offsets in the input.
    Lines are memoryviews of the block (no copy), except one cut across two blocks (joined bytes).
    """
    eventbridge = fast._eventbridge.decode
    as_record = fast._as_record
    decode_line = fast.decode_line
    base = 0  # input offset of the current block
    rest = b""  # the unfinished line at the end of the previous blocks
    rest_start = 0
    while True:
        data = read(BLOCK)
        if not data:
            break
        end = data.rfind(b"\n")
        if end < 0:
            if not rest:
                rest_start = base
            rest += data
            base += len(data)
            continue
        pos = 0
        if rest:  # the line cut at the previous block's end (no copy of this block to join it)
            pos = data.find(b"\n") + 1
            line = rest + data[: pos - 1]
            take(line, decode_line(line) if line.isascii() and fast_ok() else None, rest_start, base + pos - 1)
        rest = data[end + 1 :]
        rest_start = base + end + 1
        ascii_ok = data.isascii() and fast_ok()
        view = memoryview(data)
        find = data.find
        skipped = counted = 0
        while pos <= end:
            nl = find(b"\n", pos, end + 1)
            line = view[pos:nl]
            start = pos
            pos = nl + 1
            if not ascii_ok and not line.tobytes().isascii():
                result = None
            elif fast._eventbridge_first:  # FastDecoder.decode_line, inlined for the usual shape
                try:
                    env = eventbridge(line)
                except _FAST_ERRORS:
                    result = as_record(line, True)
                else:  # records.detail_of, inlined
                    kind = env.detail_type
                    if kind in CLOUDTRAIL_DETAIL_TYPES:
                        result = env.detail
                        if result.eventVersion is UNSET and result.eventTime is None:
                            result = None  # neither eventVersion nor eventTime: the reference decides
                    elif kind == STATE_CHANGE:
                        result = None  # lifecycle input (SPEC §10), decoded by the reference path
                    else:
                        skipped += 1
                        continue
            else:
                result = decode_line(line)
                if result is SKIPPED:
                    skipped += 1
                    continue
            if result is not None and not matters(result):  # the exact SPEC §3 test: decoys stop here
                counted += 1
                continue
            take(line, result, base + start, base + nl)
        view.release()
        tally(skipped, counted)
        base += len(data)
    if rest:
        take(rest, decode_line(rest) if rest.isascii() and fast_ok() else None, rest_start, base)


def _scan_process(fd: int, size: int, sender: Any) -> None:
    """The scanner of a split replay (a forked process): :func:`scan_lines` over the first ``size``
    bytes of the open file ``fd`` (inherited; read with ``pread``, so no file position is shared).

    Sends per block ``(skipped, counted, kinds, offsets, records)``: for every line to apply, in order,
    a kind (``r``: a decoded record, ``o``: a line the parent decodes itself) and its start and end
    (``offsets``, the bytes of an ``array("q")``); ``records`` the decoded records as msgpack (a
    lossless copy of the structs, decoded in a third of the time of their JSON), or ``None`` when
    they cannot be encoded (an integer beyond 64 bits, say): then every line is ``o``. Then ``None``;
    on an error, its message instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt is the parent's to report
    spans = array("q")
    kinds = bytearray()
    records: list[FastRecord] = []
    encode = msgspec.msgpack.Encoder().encode
    offset = 0
    # Which process does the decoding of the lines to apply: this one (records) when the parent is the
    # slower (a send had to wait for it to read), else the parent (offsets). Both give the same records.
    handoff = SPLIT_HANDOFF
    give_records = handoff == "records"
    clock = time.perf_counter
    block_started = clock()

    def read(n: int) -> bytes:
        nonlocal offset
        data = os.pread(fd, min(n, size - offset), offset)
        offset += len(data)
        return data

    def take(line: Any, result: Any, start: int, end: int) -> None:
        spans.append(start)
        spans.append(end)
        if give_records and result is not None and result is not SKIPPED:
            kinds.append(_RECORD)
            records.append(result)
        else:
            kinds.append(_LINE)

    def tally(skipped: int, counted: int) -> None:
        nonlocal give_records, block_started
        blob: bytes | None = b""
        if records:
            try:
                blob = encode(records)
            except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError):
                blob = None  # not encodable losslessly: the parent decodes these lines itself
        sent = clock()
        sender.send((skipped, counted, bytes(kinds) if blob is not None else b"o" * len(kinds), spans.tobytes(), blob))
        done = clock()
        if handoff == "auto":  # waited on the parent for more than a fifth of a block's work: help it
            give_records = done - sent > 0.2 * (sent - block_started)
        block_started = done
        del spans[:]
        kinds.clear()
        records.clear()

    try:
        scan_lines(read, FastDecoder(), take, tally)
        tally(0, 0)
        sender.send(None)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises InputError
        sender.send(f"{type(exc).__name__}: {exc}")
    finally:
        sender.close()


class Replayer:
    """Drives the core over decoded inputs and keeps the final state of every finding group."""

    def __init__(
        self, engine: Engine, state: DetectorState | None = None, jobs: int = 1, warn: Callable[[str], None] | None = None
    ) -> None:
        self.engine = engine
        self.warn = warn or (lambda message: print(f"detector replay: warning: {message}", file=sys.stderr))
        self.state = state or DetectorState()
        self.jobs = jobs
        self.summary = Summary()
        self.final: dict[str, FindingGroup] = {}
        self._shards: _Shards | None = None
        self._apply: Callable[[DetectorState, Any], Iterable[Any]] = engine.apply

    def _route(self, state: DetectorState, record: Any) -> tuple[()]:
        """:meth:`Engine.apply` of a sharded replay: the record goes to its instances' appliers."""
        self._shards.route(record)  # type: ignore[union-attr]
        return ()

    def _malformed(self, reason: str) -> None:
        self.summary.malformed += 1
        self.summary.malformed_reasons[reason] = self.summary.malformed_reasons.get(reason, 0) + 1

    def feed(self, decoded: Decoded) -> None:
        summary = self.summary
        if decoded.skipped:
            summary.skipped += 1
        for reason in decoded.malformed:
            self._malformed(reason)
        apply = self._apply
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

    def _taker(self) -> Callable[[Any, FastRecord | str | None, int, int], None]:
        """The ``take`` of :func:`scan_lines`: a line's fast-decoder result applied (a record), counted
        (``SKIPPED``), or the line given to the reference decode (``None``). A closure over this
        replay's parts, as it runs once per record that may matter."""
        summary, final, state = self.summary, self.final, self.state
        apply, feed_raw, malformed = self._apply, self.feed_raw, self._malformed

        def take(line: Any, result: FastRecord | str | None, start: int, end: int) -> None:
            if result is None:
                raw = bytes(line)
                if raw.strip():
                    feed_raw(raw)
                return
            if result is SKIPPED:
                summary.skipped += 1
                return
            summary.records += 1
            try:
                changes = apply(state, result)
            except MalformedRecord as exc:
                malformed(exc.reason)
                return
            for change in changes:
                final[change.group.id] = change.group

        return take

    def _tally(self, skipped: int, counted: int) -> None:
        """Lines :func:`scan_lines` only counted: other EventBridge events, records that cannot matter."""
        self.summary.skipped += skipped
        self.summary.records += counted
        self.engine.counters.records += counted

    def _feed_lines(self, handle: IO[bytes]) -> None:
        scan_lines(handle.read, FastDecoder(), self._taker(), self._tally)

    def _feed_lines_split(self, name: str, handle: BinaryIO, size: int) -> None:
        """:meth:`_feed_lines` for a plain file, in two processes: a forked scanner decodes and sorts
        every line (:func:`scan_lines`) and sends what needs the engine — the records it decoded, and the
        offsets of lines it could not, which this process reads again and decodes — and this process
        applies them in order."""
        import multiprocessing

        context = multiprocessing.get_context("fork")
        receiver, sender = context.Pipe(duplex=False)
        fd = handle.fileno()
        scanner = context.Process(target=_scan_process, args=(fd, size, sender), name="detector-scan", daemon=True)
        scanner.start()
        sender.close()
        decode_line = FastDecoder().decode_line
        decode_records = msgspec.msgpack.Decoder(list[FastRecord]).decode
        take = self._taker()
        try:
            while True:
                try:
                    message = receiver.recv()
                except EOFError:
                    scanner.join()
                    raise InputError(f"{name}: the line scanner stopped (exit code {scanner.exitcode})") from None
                if message is None:
                    break
                if isinstance(message, str):
                    raise InputError(f"{name}: cannot read ({message})")
                skipped, counted, kinds, spans, blob = message
                self._tally(skipped, counted)
                if not kinds:
                    continue
                offsets = array("q")
                offsets.frombytes(spans)
                records = decode_records(blob) if blob else ()
                lines = b""
                low = 0
                if _LINE in kinds:
                    # The bytes of the lines to decode here, read again: one pread per block (a mapping
                    # would be cheaper, but a file truncated under it kills the process with SIGBUS).
                    first, last = kinds.index(_LINE), kinds.rindex(_LINE)
                    low, high = offsets[2 * first], offsets[2 * last + 1]
                    lines = os.pread(fd, high - low, low)
                    if len(lines) < high - low:
                        raise InputError(f"{name}: the file shrank while it was read")
                ok = fast_ok()
                next_record = iter(records).__next__
                for i, kind in enumerate(kinds):
                    if kind == _RECORD:
                        take(None, next_record(), 0, 0)
                    else:
                        raw = lines[offsets[2 * i] - low : offsets[2 * i + 1] - low]
                        take(raw, decode_line(raw) if ok and raw.isascii() else None, 0, 0)
        finally:
            receiver.close()
            if scanner.is_alive():
                scanner.terminate()
            scanner.join()

    def _split_size(self, source: Source, handle: BinaryIO) -> int:
        """The size of ``source`` when it is to be replayed in two processes (:meth:`_feed_lines_split`):
        ``jobs`` 2, a plain local file (not standard input, not gzip) of at least ``SPLIT_MIN_BYTES``,
        and ``fork`` available; else 0."""
        if self.jobs != 2 or not source.local or source.name == "-" or not isinstance(handle, io.BufferedReader):
            return 0
        size = os.fstat(handle.fileno()).st_size
        if size < SPLIT_MIN_BYTES:
            return 0
        import multiprocessing  # here, not at start-up: 5 ms of imports only a large input needs

        return size if "fork" in multiprocessing.get_all_start_methods() else 0

    def _feed_source(self, source: Source) -> None:
        name = source.name
        handle = source.open()
        try:
            lowered = name.lower()
            if name == "-" or lowered.endswith((".jsonl", ".jsonl.gz")):
                size = self._split_size(source, handle)
                if size:
                    self._feed_lines_split(name, handle, size)
                else:
                    self._feed_lines(handle)
                return
            data = handle.read()
            records = FastDecoder().decode_document(data)
            if records is not None:
                take = self._taker()
                for record in records:
                    take(None, record, 0, 0)
                return
            try:
                value = orjson.loads(data)
            except orjson.JSONDecodeError:
                self._feed_lines(io.BytesIO(data))  # a .json file that holds JSON Lines
                return
            self.feed_reference(classify(value), data)
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # zlib.error: corrupt deflate data
            if not source.tolerant:
                raise InputError(f"{name}: cannot read ({exc})") from None
            self._malformed("unreadable_input")
            self.warn(f"{name}: cannot read ({exc}); counted as malformed (unreadable_input), replay goes on")
        finally:
            if handle is not sys.stdin.buffer:
                handle.close()
            if source.done is not None:
                source.done()

    def run(
        self, inputs: list[str], remote: Callable[[str], Iterator[Source]] | None = None, progress: Any = None
    ) -> Summary:
        """Replay ``inputs`` in the order given; ``remote`` expands an ``s3://`` URL into its objects;
        ``progress`` (a :class:`detector.progress.Progress`) counts the local inputs done."""
        if self.jobs >= 3:
            import multiprocessing  # here, not at start-up: only a sharded replay needs it

            if "fork" in multiprocessing.get_all_start_methods():
                self._shards = _Shards(self.engine, self.state.config, self.jobs - 1)
                self._apply = self._route
        try:
            for source in iter_sources(inputs, remote):
                self.summary.inputs += 1
                self._feed_source(source)
                if progress is not None and source.local:
                    progress.objects_done += 1
                    progress.bytes_done += source.size or 0
            if self._shards is not None:
                self._merge(self._shards.finish())
        finally:
            if self._shards is not None:
                self._shards.close()
                self._shards = None
                self._apply = self.engine.apply
        self.summary.instance_records = self.engine.counters.instance_records
        self.summary.findings = len(self.final)
        return self.summary

    def _merge(self, results: list[tuple[list[list[Any]], dict[str, int], dict[str, int], int]]) -> None:
        """The appliers' results as one replay's: finding groups in the order the one-process replay
        keeps them (by the stream position of the record that opened each, then its place among that
        record's changes), malformed reasons and the engine's counters summed."""
        opened: list[list[Any]] = []
        counters = self.engine.counters
        for groups, malformed, origin, issuance_records in results:
            opened.extend(groups)
            for reason, count in malformed.items():
                self.summary.malformed += count
                self.summary.malformed_reasons[reason] = self.summary.malformed_reasons.get(reason, 0) + count
            for kind, count in origin.items():
                counters.origin[kind] = counters.origin.get(kind, 0) + count  # type: ignore[index,union-attr]
            counters.issuance_records += issuance_records
        opened.sort(key=lambda entry: (entry[0], entry[1]))
        for _, _, group in opened:
            self.final[group.id] = group

    def findings(self, finding_format: str = "guardduty") -> list[dict[str, Any]]:
        """The final state of every finding group: GuardDuty-shaped, or (``ocsf``) an OCSF 1.3 Detection
        Finding, activity Create (a replay writes each group once: its first and only publication)."""
        return list(self.iter_findings(finding_format))

    def iter_findings(self, finding_format: str = "guardduty") -> Iterator[dict[str, Any]]:
        """:meth:`findings`, rendered one at a time (a replay with many groups — SPEC §13's IMDSv1 findings
        are one per session — never holds every rendered finding at once)."""
        if finding_format == "ocsf":
            from .core.ocsf import to_ocsf

            return (to_ocsf(render(group), new=True) for group in self.final.values())
        return (render(group) for group in self.final.values())


def write_findings(findings: Iterable[dict[str, Any]], out: IO[bytes]) -> None:
    for finding in findings:
        out.write(orjson.dumps(finding) + b"\n")
