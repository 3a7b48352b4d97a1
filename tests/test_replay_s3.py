"""``detector replay s3://bucket/prefix`` (SPEC §14) against a real moto S3 server: a labelled world laid out
as CloudTrail lays out its bucket (several regions and days) replays to exactly the findings of the same
files replayed locally; ``--since``/``--until`` select days; errors; bounded memory; progress on a TTY."""

from __future__ import annotations

import gzip
import json
import os
import pty
import select
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from aws_helpers import ROOT_KEYS, MotoServer, cli_env, create_user, moto  # noqa: F401 - moto: fixture
from test_replay import findings_of, summary_of
from worldgen import make_world, summarize

REPO = Path(__file__).resolve().parents[1]
ACCOUNT = "111122223333"
REGIONS = ("eu-west-1", "us-east-1", "us-west-2")  # key order
FIRST_DAY = date(2026, 11, 20)
pytestmark = pytest.mark.aws


def detector(*args: Any, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "detector", *map(str, args)],
        capture_output=True, cwd=REPO, env=env, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def trail_key(region: str, day: date, name: str) -> str:
    stamp = f"{day:%Y%m%d}T0000Z"
    return f"AWSLogs/{ACCOUNT}/CloudTrail/{region}/{day:%Y/%m/%d}/{ACCOUNT}_CloudTrail_{region}_{stamp}_{name}"


class Bucket:
    """A labelled world in one bucket: file i in region ``REGIONS[i // per_region]`` on day
    ``FIRST_DAY + i % per_region``, so key order is the world's arrival order; every other JSON Lines
    file gzipped. Local copies of the same bytes, for the local replay to compare with."""

    def __init__(self, server: MotoServer, name: str, seed: int, root: Path) -> None:
        self.name = name
        self.world = make_world(seed, n_files=9)
        self.registry = root / "registry.json"
        self.registry.write_text(json.dumps(self.world.registry))
        s3 = server.client("s3")
        s3.create_bucket(Bucket=name)
        per_region = -(-len(self.world.inputs) // len(REGIONS))
        self.files: list[tuple[str, Path, date]] = []  # key, local copy, day; in key order
        for i, (fname, data) in enumerate(self.world.inputs):
            if fname.endswith(".jsonl") and i % 2:
                fname, data = fname + ".gz", gzip.compress(data, mtime=0)
            day = FIRST_DAY + timedelta(days=i % per_region)
            key = trail_key(REGIONS[i // per_region], day, fname)
            local = root / f"{i:02d}-{fname}"
            local.write_bytes(data)
            s3.put_object(Bucket=name, Key=key, Body=data)
            self.files.append((key, local, day))
        assert [k for k, _, _ in self.files] == sorted(k for k, _, _ in self.files)
        # Not inputs: a digest, a non-log object; and a log file outside the CloudTrail layout (read only
        # when no day is selected; it holds no record, so the findings do not change).
        s3.put_object(Bucket=name, Key=f"AWSLogs/{ACCOUNT}/CloudTrail-Digest/us-east-1/2026/11/20/d.json.gz", Body=b"{}")
        s3.put_object(Bucket=name, Key=f"AWSLogs/{ACCOUNT}/CloudTrail/README.txt", Body=b"not a log")
        s3.put_object(Bucket=name, Key="AWSLogs/outside/extra.json", Body=b'{"Records": []}')

    def local(self, since: date | None = None, until: date | None = None) -> list[Path]:
        return [p for _, p, d in self.files if (since is None or d >= since) and (until is None or d <= until)]


@pytest.fixture(scope="module")
def env(moto: MotoServer) -> dict[str, str]:
    return {**cli_env(ROOT_KEYS), "AWS_ENDPOINT_URL": moto.url}


@pytest.fixture(scope="module")
def bucket(moto: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Bucket:
    return Bucket(moto, "org-trail", 7, tmp_path_factory.mktemp("world"))


def same_run(remote: subprocess.CompletedProcess[bytes], local: subprocess.CompletedProcess[bytes]) -> None:
    """The same findings (the same bytes, in the same order) and the same counts."""
    assert findings_of(remote) and remote.stdout == local.stdout
    a, b = summary_of(remote), summary_of(local)
    for key in ("records", "instance_records", "malformed", "skipped", "findings", "malformed_reasons"):
        assert a[key] == b[key], key


def test_replay_from_s3_equals_the_local_replay(bucket: Bucket, env: dict[str, str]) -> None:
    remote = detector("replay", "--registry", bucket.registry, f"s3://{bucket.name}/AWSLogs/", env=env)
    local = detector("replay", "--registry", bucket.registry, *bucket.local(), env=env)
    same_run(remote, local)
    assert summarize(findings_of(remote)) == bucket.world.expected
    summary = summary_of(remote)
    assert summary["inputs"] == len(bucket.files) + 1  # + the empty log file outside the layout
    assert summary["s3"] == {
        "objects": len(bucket.files) + 1,
        "bytes": sum(p.stat().st_size for p in bucket.local()) + len(b'{"Records": []}'),
        "skipped_outside_layout": 0,
    }
    assert b"\r" not in remote.stderr and b"events/s" not in remote.stderr  # no progress when piped


@pytest.mark.parametrize(("since", "until"), [(1, 1), (0, 1), (2, None), (None, 0)])
def test_since_and_until_select_days_of_the_layout(bucket: Bucket, env: dict[str, str], since: int | None, until: int | None) -> None:
    days = [None if n is None else FIRST_DAY + timedelta(days=n) for n in (since, until)]
    flags = [x for flag, day in zip(("--since", "--until"), days, strict=True) if day for x in (flag, f"{day:%Y-%m-%d}")]
    remote = detector("replay", "--registry", bucket.registry, *flags, f"s3://{bucket.name}/", env=env)
    chosen = bucket.local(*days)
    assert 0 < len(chosen) < len(bucket.files)
    local = detector("replay", "--registry", bucket.registry, *chosen, env=env)
    same_run(remote, local)
    summary = summary_of(remote)
    assert summary["inputs"] == len(chosen)
    assert summary["s3"]["skipped_outside_layout"] == 1  # AWSLogs/outside/extra.json


def test_since_and_until_within_a_deeper_prefix(bucket: Bucket, env: dict[str, str]) -> None:
    region = REGIONS[1]
    # The day of the region's largest file (a world's files may include small state-change-only parts).
    day = max((p.stat().st_size, d) for k, p, d in bucket.files if f"/{region}/" in k)[1]
    prefix = f"AWSLogs/{ACCOUNT}/CloudTrail/{region}/2026/1"
    remote = detector("replay", "--registry", bucket.registry, "--since", f"{day:%Y-%m-%d}", "--until", f"{day:%Y-%m-%d}", f"s3://{bucket.name}/{prefix}", env=env)
    chosen = [p for k, p, d in bucket.files if d == day and f"/{region}/" in k]
    assert len(chosen) == 1
    same_run(remote, detector("replay", "--registry", bucket.registry, *chosen, env=env))


def test_mixed_local_and_s3_inputs_keep_the_order_given(bucket: Bucket, env: dict[str, str]) -> None:
    files = bucket.local()
    first_key = bucket.files[3][0].rsplit("/", 1)[0] + "/"  # the day folder of file 3: that file only
    remote = detector("replay", "--registry", bucket.registry, *files[:3], f"s3://{bucket.name}/{first_key}", *files[4:], env=env)
    local = detector("replay", "--registry", bucket.registry, *files, env=env)
    same_run(remote, local)
    assert summary_of(remote)["inputs"] == len(files)


def test_missing_bucket_and_bad_url_are_clear_errors(env: dict[str, str]) -> None:
    proc = detector("replay", "s3://no-such-bucket-here/AWSLogs/", env=env)
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert b"s3://no-such-bucket-here/AWSLogs/: cannot list (NoSuchBucket: no such bucket)" in proc.stderr
    proc = detector("replay", "s3://Not_A_Bucket!/x", env=env)
    assert proc.returncode == 2 and b"not an S3 URL of the form s3://bucket[/prefix]" in proc.stderr
    proc = detector("replay", "--since", "2026-11-05", "--until", "2026-11-01", "s3://b/", env=env)
    assert proc.returncode == 2 and b"--since 2026-11-05 is after --until 2026-11-01" in proc.stderr


def test_no_credentials_is_a_clear_error(moto: MotoServer) -> None:
    env = {k: v for k, v in cli_env(ROOT_KEYS).items() if not k.startswith("AWS_ACCESS_KEY_ID") and k != "AWS_SECRET_ACCESS_KEY"}
    proc = detector("replay", "s3://org-trail/", env={**env, "AWS_ENDPOINT_URL": moto.url})
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert b"cannot list (NoCredentialsError: Unable to locate credentials)" in proc.stderr


def test_corrupt_objects_are_malformed_and_the_replay_goes_on(moto: MotoServer, env: dict[str, str], bucket: Bucket) -> None:
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="broken-trail")
    good = bucket.local()
    keys = [trail_key("us-east-1", FIRST_DAY, f"{i:02d}-{p.name}") for i, p in enumerate(good[:4])]
    for key, path in zip(keys, good, strict=False):
        s3.put_object(Bucket="broken-trail", Key=key, Body=path.read_bytes())
    corrupt = gzip.compress(b'{"Records": []}' * 1000)
    s3.put_object(Bucket="broken-trail", Key=trail_key("us-east-1", FIRST_DAY, "01a-corrupt.json.gz"), Body=corrupt[:40] + b"\0" * 64 + corrupt[104:])
    s3.put_object(Bucket="broken-trail", Key=trail_key("us-east-1", FIRST_DAY, "01b-notgzip.jsonl.gz"), Body=b"\x1f\x8bnot gzip at all")
    remote = detector("replay", "--registry", bucket.registry, "s3://broken-trail/", env=env)
    local = detector("replay", "--registry", bucket.registry, *good[:4], env=env)
    assert remote.returncode == 0 and remote.stdout == local.stdout
    summary = summary_of(remote)
    assert summary["malformed_reasons"].pop("unreadable_input") == 2
    assert summary["malformed"] - 2 == summary_of(local)["malformed"]
    assert summary["inputs"] == 6
    stderr = remote.stderr.decode()
    assert "01a-corrupt.json.gz: cannot read" in stderr and "01b-notgzip.jsonl.gz: cannot read" in stderr
    assert "counted as malformed (unreadable_input), replay goes on" in stderr


def test_access_denied_is_a_clear_error(tmp_path: Path) -> None:
    server = MotoServer()
    try:
        server.client("s3").create_bucket(Bucket="locked")
        server.client("s3").put_object(Bucket="locked", Key="a.json", Body=b'{"Records": []}')
        keys = create_user(server, "no-s3", {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "ec2:Describe*", "Resource": "*"}]})
        server.enforce_iam()
        proc = detector("replay", "s3://locked/", env={**cli_env(keys), "AWS_ENDPOINT_URL": server.url})
    finally:
        server.stop()
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert b"s3://locked/: cannot list (AccessDenied: access denied; the replay needs s3:ListBucket" in proc.stderr


def max_rss_kib(url: str, env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """Peak resident memory of ``detector replay URL`` (KiB), and its summary."""
    probe = (
        "import resource, runpy, sys\n"
        f"sys.argv = ['detector', 'replay', {url!r}]\n"
        "try:\n    runpy.run_module('detector', run_name='__main__')\n"
        "finally:\n    print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, cwd=REPO, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return int(proc.stderr.decode().rsplit("maxrss", 1)[1].split()[0]), summary_of(proc)


def test_a_large_gzipped_object_is_streamed_in_bounded_memory(moto: MotoServer, env: dict[str, str]) -> None:
    """256 MiB of JSON Lines in a 1 MiB gzip object: replayed with about the memory of a one-line object."""
    # another detail-type: skipped (state-change notifications are input since SPEC §10)
    line = json.dumps({"version": "0", "detail-type": "Scheduled Event", "detail": {"pad": "x" * 900}}).encode() + b"\n"
    repeats = (256 << 20) // len(line) // 4096
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="big-trail")
    s3.put_object(Bucket="big-trail", Key="big/a.jsonl.gz", Body=gzip.compress(line * 4096 * repeats, compresslevel=9, mtime=0))
    s3.put_object(Bucket="big-trail", Key="small/a.jsonl.gz", Body=gzip.compress(line, mtime=0))
    small, _ = max_rss_kib("s3://big-trail/small/", env)
    big, summary = max_rss_kib("s3://big-trail/big/", env)
    assert summary["skipped"] == 4096 * repeats
    assert big - small < 48 * 1024, f"{big - small} KiB more than for one line, for a 256 MiB stream"


def test_progress_is_shown_on_a_terminal(bucket: Bucket, env: dict[str, str], tmp_path: Path) -> None:
    """Standard error a pseudo-terminal (standard output a file): the progress line is drawn there."""
    master, slave = pty.openpty()
    out = (tmp_path / "findings.jsonl").open("wb")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "detector", "replay", "--registry", str(bucket.registry), *map(str, bucket.local()[:2]), f"s3://{bucket.name}/AWSLogs/{ACCOUNT}/"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=slave,
        )  # fmt: skip
        os.close(slave)
        slave = -1
        screen = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        proc.wait(timeout=30)
    finally:
        out.close()
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0
    text = screen.decode()
    total = 2 + len(bucket.files)
    assert f"objects {total}/{total}" in text, text[-500:]
    assert "events/s" in text and "\r\x1b[K" in text
    stdout = (tmp_path / "findings.jsonl").read_bytes()
    assert b"events/s" not in stdout and b"\r" not in stdout and len(stdout.splitlines()) > 0


def test_since_and_until_list_only_the_folders_of_days_in_range(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """moto's request recorder shows which prefixes the replay listed: none of a day out of range."""
    from urllib.parse import parse_qs, urlparse

    monkeypatch.setenv("MOTO_RECORDER_FILEPATH", str(tmp_path / "recording"))
    server = MotoServer()
    try:
        s3 = server.client("s3")
        s3.create_bucket(Bucket="years")
        days = [date(2025, 12, 31), date(2026, 1, 1), date(2026, 1, 15), date(2026, 2, 1)]
        for region in ("us-east-1", "us-west-2"):
            for day in days:
                s3.put_object(Bucket="years", Key=trail_key(region, day, "x.json"), Body=b'{"Records": []}')
        urllib_request("POST", f"{server.url}/moto-api/recorder/start-recording")
        proc = detector("replay", "--since", "2026-01-01", "--until", "2026-01-31", "s3://years/AWSLogs/", env={**cli_env(ROOT_KEYS), "AWS_ENDPOINT_URL": server.url})
        recording = urllib_request("GET", f"{server.url}/moto-api/recorder/download-recording")
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr.decode()
    assert summary_of(proc)["inputs"] == 4
    listed = []
    for line in recording.splitlines():
        query = parse_qs(urlparse(json.loads(line)["url"]).query)
        if "list-type" in query:
            listed.append(query.get("prefix", [""])[0])
    region_root = f"AWSLogs/{ACCOUNT}/CloudTrail/us-east-1/"
    assert region_root + "2026/01/01/" in listed and region_root + "2026/01/15/" in listed
    assert not [p for p in listed if "/2025/" in p or "/2026/02/" in p], listed
    assert len(listed) == len(set(listed)) <= 2 * 5 + 4  # per region: root, 2026/, 01/, two days; + the walk down


def urllib_request(method: str, url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, method=method, data=b"" if method == "POST" else None), timeout=10) as answer:
        return answer.read().decode()


class CuttingProxy:
    """A TCP proxy in front of moto that breaks the body of the first plain (not ranged) GET of a key
    containing ``marker``: it relays ``keep`` bytes of the response, then drops the connection."""

    def __init__(self, target_port: int, marker: bytes, keep: int) -> None:
        import asyncio
        import threading

        from detector.embedded import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.target_port, self.marker, self.keep = target_port, marker, keep
        self.cuts = 0
        self.ranged: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def serve() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            started.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(serve()), self.loop.run_forever()), daemon=True)
        self.thread.start()
        assert started.wait(10)

    async def _handle(self, reader: Any, writer: Any) -> None:
        import asyncio

        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        cut = asyncio.Event()

        async def requests() -> None:
            while data := await reader.read(65536):
                head = data.split(b"\r\n\r\n", 1)[0].lower()
                if data.startswith(b"GET ") and self.marker in data.split(b"\r\n", 1)[0]:
                    if b"\r\nrange:" in head:
                        self.ranged.append(head)
                    elif not self.cuts:
                        self.cuts += 1
                        cut.set()
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def responses() -> None:
            sent = 0
            while data := await up_reader.read(65536):
                if cut.is_set():
                    data = data[: max(0, self.keep - sent)]
                    sent += len(data)
                    writer.write(data)
                    await writer.drain()
                    if sent >= self.keep:
                        writer.transport.abort()
                        up_writer.close()
                        return
                    continue
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(requests(), responses())
        except (ConnectionError, OSError):
            pass

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_transfer_broken_mid_object_resumes_with_a_ranged_get(moto: MotoServer, env: dict[str, str], bucket: Bucket, tmp_path: Path) -> None:
    s3 = moto.client("s3")
    s3.create_bucket(Bucket="flaky-trail")
    biggest = tmp_path / "all.jsonl"  # the world's plain JSON Lines files, one after the other
    biggest.write_bytes(b"".join(p.read_bytes() for p in bucket.local() if p.name.endswith(".jsonl")))
    s3.put_object(Bucket="flaky-trail", Key="cut-me/" + biggest.name, Body=biggest.read_bytes())
    assert biggest.stat().st_size > 100_000
    proxy = CuttingProxy(moto.port, b"/cut-me/", keep=50_000)
    try:
        remote = detector("replay", "--registry", bucket.registry, "s3://flaky-trail/cut-me/", env={**env, "AWS_ENDPOINT_URL": proxy.url})
    finally:
        proxy.stop()
    local = detector("replay", "--registry", bucket.registry, biggest, env=env)
    assert proxy.cuts == 1 and len(proxy.ranged) == 1, (proxy.cuts, proxy.ranged)
    assert b"if-match:" in proxy.ranged[0]
    same_run(remote, local)
    assert "unreadable_input" not in summary_of(remote)["malformed_reasons"]


def test_an_empty_prefix_is_a_warning_and_since_without_s3_too(bucket: Bucket, env: dict[str, str]) -> None:
    proc = detector("replay", f"s3://{bucket.name}/AWSLogs/nothing-here/", env=env)
    assert proc.returncode == 0 and summary_of(proc)["inputs"] == 0
    assert f"s3://{bucket.name}/AWSLogs/nothing-here/: no log file (.json, .jsonl, either .gz) under this prefix".encode() in proc.stderr
    proc = detector("replay", "--since", "2030-01-01", f"s3://{bucket.name}/", env=env)
    assert proc.returncode == 0 and b"under this prefix in the days selected" in proc.stderr
    proc = detector("replay", "--since", "2026-11-20", bucket.local()[0], env=env)
    assert proc.returncode == 0 and b"--since/--until select days of s3:// inputs only" in proc.stderr
