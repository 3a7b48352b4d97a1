"""``detector ip-ranges update``: refresh a local copy of AWS's ``ip-ranges.json``.

The document is downloaded, validated like the packaged snapshot (:func:`detector.ipranges.validate`),
compared with the file it would replace, and only then written: to a temporary file in the output's
directory, fsynced, and moved over the output with ``os.replace``, so a reader (``--ip-ranges``) sees the
old document or the new one, never a torn write. Any failure leaves the existing file untouched.

A download whose ``syncToken`` or ``createDate`` is older than the existing file's is refused unless
``force`` is set (a stale mirror or cache must not roll the ranges back silently).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .ipranges import OFFICIAL_URL, IpRangesError, load, validate

DEFAULT_OUTPUT = "aws-ip-ranges.json.gz"
DEFAULT_TIMEOUT = 60.0
MAX_BYTES = 64 * 1024 * 1024  # the real document is a few MB; anything far larger is not it

__all__ = ["DEFAULT_OUTPUT", "DEFAULT_TIMEOUT", "OFFICIAL_URL", "fetch", "update", "write_atomically"]


async def fetch(url: str, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """GET ``url`` and return the body (decompressed if it is gzip data); IpRangesError on any failure."""
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    chunks: list[bytes] = []
    size = 0
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout, trust_env=True) as session,
            session.get(url) as response,
        ):
            status, reason = response.status, response.reason or ""
            if status == 200:
                async for chunk in response.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > MAX_BYTES:
                        break
                    chunks.append(chunk)
    except asyncio.TimeoutError:
        raise IpRangesError(f"{url}: no complete answer within {timeout:g} s") from None
    except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a URL aiohttp cannot use
        raise IpRangesError(f"{url}: download failed ({exc.__class__.__name__}: {exc})") from None
    if status != 200:
        raise IpRangesError(f"{url}: HTTP {status} {reason}".rstrip())
    if size > MAX_BYTES:
        raise IpRangesError(f"{url}: larger than {MAX_BYTES} bytes; refusing")
    body = b"".join(chunks)
    if body[:2] == b"\x1f\x8b":  # a mirror serving the .gz itself (no Content-Encoding)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, MAX_BYTES + 1)
        except zlib.error as exc:
            raise IpRangesError(f"{url}: corrupt gzip data ({exc})") from None
        if len(body) > MAX_BYTES:
            raise IpRangesError(f"{url}: larger than {MAX_BYTES} bytes uncompressed; refusing")
        if not inflater.eof:
            raise IpRangesError(f"{url}: truncated gzip data")
    return body


def _parse(raw: bytes, source: str) -> dict[str, Any]:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise IpRangesError(f"{source}: not valid JSON ({exc})") from None
    validate(document, source)
    return document


def _existing(output: Path) -> dict[str, Any] | None:
    """syncToken and createDate of the document at ``output`` (None if there is none); IpRangesError if unusable."""
    if not output.exists():
        return None
    try:
        return load(output)[1]
    except (IpRangesError, EOFError, zlib.error) as exc:  # load() lets a truncated or corrupt gzip through
        raise IpRangesError(f"existing file is not a usable ip-ranges document: {exc}; use --force to replace it") from None


def write_atomically(output: Path, data: bytes) -> None:
    """Replace ``output`` with ``data`` atomically (temp file in the same directory, fsync, os.replace)."""
    directory = output.parent
    try:
        mode = output.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, output)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not every platform lets a directory be opened
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _older(new: dict[str, Any], old: dict[str, Any]) -> str | None:
    if int(new["syncToken"]) < int(old["syncToken"]):
        return f"syncToken {new['syncToken']} is older than the existing {old['syncToken']}"
    if new["createDate"] < old["createDate"]:  # YYYY-MM-DD-hh-mm-ss sorts as text
        return f"createDate {new['createDate']} is older than the existing {old['createDate']}"
    return None


async def update(
    url: str = OFFICIAL_URL,
    output: str | os.PathLike[str] = DEFAULT_OUTPUT,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Download, validate and atomically write ``url`` to ``output`` (gzipped if it ends in ``.gz``).

    Returns a summary (url, output, syncToken, createDate, ipv4/ipv6 prefix counts, previous syncToken).
    Raises IpRangesError, with nothing written, on a download, JSON or validation failure, or when the
    download is older than the existing output (unless ``force``).
    """
    out = Path(output)
    if out.is_dir():
        raise IpRangesError(f"{out}: is a directory; give a file name")
    if not out.parent.is_dir():
        raise IpRangesError(f"{out}: directory {out.parent} does not exist")
    raw = await fetch(url, timeout)
    document = _parse(raw, url)
    try:
        previous = _existing(out)
    except IpRangesError:
        if not force:
            raise
        previous = None
    if previous is not None and not force:
        reason = _older(document, previous)
        if reason is not None:
            raise IpRangesError(f"{url}: {reason} ({out}); use --force to write it anyway")
    data = gzip.compress(raw, mtime=0) if out.name.lower().endswith(".gz") else raw
    try:
        write_atomically(out, data)
    except OSError as exc:
        raise IpRangesError(f"{out}: cannot write ({exc.strerror or exc})") from None
    return {
        "url": url,
        "output": str(out),
        "syncToken": document["syncToken"],
        "createDate": document["createDate"],
        "ipv4_prefixes": len(document["prefixes"]),
        "ipv6_prefixes": len(document["ipv6_prefixes"]),
        "previous_syncToken": None if previous is None else previous["syncToken"],
    }
