"""``s3://bucket/prefix`` inputs of ``detector replay`` (SPEC §14): objects listed and streamed by aiobotocore.

An event loop in a background thread lists every S3 input (in the order given) and streams its objects,
in key order, into a bounded queue of chunks; the replay thread reads each object through a file-like
reader (:class:`S3ObjectReader`), so network transfer overlaps decoding and memory stays bounded by the
queue (``QUEUE_CHUNKS`` chunks of at most ``CHUNK`` bytes), whatever the objects' sizes. gzip is
decompressed incrementally by the replay (``gzip.GzipFile`` over the reader).

Credentials, region and endpoint (``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``) come from the standard
AWS chain. Errors: a bucket that does not exist, access denied or any failure to list is a
:class:`detector.replay.InputError` (the command exits 2); an object that cannot be read (gone since it
was listed, denied, a broken transfer after ``RESUME_ATTEMPTS`` resumed ranged reads) fails only that
object: the replay counts it as malformed and goes on.

Days: with ``since``/``until``, only keys in CloudTrail's layout
(``…/CloudTrail/<region>/YYYY/MM/DD/…``) whose day is in range are read; the listing walks the key
hierarchy level by level and lists only the day prefixes in range. Keys outside the layout are then
skipped (counted in ``skipped_outside_layout``). Keys under a ``CloudTrail-Digest/`` folder (integrity
digests, not events) are never inputs.
"""

from __future__ import annotations

import asyncio
import io
import re
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import date
from typing import Any

from .progress import Progress
from .replay import INPUT_SUFFIXES, InputError, Source, _gunzip_if_gzip

CHUNK = 1 << 20  # bytes asked of the response stream at a time
QUEUE_CHUNKS = 8  # chunks read ahead at most (bounded memory)
RESUME_ATTEMPTS = 3  # ranged GETs resuming a transfer broken mid-object
DIGEST = "CloudTrail-Digest"

_DAY = re.compile(r"(?:^|/)CloudTrail/[a-z]{2}(?:-[a-z]+)+-\d+/(\d{4})/(\d{2})/(\d{2})/")
_REGION_DIR = re.compile(r"(?:^|/)CloudTrail/[a-z]{2}(?:-[a-z]+)+-\d+/(.*)$")


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix); a clear error for anything else."""
    rest = url[len("s3://") :] if url.startswith("s3://") else ""
    bucket, _, prefix = rest.partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,254}", bucket):
        raise InputError(f"{url}: not an S3 URL of the form s3://bucket[/prefix]")
    return bucket, prefix


def key_day(key: str) -> date | None:
    """The day of a key in CloudTrail's layout, else None."""
    m = _DAY.search(key)
    if m is None:
        return None
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


def is_log_key(key: str) -> bool:
    return key.lower().endswith(INPUT_SUFFIXES) and f"/{DIGEST}/" not in f"/{key}"


def prefix_in_range(prefix: str, since: date | None, until: date | None) -> bool | None:
    """For a folder (ending in ``/``) inside a ``CloudTrail/<region>/`` folder: whether days in range may
    lie under it (``YYYY/``, ``YYYY/MM/``, ``YYYY/MM/DD/``). None when the folder is not inside one."""
    m = _REGION_DIR.search(prefix)
    if m is None:
        return None
    parts = m[1].rstrip("/").split("/") if m[1] else []
    if not parts:
        return True
    if len(parts) > 3 or not all(p.isdigit() for p in parts) or [len(p) for p in parts] != [4, 2, 2][: len(parts)]:
        return False  # not the layout
    values = tuple(int(p) for p in parts)
    low = (since.year, since.month, since.day)[: len(values)] if since else None
    high = (until.year, until.month, until.day)[: len(values)] if until else None
    return (low is None or values >= low) and (high is None or values <= high)


class S3ReadError(OSError):
    """An object that could not be read (the replay counts it as malformed and goes on)."""


_END = object()


class S3ObjectReader(io.RawIOBase):
    """The bytes of one object, as the loop thread streams them (``read`` blocks for the next chunk)."""

    def __init__(self, inputs: S3Inputs, name: str) -> None:
        self._inputs = inputs
        self._name = name
        self._buffer = b""
        self._pos = 0
        self._finished = False

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while self._pos >= len(self._buffer):
            if self._finished:
                return 0
            item = self._inputs.next_item()
            if item is _END:
                self._finished = True
                return 0
            if isinstance(item, BaseException):
                self._finished = True
                raise S3ReadError(str(item))
            if isinstance(item, tuple):  # ("fatal", message): the streaming itself failed
                self._finished = True
                raise InputError(item[1])
            self._buffer, self._pos = item, 0
            self._inputs.progress.bytes_done += len(item)
        n = min(len(target), len(self._buffer) - self._pos)
        target[:n] = self._buffer[self._pos : self._pos + n]
        self._pos += n
        return n

    def drain(self) -> None:
        """Skip what the replay did not read, so the next object starts at its own first chunk."""
        while not self._finished:
            item = self._inputs.next_item()
            if isinstance(item, tuple):
                raise InputError(item[1])
            if item is _END or isinstance(item, BaseException):
                self._finished = True


class S3Inputs:
    """Lists and streams the ``s3://`` inputs of one replay, in the order given (see the module doc)."""

    def __init__(
        self,
        urls: list[str],
        since: date | None = None,
        until: date | None = None,
        progress: Progress | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.targets = [parse_url(url) for url in urls]
        self.urls = urls
        self.since, self.until = since, until
        self.progress = progress or Progress()
        self.warn = warn or (lambda message: print(f"detector replay: warning: {message}", file=sys.stderr))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="detector-s3", daemon=True)
        self._queue: asyncio.Queue[Any] | None = None
        self._ready = threading.Event()  # set once the loop thread made the queue
        self._fatal: str | None = None
        self._task: Any = None  # the concurrent future of _main
        self._main_task: asyncio.Task[None] | None = None
        self._next_url = 0

    # --- replay thread -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._main(), self._loop)

    def close(self) -> None:
        """Stop streaming (the replay is done or failed) and end the loop thread."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            task = self._main_task
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # noqa: BLE001 - cancelled, or failed: either way it is over
                    pass

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    def next_item(self) -> Any:
        """The next thing the loop thread streamed: ("object", bucket, key, size), bytes, ``_END``, an
        exception (the object failed), ("url", index) after a URL's last object, or ("fatal", message)."""
        self._ready.wait()
        assert self._queue is not None
        return asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop).result()

    def sources(self, url: str) -> Iterator[Source]:
        """The objects of ``url`` (the next S3 input, in the order given) as replay sources."""
        index = self._next_url
        self._next_url += 1
        assert self.urls[index] == url
        if self._task is None:
            self.start()
        found = 0
        while True:
            item = self.next_item()
            if isinstance(item, tuple) and item[0] == "fatal":
                raise InputError(item[1])
            if isinstance(item, tuple) and item[0] == "url":
                if not found:
                    days = " in the days selected" if self.since or self.until else ""
                    self.warn(f"{url}: no log file (.json, .jsonl, either .gz) under this prefix{days}")
                return
            found += 1
            if self._fatal is not None:
                raise InputError(self._fatal)
            _, bucket, key, size = item
            reader = S3ObjectReader(self, f"s3://{bucket}/{key}")
            progress = self.progress

            def done(reader: S3ObjectReader = reader) -> None:
                reader.drain()
                progress.objects_done += 1

            yield Source(
                f"s3://{bucket}/{key}",
                lambda reader=reader: _gunzip_if_gzip(io.BufferedReader(reader, CHUNK)),
                size,
                tolerant=True,
                local=False,
                done=done,
            )

    # --- loop thread -------------------------------------------------------------------------------

    def _client(self) -> Any:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(retries={"max_attempts": 5, "mode": "standard"}, read_timeout=120)
        return get_session().create_client("s3", config=config)

    async def _main(self) -> None:
        self._main_task = asyncio.current_task()
        self._queue = asyncio.Queue(QUEUE_CHUNKS)
        self._ready.set()
        listed: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in self.targets]
        try:
            async with self._client() as client:
                lister = asyncio.create_task(self._list_all(client, listed))
                try:
                    for index in range(len(self.targets)):
                        while True:
                            entry = await listed[index].get()
                            if entry is None:
                                break
                            if isinstance(entry, str):
                                await self._queue.put(("fatal", entry))
                                return
                            await self._stream(client, *entry)
                        await self._queue.put(("url", index))
                finally:
                    lister.cancel()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - no client (no credentials, bad configuration): fatal
            await self._queue.put(("fatal", f"S3: {_describe(exc)}"))

    async def _list_all(self, client: Any, listed: list[asyncio.Queue[Any]]) -> None:
        progress = self.progress
        for (bucket, prefix), url, out in zip(self.targets, self.urls, listed, strict=True):
            try:
                keys = self._walk(client, bucket, prefix) if self.since or self.until else self._flat(client, bucket, prefix)
                async for key, size in keys:
                    with progress.lock:
                        progress.objects_total += 1
                        progress.bytes_total += size
                    out.put_nowait((bucket, key, size))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a listing that fails is fatal for the replay
                self._fatal = f"{url}: cannot list ({_describe(exc)})"
                out.put_nowait(self._fatal)
                return
            out.put_nowait(None)
        progress.listing_done = True

    async def _flat(self, client: Any, bucket: str, prefix: str) -> Any:
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                if is_log_key(obj["Key"]):
                    yield obj["Key"], obj["Size"]

    async def _walk(self, client: Any, bucket: str, prefix: str) -> Any:
        """Keys of the days in range, in key order: one folder level at a time, descending only into
        folders that may hold such days, and listing a day's folder whole."""
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            entries = [(obj["Key"], obj["Size"]) for obj in page.get("Contents", ())]
            entries += [(p["Prefix"], None) for p in page.get("CommonPrefixes", ())]
            for key, size in sorted(entries):
                if size is not None:  # an object at this level
                    day = key_day(key)
                    if not is_log_key(key):
                        continue
                    if day is None:
                        self.progress.skipped_outside_layout += 1
                    elif (self.since is None or day >= self.since) and (self.until is None or day <= self.until):
                        yield key, size
                    continue
                if key.rstrip("/").rsplit("/", 1)[-1] == DIGEST:
                    continue
                inside = prefix_in_range(key, self.since, self.until)
                if inside is False:
                    continue
                if inside and key_day(key) is not None:  # a day in range: every object under it
                    async for found in self._flat(client, bucket, key):
                        yield found
                    continue
                async for found in self._walk(client, bucket, key):
                    yield found

    async def _stream(self, client: Any, bucket: str, key: str, size: int) -> None:
        """Put the object's chunks on the queue, resuming with a ranged GET when a transfer breaks."""
        from aiohttp import ClientError as HttpError
        from botocore.exceptions import BotoCoreError, ClientError

        queue = self._queue
        assert queue is not None
        await queue.put(("object", bucket, key, size))
        offset = 0
        etag = None
        attempts = 0
        pieces: list[bytes] = []  # what the socket gave, gathered to about CHUNK bytes per queue item
        held = 0

        async def flush() -> int:
            nonlocal held
            chunk = b"".join(pieces)
            pieces.clear()
            held = 0
            await queue.put(chunk)
            return len(chunk)

        while True:
            try:
                args: dict[str, Any] = {"Bucket": bucket, "Key": key}
                if offset:
                    args["Range"] = f"bytes={offset}-"
                    if etag:
                        args["IfMatch"] = etag  # the same object, not one written since
                response = await client.get_object(**args)
                etag = etag or response.get("ETag")
                async with response["Body"] as body:
                    while True:
                        piece = await body.read(CHUNK - held)
                        if piece:
                            pieces.append(piece)
                            held += len(piece)
                        if held and (not piece or held >= CHUNK):
                            offset += await flush()
                        if not piece:
                            break
                await queue.put(_END)
                return
            except ClientError as exc:
                await queue.put(S3ReadError(f"cannot read: {_describe(exc)}"))
                return
            except (BotoCoreError, HttpError, OSError, asyncio.TimeoutError) as exc:
                if held:  # the bytes that did arrive are good: keep them, resume after them
                    offset += await flush()
                attempts += 1
                if attempts > RESUME_ATTEMPTS:
                    await queue.put(S3ReadError(f"transfer failed at byte {offset}: {_describe(exc)}"))
                    return


def _describe(exc: BaseException) -> str:
    """A one-line reason an engineer can act on (the S3 error code when there is one)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        code = str(error.get("Code", ""))
        hints = {
            "NoSuchBucket": "no such bucket",
            "AccessDenied": "access denied; the replay needs s3:ListBucket on the bucket and s3:GetObject on its objects",
            "403": "access denied; the replay needs s3:ListBucket on the bucket and s3:GetObject on its objects",
            "NoSuchKey": "the object no longer exists",
            "404": "not found",
            "PreconditionFailed": "the object changed while it was read",
            "412": "the object changed while it was read",
        }
        if code in hints:
            return f"{code}: {hints[code]}"
        message = error.get("Message") or str(exc)
        return f"{code}: {message}" if code else message
    return f"{type(exc).__name__}: {exc}"
