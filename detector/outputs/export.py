"""``detector export securityhub``: every finding into its home account's AWS Security Hub (ASFF).

Per batch: the latest state of each finding id (an older or equal ``updatedAt`` than the one last sent
is never sent: Security Hub's copy only moves forward; a repeat after a crash sends the same state again,
which replaces it with itself), grouped by (account, region), imported 100 at a time with
``BatchImportFindings``. Before the first import into an account and region, and again every
``hub_check_seconds``, ``DescribeHub`` tells whether Security Hub is enabled there: when it is not
(``InvalidAccessException``), that account's findings are counted as failed (``hub_disabled``) with one
clear error naming the account, and the consumer moves on. ``FailedFindings`` are logged and counted.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import structlog
from prometheus_client import Counter
from botocore.exceptions import BotoCoreError, ClientError

from ..aws.sync import describe_error
from .asff import to_asff
from .aws import AssumeRoleFailed, AwsAccess, Transient, error_code, is_denied
from .consumer import FindingConsumer, Incoming, Recent
from .metrics import ACCESS_DENIED, ASSUME_ROLE, AWS_ERROR, OutputMetrics
from .settings import ExportSettings

log = structlog.get_logger("detector.export")

BATCH_LIMIT = 100  # BatchImportFindings takes at most 100 findings per call
HUB_DISABLED = "hub_disabled"
REJECTED = "rejected"  # listed in FailedFindings
STALE = "stale"  # a state not newer than the one already sent
SUPERSEDED = "superseded"  # an older state of an id whose newer state is in the same batch


class ExportMetrics(OutputMetrics):
    def __init__(self) -> None:
        super().__init__("detector_export", skip_reasons=(STALE, SUPERSEDED), fail_reasons=(HUB_DISABLED, REJECTED))
        self.imported = Counter("detector_export_imported_total", "Findings Security Hub accepted.", registry=self.registry)
        self.import_calls = Counter(
            "detector_export_import_calls_total", "BatchImportFindings calls that succeeded.", registry=self.registry
        )


class SecurityHubExporter:
    name = "export-securityhub"

    def __init__(self, settings: ExportSettings, metrics: ExportMetrics, aws: AwsAccess | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.aws = aws or AwsAccess(settings, metrics, "detector-export-securityhub")
        self.sent: Recent = Recent(settings.tracked_findings)  # id -> updatedAt last imported (or failed for good)
        self.hubs: dict[tuple[str, str], tuple[bool, float]] = {}  # (account, region) -> (enabled, checked at)

    def region(self, incoming: Incoming) -> str:
        f = incoming.finding
        return self.settings.securityhub_region or (f.region if f.region != "unknown" else self.aws.default_region)

    async def handle(self, batch: list[Incoming]) -> list[Incoming]:
        latest: dict[str, Incoming] = {}
        for item in batch:
            f = item.finding
            sent = self.sent.get(f.id)
            if sent is not None and f.updated_at <= sent:
                self.metrics.skipped.labels(STALE).inc()
                continue
            held = latest.get(f.id)
            if held is not None:
                self.metrics.skipped.labels(SUPERSEDED).inc()
                if held.finding.updated_at >= f.updated_at:
                    continue
            latest[f.id] = item
        groups: dict[tuple[str, str, str], list[Incoming]] = defaultdict(list)
        for item in latest.values():
            groups[(item.finding.account, item.finding.partition, self.region(item))].append(item)
        retry: list[Incoming] = []
        for (account, partition, region), items in groups.items():
            try:
                await self._account(account, partition, region, items)
            except Transient as exc:
                log.warning("export_deferred", account=account, region=region, findings=len(items), error=str(exc))
                retry += items
        return retry

    async def _account(self, account: str, partition: str, region: str, items: list[Incoming]) -> None:
        """Import ``items`` into one account and region (:class:`Transient` when it must wait)."""
        try:
            credentials, caller = await self.aws.credentials(account, partition)
        except AssumeRoleFailed as exc:
            self._failed(ASSUME_ROLE, items, f"{exc}", account=account)
            return
        done = 0  # items imported (or rejected) so far: a failure concerns the others only
        try:
            async with self.aws.client("securityhub", region, credentials) as hub:
                if not await self._hub_enabled(hub, account, region):
                    self._failed(HUB_DISABLED, items, f"Security Hub is not enabled in account {account} region {region}",
                                 account=account, region=region)  # fmt: skip
                    return
                for done in range(0, len(items), BATCH_LIMIT):
                    await self._import(hub, account, region, caller, items[done : done + BATCH_LIMIT])
        except (ClientError, BotoCoreError) as exc:
            rest = items[done:]
            if error_code(exc) == "InvalidAccessException":
                self.hubs[(account, region)] = (False, time.monotonic())
                self._failed(HUB_DISABLED, rest, f"Security Hub is not enabled in account {account} region {region}: "
                             f"{describe_error(exc)}", account=account, region=region)  # fmt: skip
                return
            reason = ACCESS_DENIED if is_denied(exc) else AWS_ERROR
            self._failed(reason, rest, describe_error(exc), account=account, region=region)

    async def _hub_enabled(self, hub: Any, account: str, region: str) -> bool:
        known = self.hubs.get((account, region))
        if known is not None and time.monotonic() - known[1] < self.settings.hub_check_seconds:
            return known[0]
        try:
            await self.aws.call(f"securityhub:DescribeHub {account} {region}", hub.describe_hub)
            enabled = True
        except ClientError as exc:
            if error_code(exc) != "InvalidAccessException":
                if not is_denied(exc):
                    raise
                log.info("describe_hub_denied", account=account, region=region)  # BatchImportFindings will tell
            enabled = error_code(exc) != "InvalidAccessException"
        self.hubs[(account, region)] = (enabled, time.monotonic())
        return enabled

    async def _import(self, hub: Any, account: str, region: str, caller: str, chunk: list[Incoming]) -> None:
        docs = [to_asff(item.finding, region=region, product_account=caller) for item in chunk]
        answer = await self.aws.call(
            f"securityhub:BatchImportFindings {account} {region}", lambda: hub.batch_import_findings(Findings=docs)
        )
        self.metrics.import_calls.inc()
        failed = {f.get("Id"): f for f in answer.get("FailedFindings", [])}
        by_asff_id = {doc["Id"]: item for doc, item in zip(docs, chunk, strict=True)}
        for asff_id, item in by_asff_id.items():
            if asff_id in failed:
                problem = failed[asff_id]
                self._failed(REJECTED, [item], f"{problem.get('ErrorCode')}: {problem.get('ErrorMessage')}",
                             account=account, region=region)  # fmt: skip
                continue
            self.sent.put(item.finding.id, item.finding.updated_at)
            self.metrics.imported.inc()
        log.info("findings_imported", account=account, region=region, imported=len(chunk) - len(failed), failed=len(failed))

    def _failed(self, reason: str, items: list[Incoming], error: str, **where: str) -> None:
        """Count and log a failure for good; the states count as handled (a batch that comes again after
        a retry elsewhere does not fail them twice)."""
        self.metrics.failed.labels(reason).inc(len(items))
        for item in items:
            self.sent.put(item.finding.id, item.finding.updated_at)
        log.error("export_failed", reason=reason, error=error, findings=len(items),
                  finding_ids=[i.finding.id for i in items[:10]], **where)  # fmt: skip


def exporter(settings: ExportSettings) -> FindingConsumer:
    metrics = ExportMetrics()
    return FindingConsumer(settings, metrics, SecurityHubExporter(settings, metrics))
