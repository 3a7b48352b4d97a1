"""``detector ingest --workers N``: the CPU-bound half of ingest (S3 reads, splitting, producing) in N
processes, so one pod uses as many cores as it has.

The main process keeps everything about SQS (receiving, visibility, deletion, ``concurrency``), the HTTP
endpoints and the metrics. Each message it receives goes to the worker with the fewest messages in hand;
the worker runs a :class:`~.process.Processor` (its own S3 client and Kafka producer) and answers with
the result and what it counted. The main process deletes the message only on a ``done`` answer, as
without workers.

Main and worker talk over a private socket pair: frames of a 4-byte big-endian length and a msgpack map.
The first frame, main to worker, is the settings (secrets included, so never on a command line or in the
environment). Then main sends ``{"id", "body", "queue", "message_id"}`` and the worker answers
``{"id", "kind": "read"}`` once every record of the message is produced, then ``{"id", "kind": "done",
"result", "tally"}`` or ``{"id", "kind": "failed", "reason", "message", "tally"}``. Unprompted, a worker
sends ``{"kind": "ready"}`` (connected), ``{"kind": "broker_error"}`` (a failed connection attempt) or
``{"kind": "startup_error", "message"}``.

A worker ignores SIGINT and SIGTERM: the main process decides when work ends, by closing the socket (after
its grace period); the worker then abandons what it still has (those messages stay in the queue), stops
its producer and exits. It exits the same way if the main process dies. A worker that dies fails the
messages it had (reason ``worker_lost``: they come back after their visibility timeout) and is started
again.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import msgspec
import structlog
from aiobotocore.session import get_session
from pydantic import SecretBytes, SecretStr

from ..service.logging import log_stream
from .metrics import WORKER_LOST
from .process import MessageFailed, Processor, StartupError, Tally, aws_client_config
from .settings import IngestSettings

log = structlog.get_logger("detector.ingest")

_LENGTH = struct.Struct(">I")
_RESTART_DELAY = 1.0  # seconds before a dead worker is started again (doubling, capped by retry_max_seconds)


def _plain(value: Any) -> Any:
    if isinstance(value, (SecretStr, SecretBytes)):
        return value.get_secret_value()
    return str(value)  # Path


class _Channel:
    """Frames over a stream: ``send`` queues one (no await: frames are small), ``receive`` reads one (None
    at the end of the stream)."""

    _encoder = msgspec.msgpack.Encoder(enc_hook=_plain)
    _decoder = msgspec.msgpack.Decoder(dict[str, Any])

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, frame: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return
        data = self._encoder.encode(frame)
        self.writer.write(_LENGTH.pack(len(data)) + data)

    async def receive(self) -> dict[str, Any] | None:
        try:
            head = await self.reader.readexactly(_LENGTH.size)
            return self._decoder.decode(await self.reader.readexactly(_LENGTH.unpack(head)[0]))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------------------------------
# the main process's side
# --------------------------------------------------------------------------------------------------


def _log_fd() -> int | None:
    """The file descriptor the main process logs to, for the worker's standard output (where it logs):
    `detector respond` logs to standard error, the benchmark too. None (inherit) when it has none."""
    try:
        return log_stream().fileno()
    except (AttributeError, OSError, ValueError):  # io.StringIO and the like
        return None


class _Call:
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.read: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[dict[str, Any]] = loop.create_future()


class _Worker:
    """One worker process and the messages it has in hand."""

    def __init__(self, number: int, pool: WorkerPool) -> None:
        self.number = number
        self.pool = pool
        self.process: asyncio.subprocess.Process | None = None
        self.channel: _Channel | None = None
        self.calls: dict[int, _Call] = {}
        self.handled = 0  # messages given to it
        self.ready = False
        self.startup_error: str | None = None
        self.listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        mine, theirs = socket.socketpair()
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "detector.ingest.workers", str(theirs.fileno()), str(self.number),
                stdin=asyncio.subprocess.DEVNULL, stdout=_log_fd(), pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        self.channel = _Channel(*await asyncio.open_connection(sock=mine))
        self.channel.send(self.pool.settings.model_dump())
        self.listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        assert self.channel is not None and self.process is not None
        while (frame := await self.channel.receive()) is not None:
            kind = frame.get("kind")
            if kind == "ready":
                self.ready = True
                self.pool.changed()
            elif kind == "broker_error":
                self.pool.on_broker_error()
            elif kind == "startup_error":
                self.startup_error = str(frame.get("message"))
                self.pool.changed()
            else:
                call = self.calls.get(frame.get("id", -1))
                if call is None:
                    continue
                if kind == "read" and not call.read.done():
                    call.read.set_result(None)
                elif kind in ("done", "failed", "error") and not call.done.done():
                    call.done.set_result(frame)
        self.ready = False
        code = await self.process.wait()
        lost = MessageFailed(WORKER_LOST, f"ingest worker {self.number} exited (status {code}) with the message in hand")
        for call in self.calls.values():
            if not call.done.done():
                call.done.set_exception(lost)
        self.pool.exited(self, code)

    async def process_message(self, number: int, text: str, tally: Tally, read: Callable[[], Awaitable[None]], context: dict[str, Any]) -> str:
        assert self.channel is not None
        call = self.calls[number] = _Call()
        self.handled += 1
        try:
            self.channel.send({"id": number, "body": text, **context})
            await asyncio.wait([call.read, call.done], return_when=asyncio.FIRST_COMPLETED)
            if call.read.done():
                await read()
            answer = await call.done
        finally:
            del self.calls[number]
        tally.add(Tally(**answer.get("tally", {})))
        if answer["kind"] == "failed":
            raise MessageFailed(answer["reason"], answer["message"])
        if answer["kind"] == "error":  # raised as it would be without workers: the message is not deleted
            raise RuntimeError(f"ingest worker {self.number}: {answer['message']}")
        return str(answer["result"])

    async def stop(self, timeout: float) -> None:
        """Close the socket (the worker abandons its work and exits); kill it after ``timeout``."""
        if self.channel is not None:
            self.channel.close()
        if self.process is None or self.process.returncode is not None:
            return
        try:
            await asyncio.wait_for(self.process.wait(), timeout=timeout)
        except asyncio.TimeoutError:
            log.warning("worker_killed", worker=self.number, detail=f"still running {timeout:.0f} s after it was told to stop")
            self.process.kill()
            await self.process.wait()


class WorkerPool:
    """N worker processes behind the interface of one :class:`~.process.Processor` (``connect``,
    ``process``, ``close``, ``connected``)."""

    def __init__(self, settings: IngestSettings, stopping: asyncio.Event, on_broker_error: Callable[[], None], on_restart: Callable[[], None]) -> None:
        self.settings = settings
        self.stopping = stopping
        self.on_broker_error = on_broker_error
        self.on_restart = on_restart
        self.workers: list[_Worker] = []
        self._changed = asyncio.Condition()
        self._calls = 0
        self._closing = False
        self._connected_once = False
        self._restarts: set[asyncio.Task[None]] = set()  # restarts and notifications under way

    @property
    def connected(self) -> bool:
        return bool(self.workers) and all(w.ready for w in self.workers)

    def changed(self) -> None:
        task = asyncio.get_running_loop().create_task(self._notify())
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def connect(self) -> bool:
        """Start every worker and wait until each is connected; False when stopped first. Raises
        :class:`StartupError` with the first worker's reason when one cannot start."""
        for number in range(self.settings.workers):
            worker = _Worker(number, self)
            self.workers.append(worker)
            await worker.start()
        stopped = asyncio.create_task(self.stopping.wait())
        try:
            async with self._changed:
                while not self.connected and not self.stopping.is_set():
                    failed = next((w.startup_error for w in self.workers if w.startup_error), None)
                    if failed is not None:
                        raise StartupError(failed)
                    waiting = asyncio.create_task(self._changed.wait())
                    await asyncio.wait([waiting, stopped], return_when=asyncio.FIRST_COMPLETED)
                    if not waiting.done():
                        waiting.cancel()
                        await asyncio.gather(waiting, return_exceptions=True)
        finally:
            stopped.cancel()
        if self.connected:
            self._connected_once = True
            log.info("workers_ready", workers=len(self.workers))
        return self.connected

    async def process(self, text: str, tally: Tally, read: Callable[[], Awaitable[None]]) -> str:
        """Hand the message to the ready worker with the fewest in hand (waiting for one if none is)."""
        async with self._changed:
            await self._changed.wait_for(lambda: any(w.ready for w in self.workers))
        worker = min((w for w in self.workers if w.ready), key=lambda w: len(w.calls))
        self._calls += 1
        context = {k: v for k, v in structlog.contextvars.get_contextvars().items() if k in ("queue", "message_id")}
        return await worker.process_message(self._calls, text, tally, read, context)

    def exited(self, worker: _Worker, code: int) -> None:
        if self._closing:
            return
        if not self._connected_once:  # start-up: a worker that cannot even connect fails the start
            if worker.startup_error is None:
                worker.startup_error = f"ingest worker {worker.number} exited (status {code}) before it connected; its output says why"
            self.changed()
            return
        log.error("worker_exited", worker=worker.number, status=code, detail="its messages come back after their visibility timeout; starting it again")
        task = asyncio.get_running_loop().create_task(self._restart(worker))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, dead: _Worker) -> None:
        delay = _RESTART_DELAY
        while not self._closing:
            await asyncio.sleep(delay)
            if self._closing:
                return
            worker = _Worker(dead.number, self)
            self.workers[self.workers.index(dead)] = worker
            self.on_restart()
            try:
                await worker.start()
                return
            except OSError as exc:
                log.error("worker_start_failed", worker=dead.number, error=f"{type(exc).__name__}: {exc}")
                dead = worker
                delay = min(delay * 2, self.settings.retry_max_seconds)

    async def close(self) -> None:
        self._closing = True
        for task in self._restarts:
            task.cancel()
        await asyncio.gather(*self._restarts, return_exceptions=True)
        # a worker flushes its producer within the grace period after it is told to stop
        await asyncio.gather(*(w.stop(self.settings.grace_seconds + 10) for w in self.workers))
        await asyncio.gather(*(w.listener for w in self.workers if w.listener is not None), return_exceptions=True)


# --------------------------------------------------------------------------------------------------
# the worker process
# --------------------------------------------------------------------------------------------------


async def _serve(sock: socket.socket, settings: IngestSettings) -> int:
    channel = _Channel(*await asyncio.open_connection(sock=sock))
    stopping = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    async with get_session().create_client("s3", config=aws_client_config(settings)) as s3:
        processor = Processor(settings, s3, stopping, lambda: channel.send({"kind": "broker_error"}))

        async def requests() -> None:
            while (frame := await channel.receive()) is not None:
                task = asyncio.create_task(_one(channel, processor, frame))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            stopping.set()

        reading = asyncio.create_task(requests())
        try:
            try:
                if await processor.connect():
                    channel.send({"kind": "ready"})
            except StartupError as exc:
                channel.send({"kind": "startup_error", "message": str(exc)})
                await channel.writer.drain()
                return 2
            await reading
        finally:
            reading.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(reading, *tasks, return_exceptions=True)
            await processor.close()
            channel.close()
    return 0


async def _one(channel: _Channel, processor: Processor, frame: dict[str, Any]) -> None:
    number, tally = frame["id"], Tally()

    async def read() -> None:
        channel.send({"id": number, "kind": "read"})

    context = {k: frame[k] for k in ("queue", "message_id") if k in frame}
    with structlog.contextvars.bound_contextvars(**context):
        try:
            result = await processor.process(frame["body"], tally, read)
        except MessageFailed as exc:
            channel.send({"id": number, "kind": "failed", "reason": exc.reason, "message": str(exc), "tally": asdict(tally)})
        except Exception as exc:  # a bug: answered, so the main process does not wait for ever
            log.exception("message_error")
            channel.send({"id": number, "kind": "error", "message": f"{type(exc).__name__}: {exc}", "tally": asdict(tally)})
        else:
            channel.send({"id": number, "kind": "done", "result": result, "tally": asdict(tally)})


def _read_settings(sock: socket.socket) -> IngestSettings:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise SystemExit("detector ingest worker: the main process went away before sending the settings")
            data += chunk
        return data

    frame = _Channel._decoder.decode(exactly(_LENGTH.unpack(exactly(_LENGTH.size))[0]))
    return IngestSettings.model_validate(frame)


def main(argv: list[str]) -> int:
    """``python -m detector.ingest.workers FD NUMBER``, started by :class:`WorkerPool` only."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when work ends
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..service.logging import configure_logging

    sock = socket.socket(fileno=int(argv[1]))
    settings = _read_settings(sock)
    configure_logging(settings.log_level, settings.log_format)
    structlog.contextvars.bind_contextvars(worker=int(argv[2]))
    if settings.use_uvloop:
        import uvloop

        uvloop.install()
    return asyncio.run(_serve(sock, settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
