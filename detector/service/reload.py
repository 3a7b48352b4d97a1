"""Reloading the registry and the AWS ip-ranges file (on change, on SIGHUP) and syncing the registry from AWS."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import structlog

from .. import ipranges
from ..registry import RegistryError, load_registry

log = structlog.get_logger("detector.service")


class Reloads:
    """The reload half of :class:`~detector.service.app.DetectorService` (a mixin over its settings, engine,
    metrics, ``_stamps`` and ``stopping``)."""

    @staticmethod
    def _stamp(path: Any) -> tuple[int, int] | None:
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def reload_registry(self, reason: str) -> bool:
        """Load the registry file again; a bad file keeps the registry in force (SPEC §7)."""
        path = self.settings.registry
        if path is None:
            return False
        try:
            registry = await asyncio.to_thread(load_registry, path)
        except RegistryError as exc:
            self.metrics.registry_reloads.labels("failure").inc()
            log.error("registry_reload_failed", reason=reason, error=str(exc))
            return False
        self.engine.registry = registry
        self.metrics.registry_reloads.labels("success").inc()
        self.metrics.registry_accounts.set(len(registry.accounts))
        log.info("registry_reloaded", reason=reason, **registry.summary())
        return True

    async def reload_ip_ranges(self, reason: str) -> bool:
        try:
            ranges, info = await asyncio.to_thread(ipranges.load, self.settings.ip_ranges)
        except ipranges.IpRangesError as exc:
            log.error("ip_ranges_reload_failed", reason=reason, error=str(exc))
            return False
        self.engine.aws_ranges, self.ranges_info = ranges, info
        log.info("ip_ranges_reloaded", reason=reason, createDate=info["createDate"], prefixes=info["prefixes"])
        return True

    async def sync_registry_once(self) -> bool:
        """Rebuild the registry from AWS and swap it in; on any failure keep the registry in force."""
        from ..aws import SyncOptions, sync_registry, write_registry
        from ..core.registry import registry_from_mapping

        s = self.settings
        options = SyncOptions(
            role_name=s.registry_sync_role_name,
            regions=tuple(r for r in s.registry_sync_regions.split(",") if r.strip()),
            endpoint_url=s.registry_sync_endpoint_url,
        )
        try:
            overlay = load_registry(s.registry_sync_overlay) if s.registry_sync_overlay is not None else None
            mapping = await sync_registry(None, options, overlay=overlay, progress=lambda line: log.debug("registry_sync", line=line))
            registry = registry_from_mapping(mapping, "aws-sync")
            if s.registry_sync_output is not None:
                await asyncio.to_thread(write_registry, s.registry_sync_output, mapping)
        except Exception as exc:  # noqa: BLE001 - SyncError, RegistryError, OSError, botocore's many kinds
            self.metrics.registry_syncs.labels("failure").inc()
            log.error("registry_sync_failed", error=f"{type(exc).__name__}: {exc}")
            return False
        self.engine.registry = registry
        self.metrics.registry_syncs.labels("success").inc()
        self.metrics.registry_accounts.set(len(registry.accounts))
        log.info("registry_synced", **registry.summary())
        return True

    async def _sync_registry_loop(self) -> None:
        while not self.stopping.is_set():
            await self.sync_registry_once()
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self.settings.registry_sync_seconds)
            except asyncio.TimeoutError:
                pass

    async def _watch_files(self) -> None:
        interval = self.settings.registry_reload_seconds
        if interval <= 0:
            return
        while not self.stopping.is_set():
            await asyncio.sleep(interval)
            for name, path, reload in (
                ("registry", self.settings.registry, self.reload_registry),
                ("ip_ranges", self.settings.ip_ranges, self.reload_ip_ranges),
            ):
                stamp = self._stamp(path)
                if stamp is not None and stamp != self._stamps[name]:
                    self._stamps[name] = stamp
                    await reload("file_changed")

