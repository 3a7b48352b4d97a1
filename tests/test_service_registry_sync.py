"""The service's in-process registry sync (issue 6, item 2) against a real moto server and broker."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import orjson
import pytest
from aws_helpers import REGION, ROLE_NAME, MotoServer, build_org, cli_env, ROOT_KEYS
from kafka_support import broker, service_settings, unique, wait_until  # noqa: F401 - fixtures

from detector.embedded import EmbeddedBroker
from detector.registry import load_registry
from detector.service.app import DetectorService

pytestmark = [pytest.mark.aws, pytest.mark.kafka]


async def test_periodic_sync_hot_swaps_the_registry_and_keeps_human_decisions(
    broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = MotoServer()
    try:
        org = build_org(server)
        for name, value in cli_env(ROOT_KEYS).items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)
        member = next(iter(org.members.values()))
        overlay = tmp_path / "overlay.json"
        overlay.write_bytes(orjson.dumps({"accounts": {member.account_id: {"name": "payments", "trusted": True}}}))
        output = tmp_path / "synced.json"
        prefix = unique("sync")
        settings = service_settings(
            broker.bootstrap,
            prefix,
            registry_sync_seconds=1.0,
            registry_sync_role_name=ROLE_NAME,
            registry_sync_regions=REGION,
            registry_sync_endpoint_url=server.url,
            registry_sync_overlay=overlay,
            registry_sync_output=output,
        )
        service = DetectorService(settings)
        assert service.engine.registry.accounts == {}
        task = asyncio.create_task(service.run())
        await wait_until(lambda: len(service.engine.registry.accounts) == 3, timeout=60)
        registry = service.engine.registry
        assert set(registry.accounts) == {org.management, *(m.account_id for m in org.members.values())}
        assert all(a.affiliated for a in registry.accounts.values())
        for m in org.members.values():
            account = registry.accounts[m.account_id]
            cidrs = {str(ipaddress.ip_network(c)) for c in account.cidrs}
            assert {f"{ip}/32" for ip in m.eips} <= cidrs
            assert {str(ipaddress.ip_network(c)) for c in m.ipv6} <= cidrs
            assert set(m.vpc_endpoints) <= set(account.vpc_endpoints)
        assert registry.accounts[member.account_id].trusted and registry.accounts[member.account_id].name == "payments"
        assert service.metrics.registry_syncs.labels("success")._value.get() >= 1
        assert load_registry(output).accounts.keys() == registry.accounts.keys()  # persisted atomically

        overlay.write_text('{"accounts": {"not-an-account": {}}}')  # the next syncs fail; the registry stays
        failures = service.metrics.registry_syncs.labels("failure")
        await wait_until(lambda: failures._value.get() >= 1, timeout=60)
        assert service.engine.registry.accounts.keys() == registry.accounts.keys()
        service.stop()
        assert await asyncio.wait_for(task, timeout=30) == 0
    finally:
        server.stop()
