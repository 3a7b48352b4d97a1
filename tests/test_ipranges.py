"""AWS ip-ranges: the packaged snapshot, ``--ip-ranges`` files, validation, and ``detector ip-ranges update``.

The update command is exercised end to end against a real HTTP server on 127.0.0.1 (no mocked client).
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from detector.cli import cli
from detector.ipranges import IpRangesError, load, snapshot_path, validate
from detector.ipranges_update import write_atomically

# --------------------------------------------------------------------------------------------------
# helpers


def make_doc(
    token: str = "1700000000",
    created: str = "2023-11-14-22-13-20",
    v4: tuple[str, ...] = ("198.51.100.0/24", "8.8.8.0/24"),
    v6: tuple[str, ...] = ("2001:db8:1::/48",),
) -> dict[str, Any]:
    return {
        "syncToken": token,
        "createDate": created,
        "prefixes": [
            {"ip_prefix": p, "region": "us-east-1", "service": "AMAZON", "network_border_group": "us-east-1"} for p in v4
        ],
        "ipv6_prefixes": [
            {"ipv6_prefix": p, "region": "us-east-1", "service": "AMAZON", "network_border_group": "us-east-1"} for p in v6
        ],
    }


def dump(document: Any) -> bytes:
    return json.dumps(document, indent=2).encode()


def snapshot_document() -> dict[str, Any]:
    return orjson.loads(gzip.decompress(snapshot_path().read_bytes()))


# --------------------------------------------------------------------------------------------------
# the packaged snapshot


def test_packaged_snapshot_is_gzipped_and_loads() -> None:
    assert snapshot_path().read_bytes()[:2] == b"\x1f\x8b"
    document = snapshot_document()
    v4, v6 = document["prefixes"], document["ipv6_prefixes"]
    assert len(v4) > 10000
    assert len(v6) > 6000
    index, info = load()
    assert info["syncToken"] == document["syncToken"]
    assert info["createDate"] == document["createDate"]
    assert info["prefixes"] == len(v4) + len(v6) == len(index)


def test_packaged_snapshot_contains_its_prefixes_and_not_others() -> None:
    document = snapshot_document()
    index, _ = load()
    v4 = [e["ip_prefix"] for e in document["prefixes"]]
    v6 = [e["ipv6_prefix"] for e in document["ipv6_prefixes"]]
    for cidr in v4[:: len(v4) // 25] + v6[:: len(v6) // 25] + [v4[-1], v6[-1]]:
        net = ipaddress.ip_network(cidr)
        for addr in (net.network_address, net.broadcast_address, net.network_address + net.num_addresses // 2):
            assert index.lookup_text(str(addr)) is True, (cidr, str(addr))
    first_v4 = ipaddress.ip_network(v4[0]).network_address
    assert index.lookup_text(f"::ffff:{first_v4}") is True  # IPv4-mapped form of an AWS address
    for outside in ("8.8.8.8", "1.1.1.1", "10.0.0.1", "127.0.0.1", "2001:4860:4860::8888", "2606:4700:4700::1111", "::1"):
        assert index.lookup_text(outside) is None, outside


def test_packaged_snapshot_known_aws_addresses() -> None:
    index, _ = load()
    # 3.4.12.4/32 and 2406:daba:f000::/40 are listed in the packaged 2026-08-22 snapshot.
    assert index.lookup_text("3.4.12.4") is True
    assert index.lookup_text("2406:daba:f000::1") is True
    assert index.lookup_text("2406:daba:f0ff:ffff:ffff:ffff:ffff:ffff") is True


# --------------------------------------------------------------------------------------------------
# --ip-ranges files


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_load_file(tmp_path: Path, gzipped: bool) -> None:
    raw = dump(make_doc())
    path = tmp_path / ("ranges.json.gz" if gzipped else "ranges.json")
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    index, info = load(path)
    assert info == {"source": str(path), "syncToken": "1700000000", "createDate": "2023-11-14-22-13-20", "prefixes": 3}
    assert index.lookup_text("198.51.100.255") is True
    assert index.lookup_text("8.8.8.8") is True
    assert index.lookup_text("2001:db8:1:ffff::1") is True
    assert index.lookup_text("198.51.101.0") is None
    assert index.lookup_text("2001:db8:2::1") is None
    assert index.lookup_text("3.4.12.4") is None  # the packaged snapshot is not consulted


def test_load_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    path = tmp_path / "ranges.json"
    path.write_bytes(gzip.compress(dump(make_doc())))
    assert load(path)[1]["prefixes"] == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        (b"{not json", "not valid JSON"),
        (b"\x1f\x8bXXXXXXXXXXXXXXXX", "Unknown compression method"),
        (gzip.compress(dump(make_doc()))[:40], "corrupt gzip"),
        (gzip.compress(dump(make_doc()))[:10] + b"\xff" * 30, "corrupt gzip"),
        (b'{"syncToken": "1"}', "createDate"),
    ],
    ids=["missing", "not-json", "bad-gzip-header", "truncated-gzip", "corrupt-deflate", "invalid"],
)
def test_load_bad_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "ranges.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(IpRangesError, match=message) as excinfo:
        load(path)
    assert str(path) in str(excinfo.value)


INSTANCE_RECORD = {
    "eventVersion": "1.10",
    "userIdentity": {
        "type": "AssumedRole",
        "principalId": "AROA801BEF750110C5751:i-0123456789abcdef0",
        "arn": "arn:aws:sts::258931371865:assumed-role/web-node-role/i-0123456789abcdef0",
        "accountId": "258931371865",
        "accessKeyId": "ASIA962058765A6CA7CF",
        "sessionContext": {
            "sessionIssuer": {
                "type": "Role",
                "principalId": "AROA801BEF750110C5751",
                "arn": "arn:aws:iam::258931371865:role/web-node-role",
                "accountId": "258931371865",
                "userName": "web-node-role",
            },
            "attributes": {"creationDate": "2026-11-09T08:00:00Z", "mfaAuthenticated": "false"},
            "ec2RoleDelivery": "2.0",
        },
    },
    "eventTime": "2026-11-09T10:29:14Z",
    "eventSource": "s3.amazonaws.com",
    "eventName": "ListBuckets",
    "awsRegion": "us-east-1",
    "sourceIPAddress": "8.8.8.8",
    "userAgent": "aws-cli/2.15.0",
    "requestID": "cce1c12a-2a2b-4901-a5ef-5e97e90d5de2",
    "eventID": "6197771a-bb95-7dd9-3cf3-82e44334f80f",
    "eventType": "AwsApiCall",
    "recipientAccountId": "258931371865",
}


def test_replay_ip_ranges_option(tmp_path: Path) -> None:
    """8.8.8.8 is outside AWS per the snapshot; with a --ip-ranges file listing 8.8.8.0/24 it is AWS
    (owner unknown, first address of the session: trust on first use), so no finding."""
    records = tmp_path / "records.jsonl"
    records.write_bytes(orjson.dumps(INSTANCE_RECORD) + b"\n")
    plain = tmp_path / "ranges.json"
    plain.write_bytes(dump(make_doc()))
    gz = tmp_path / "ranges.json.gz"
    gz.write_bytes(gzip.compress(dump(make_doc())))
    runner = CliRunner()

    default = runner.invoke(cli, ["replay", str(records)])
    assert default.exit_code == 0, default.stderr
    findings = [json.loads(line) for line in default.stdout.splitlines()]
    assert [f["type"] for f in findings] == ["UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OutsideAWS"]

    for path in (plain, gz):
        result = runner.invoke(cli, ["replay", "--ip-ranges", str(path), str(records)])
        assert result.exit_code == 0, result.stderr
        assert result.stdout == "", path

    bad = tmp_path / "bad.json"
    bad.write_bytes(dump({**make_doc(), "prefixes": [{"ip_prefix": "8.8.8.8/24"}]}))
    result = runner.invoke(cli, ["replay", "--ip-ranges", str(bad), str(records)])
    assert result.exit_code == 2
    assert "prefixes[0].ip_prefix" in result.stderr
    assert result.stdout == ""


# --------------------------------------------------------------------------------------------------
# validation


def _without(key: str) -> dict[str, Any]:
    document = make_doc()
    del document[key]
    return document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (_without("syncToken"), "syncToken"),
        ({**make_doc(), "syncToken": 1700000000}, "syncToken"),
        ({**make_doc(), "syncToken": "17x"}, "syncToken"),
        (_without("createDate"), "createDate"),
        ({**make_doc(), "createDate": "2023-11-14"}, "createDate"),
        (_without("prefixes"), "prefixes missing"),
        (_without("ipv6_prefixes"), "ipv6_prefixes missing"),
        ({**make_doc(), "prefixes": {"ip_prefix": "1.2.3.0/24"}}, "prefixes missing or not a list"),
        (make_doc(v4=("198.51.100.0/24", "10.0.0.1/8")), r"prefixes\[1\]\.ip_prefix"),
        (make_doc(v4=("198.51.100.0/33",)), r"prefixes\[0\]\.ip_prefix"),
        (make_doc(v4=("not-a-prefix",)), r"prefixes\[0\]\.ip_prefix"),
        (make_doc(v6=("2001:db8::1/32",)), r"ipv6_prefixes\[0\]\.ipv6_prefix"),
        ({**make_doc(), "prefixes": [{"ipv6_prefix": "2001:db8::/32"}]}, r"prefixes\[0\] has no ip_prefix"),
        ({**make_doc(), "prefixes": [{"ip_prefix": 12}]}, r"prefixes\[0\]\.ip_prefix"),
        (make_doc(v4=(), v6=()), "no prefixes"),
        ([make_doc()], "not a JSON object"),
    ],
)
def test_validate_errors(document: Any, message: str) -> None:
    with pytest.raises(IpRangesError, match=message) as excinfo:
        validate(document, "src.json")
    assert str(excinfo.value).startswith("src.json: ")


def test_validate_returns_networks() -> None:
    networks = validate(make_doc(v4=("10.0.0.0/8",), v6=("2001:db8::/32",)))
    assert networks == [(4, 0x0A000000, 0x0AFFFFFF), (6, 0x20010DB8 << 96, ((0x20010DB8 + 1) << 96) - 1)]


# --------------------------------------------------------------------------------------------------
# detector ip-ranges update, against a real local HTTP server


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes, float]] = {}

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        status, headers, body, delay = self.routes.get(self.path, (404, {}, b"not found", 0.0))
        if delay:
            time.sleep(delay)
        try:
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, dict[str, tuple[int, dict[str, str], bytes, float]]]]:
    routes: dict[str, tuple[int, dict[str, str], bytes, float]] = {}
    handler = type("Handler", (_Handler,), {"routes": routes})
    httpd = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


VALID = dump(make_doc())
NEWER = dump(make_doc(token="1700000100", created="2023-11-14-22-15-00", v4=("192.0.2.0/24",), v6=()))
OLDER_TOKEN = dump(make_doc(token="1699999999"))
OLDER_DATE = dump(make_doc(token="1700000100", created="2023-11-14-22-13-19"))


@pytest.fixture
def url(server: tuple[str, dict[str, tuple[int, dict[str, str], bytes, float]]]) -> str:
    base, routes = server
    routes.clear()
    routes.update(
        {
            "/valid.json": (200, {}, VALID, 0.0),
            "/newer.json": (200, {}, NEWER, 0.0),
            "/older-token.json": (200, {}, OLDER_TOKEN, 0.0),
            "/older-date.json": (200, {}, OLDER_DATE, 0.0),
            "/invalid-json": (200, {}, b'{"syncToken": "1700000000", "createDate": ', 0.0),
            "/html": (200, {"Content-Type": "text/html"}, b"<html>maintenance</html>", 0.0),
            "/bad-prefix.json": (200, {}, dump(make_doc(v4=("198.51.100.0/24", "300.1.2.0/24"))), 0.0),
            "/no-token.json": (200, {}, dump(_without("syncToken")), 0.0),
            "/500": (500, {}, b"internal error", 0.0),
            "/gz-body": (200, {"Content-Type": "application/gzip"}, gzip.compress(VALID), 0.0),
            "/gz-encoded": (200, {"Content-Encoding": "gzip"}, gzip.compress(VALID), 0.0),
            "/truncated-gz": (200, {"Content-Type": "application/gzip"}, gzip.compress(VALID)[:40], 0.0),
            "/slow": (200, {}, VALID, 2.0),
        }
    )
    return base


def run_update(*args: str) -> Any:
    return CliRunner().invoke(cli, ["ip-ranges", "update", *args])


def snapshot_dir(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in ``directory`` with its bytes and mtime: what "untouched" means."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_update_writes_gzip_by_default_name(tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_update("--url", f"{url}/valid.json")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "aws-ip-ranges.json.gz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aws-ip-ranges.json.gz"]  # no temp file left
    assert gzip.decompress(out.read_bytes()) == VALID  # AWS's bytes, unmodified
    assert result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line
    for part in ("aws-ip-ranges.json.gz", "2023-11-14-22-13-20", "1700000000", "2 IPv4", "1 IPv6"):
        assert part in line
    index, info = load(out)
    assert info["syncToken"] == "1700000000"
    assert index.lookup_text("8.8.8.8") is True


def test_update_plain_output(tmp_path: Path, url: str) -> None:
    out = tmp_path / "ranges.json"
    result = run_update("--url", f"{url}/valid.json", "--output", str(out))
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes() == VALID


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/500", "HTTP 500"),
        ("/missing", "HTTP 404"),
        ("/invalid-json", "not valid JSON"),
        ("/html", "not valid JSON"),
        ("/bad-prefix.json", r"prefixes[1].ip_prefix"),
        ("/no-token.json", "syncToken"),
        ("/older-token.json", "syncToken 1699999999 is older than the existing 1700000000"),
        ("/older-date.json", "createDate 2023-11-14-22-13-19 is older than the existing 2023-11-14-22-13-20"),
        ("/truncated-gz", "truncated gzip"),
    ],
)
def test_update_refuses_and_leaves_existing_file(tmp_path: Path, url: str, path: str, message: str) -> None:
    out = tmp_path / "ranges.json.gz"
    out.write_bytes(gzip.compress(VALID))
    before = snapshot_dir(tmp_path)
    result = run_update("--url", f"{url}{path}", "--output", str(out))
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("detector ip-ranges update: error: ")
    assert message in result.stderr
    assert snapshot_dir(tmp_path) == before


@pytest.mark.parametrize("path", ["/500", "/invalid-json", "/bad-prefix.json"])
def test_update_failure_writes_nothing(tmp_path: Path, url: str, path: str) -> None:
    result = run_update("--url", f"{url}{path}", "--output", str(tmp_path / "ranges.json"))
    assert result.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_update_older_with_force(tmp_path: Path, url: str) -> None:
    out = tmp_path / "ranges.json"
    out.write_bytes(VALID)
    result = run_update("--url", f"{url}/older-token.json", "--output", str(out), "--force")
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes() == OLDER_TOKEN


def test_update_same_then_newer(tmp_path: Path, url: str) -> None:
    out = tmp_path / "ranges.json"
    out.write_bytes(VALID)
    os.chmod(out, 0o640)
    same = run_update("--url", f"{url}/valid.json", "--output", str(out))
    assert same.exit_code == 0, same.stderr  # the same document is not older
    newer = run_update("--url", f"{url}/newer.json", "--output", str(out))
    assert newer.exit_code == 0, newer.stderr
    assert out.read_bytes() == NEWER
    assert "1700000100" in newer.stderr and "1 IPv4 and 0 IPv6" in newer.stderr
    assert out.stat().st_mode & 0o777 == 0o640  # the replaced file keeps its permissions
    assert [p.name for p in tmp_path.iterdir()] == ["ranges.json"]


@pytest.mark.parametrize("path", ["/gz-body", "/gz-encoded"])
def test_update_gzip_transfers(tmp_path: Path, url: str, path: str) -> None:
    out = tmp_path / "ranges.json"
    result = run_update("--url", f"{url}{path}", "--output", str(out))
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes() == VALID


@pytest.mark.parametrize(
    "existing",
    [b"garbage", gzip.compress(VALID)[:40], dump(_without("syncToken"))],
    ids=["not-json", "truncated-gzip", "invalid"],
)
def test_update_corrupt_existing_needs_force(tmp_path: Path, url: str, existing: bytes) -> None:
    out = tmp_path / "ranges.json"
    out.write_bytes(existing)
    result = run_update("--url", f"{url}/valid.json", "--output", str(out))
    assert result.exit_code == 2
    assert "existing file" in result.stderr and "--force" in result.stderr
    assert out.read_bytes() == existing
    forced = run_update("--url", f"{url}/valid.json", "--output", str(out), "--force")
    assert forced.exit_code == 0, forced.stderr
    assert out.read_bytes() == VALID


def test_update_timeout(tmp_path: Path, url: str) -> None:
    out = tmp_path / "ranges.json"
    started = time.monotonic()
    result = run_update("--url", f"{url}/slow", "--output", str(out), "--timeout", "0.3")
    assert time.monotonic() - started < 1.5
    assert result.exit_code == 2
    assert "within 0.3 s" in result.stderr
    assert not out.exists()


def test_update_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = run_update("--url", f"http://127.0.0.1:{port}/ip-ranges.json", "--output", str(tmp_path / "r.json"))
    assert result.exit_code == 2
    assert "download failed" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad_url", ["not a url", "ftp://127.0.0.1/ip-ranges.json"])
def test_update_unusable_url(tmp_path: Path, bad_url: str) -> None:
    result = run_update("--url", bad_url, "--output", str(tmp_path / "r.json"))
    assert result.exit_code == 2
    assert "download failed" in result.stderr


def test_update_missing_directory(tmp_path: Path, url: str) -> None:
    result = run_update("--url", f"{url}/valid.json", "--output", str(tmp_path / "nope" / "r.json"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_update_subprocess_entry_point(tmp_path: Path, url: str) -> None:
    out = tmp_path / "ranges.json.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "detector", "ip-ranges", "update", "--url", f"{url}/valid.json", "-o", str(out)],
        capture_output=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
    )
    assert proc.returncode == 0, proc.stderr
    assert gzip.decompress(out.read_bytes()) == VALID
    assert b"syncToken 1700000000" in proc.stderr


def test_write_atomically_failure_keeps_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ranges.json"
    out.write_bytes(b"original")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(out, b"new contents")
    assert out.read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["ranges.json"]  # the temp file is removed
