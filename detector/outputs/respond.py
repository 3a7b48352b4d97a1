"""``detector respond``: contain stolen instance credentials with an inline deny policy (SPEC §14).

For each finding id seen for the first time with severity 8, the deny statement of
:mod:`detector.outputs.containment` goes into the one inline policy (``policy_name``) of the instance role
(``resource.accessKeyDetails.userName``) in the finding's home account — when the role matches
``role_name_pattern``. Dry run (the default) prints the policy it would merge, as one JSON line per role on
standard output, and calls nothing in AWS. With ``apply``: ``ListRolePolicies`` and ``GetRolePolicy``
(the current statements, and the size of the role's other inline policies), the merge (a Sid already
there is not added again; our oldest statements roll off to stay within IAM's 10,240 characters), then
one ``PutRolePolicy`` per role and batch — none when nothing changed. A crash between ``PutRolePolicy``
and the commit repeats the batch: the statements are found by Sid, nothing is added twice.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from typing import Any, TextIO

import structlog
from botocore.exceptions import BotoCoreError, ClientError
from prometheus_client import Counter

from ..aws.sync import describe_error
from .aws import AssumeRoleFailed, AwsAccess, Transient, error_code, is_denied
from .consumer import FindingConsumer, Incoming, Recent, serve_consumer
from .containment import CONTAINED_SEVERITY, NO_ADDRESS, ROLE_POLICY_LIMIT, UNSUPPORTED_TYPE, Merge, merge, policy, policy_size, rebase, sid, statement
from .metrics import ACCESS_DENIED, ASSUME_ROLE, AWS_ERROR, OutputMetrics
from .settings import RespondSettings

log = structlog.get_logger("detector.respond")

NOT_NEW = "not_new"  # a later state of a finding already handled
LOW_SEVERITY = "severity"  # below 8: not contained
ROLE_NOT_ALLOWED = "role_not_allowed"  # outside role_name_pattern
ROLE_GONE = "role_gone"  # IAM NoSuchEntity: the role no longer exists
# AWS's reserved roles (the instance identity role `aws:ec2-instance`, SPEC §10) are not IAM roles of the
# account: no policy can be attached to them (contain by isolating the instance instead; docs/runbook.md)
RESERVED_ROLE = "reserved_role"
LIMIT_EXCEEDED = "limit_exceeded"  # IAM LimitExceeded on PutRolePolicy
POLICY_TOO_LARGE = "policy_too_large"  # the statement cannot fit beside the role's other inline policies
OTHER_ACCOUNT = "other_account"  # the credentials at hand are another account's (no assume_role_arn)
# IAM is eventually consistent: for this long after our own PutRolePolicy, our statements are taken from
# what we wrote rather than from what GetRolePolicy answers (which may still be the older document)
READ_AFTER_WRITE_SECONDS = 120.0
IAM_REGIONS = {"aws": "us-east-1", "aws-cn": "cn-north-1", "aws-us-gov": "us-gov-west-1"}


class RespondMetrics(OutputMetrics):
    def __init__(self) -> None:
        super().__init__(
            "detector_respond",
            skip_reasons=(NOT_NEW, LOW_SEVERITY, RESERVED_ROLE, ROLE_NOT_ALLOWED, ROLE_GONE, OTHER_ACCOUNT, NO_ADDRESS, UNSUPPORTED_TYPE),
            fail_reasons=(LIMIT_EXCEEDED, POLICY_TOO_LARGE),
        )
        r = self.registry
        self.policies_attached = Counter("detector_respond_policies_attached_total", "PutRolePolicy calls that succeeded.", registry=r)
        self.statements_added = Counter("detector_respond_statements_added_total", "Deny statements added to a role.", registry=r)
        self.statements_present = Counter(
            "detector_respond_statements_present_total", "Deny statements found already in place (not added twice).", registry=r
        )
        self.rolled_off = Counter(
            "detector_respond_statements_rolled_off_total", "Older deny statements removed to stay within IAM's size limit.", registry=r
        )
        self.dry_run = Counter(
            "detector_respond_dry_run_policies_total", "Policies printed instead of attached (dry run).", registry=r
        )


class Responder:
    name = "respond"

    def __init__(
        self, settings: RespondSettings, metrics: RespondMetrics, aws: AwsAccess | None = None, out: TextIO | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.aws = aws or AwsAccess(settings, metrics, "detector-respond")
        self.out = out or sys.stdout
        self.seen = Recent(settings.tracked_findings)  # ids handled (contained, skipped or failed for good)
        self.written: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}  # (account, role) -> our last write

    def _skip(self, item: Incoming, reason: str, level: str = "info", **extra: Any) -> None:
        self.seen.put(item.finding.id)
        self.metrics.skipped.labels(reason).inc()
        getattr(log, level)("respond_skipped", reason=reason, finding_id=item.finding.id, account=item.finding.account,
                            role=item.finding.role, **extra)  # fmt: skip

    def plan(self, batch: list[Incoming]) -> dict[tuple[str, str, str], list[tuple[Incoming, dict[str, Any]]]]:
        """The statements to put, per (account, partition, role), of the new findings of the batch."""
        plans: dict[tuple[str, str, str], list[tuple[Incoming, dict[str, Any]]]] = defaultdict(list)
        taken: set[str] = set()
        for item in batch:
            f = item.finding
            if f.id in taken or f.id in self.seen:
                self.metrics.skipped.labels(NOT_NEW).inc()
                continue
            taken.add(f.id)
            if f.severity < CONTAINED_SEVERITY:
                self._skip(item, LOW_SEVERITY, "debug")
                continue
            if f.role.startswith("aws:"):
                self._skip(item, RESERVED_ROLE, "warning", hint="AWS's own role: isolate the instance instead")
                continue
            stmt = statement(f)
            if isinstance(stmt, str):
                self._skip(item, stmt, "warning", type=f.type)
                continue
            if not self.settings.role_allowed(f.role):
                self._skip(item, ROLE_NOT_ALLOWED, "warning", role_name_pattern=self.settings.role_name_pattern)
                continue
            plans[(f.account, f.partition, f.role)].append((item, stmt))
        return plans

    async def handle(self, batch: list[Incoming]) -> list[Incoming]:
        retry: list[Incoming] = []
        for (account, partition, role), entries in self.plan(batch).items():
            if not self.settings.apply:
                self._print(account, role, entries)
                continue
            try:
                await self._contain(account, partition, role, entries)
            except Transient as exc:
                log.warning("respond_deferred", account=account, role=role, findings=len(entries), error=str(exc))
                retry += [item for item, _ in entries]
        return retry

    def _print(self, account: str, role: str, entries: list[tuple[Incoming, dict[str, Any]]]) -> None:
        line = {
            "dryRun": True,
            "accountId": account,
            "roleName": role,
            "policyName": self.settings.policy_name,
            "findingIds": [item.finding.id for item, _ in entries],
            "policyDocument": policy([stmt for _, stmt in entries]),
        }
        self.out.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.out.flush()
        self.metrics.dry_run.inc()
        for item, _ in entries:
            self.seen.put(item.finding.id)
        log.info("containment_dry_run", account=account, role=role, policy=self.settings.policy_name,
                 finding_ids=line["findingIds"], statements=len(entries))  # fmt: skip

    async def _contain(self, account: str, partition: str, role: str, entries: list[tuple[Incoming, dict[str, Any]]]) -> None:
        items = [item for item, _ in entries]
        where = {"account": account, "role": role, "policy": self.settings.policy_name}
        try:
            credentials, caller = await self.aws.credentials(account, partition)
        except AssumeRoleFailed as exc:
            self._fail(ASSUME_ROLE, items, str(exc), **where)
            return
        if caller != account:  # never touch a same-named role of another account
            for item in items:
                self._skip(item, OTHER_ACCOUNT, "error", credentials_account=caller,
                           hint="set assume_role_arn to a role template with {account} to act in every home account")  # fmt: skip
            return
        region = IAM_REGIONS.get(partition, self.aws.default_region)
        try:
            async with self.aws.client("iam", region, credentials) as iam:
                result, budget = await self._merge(iam, account, role, [stmt for _, stmt in entries])
                self._report(result, budget, items, where)
                if result.changed and policy_size(result.document) <= budget and result.document["Statement"]:
                    document = json.dumps(result.document, separators=(",", ":"))
                    await self.aws.call(
                        f"iam:PutRolePolicy {account} {role}",
                        lambda: iam.put_role_policy(RoleName=role, PolicyName=self.settings.policy_name, PolicyDocument=document),
                    )
                    self.written[(account, role)] = (time.monotonic(), result.document)
                    self.metrics.policies_attached.inc()
                    self.metrics.statements_added.inc(len(result.added))
                    self.metrics.rolled_off.inc(len(result.rolled_off))
                    log.warning("containment_attached", **where, added=result.added, rolled_off=result.rolled_off,
                                already_present=result.present, finding_ids=[i.finding.id for i in items],
                                policy_characters=policy_size(result.document), budget=budget)  # fmt: skip
        except (ClientError, BotoCoreError) as exc:
            code = error_code(exc)
            if code == "NoSuchEntity":
                for item in items:
                    self._skip(item, ROLE_GONE, "warning", error=describe_error(exc))
                return
            reason = LIMIT_EXCEEDED if code == "LimitExceeded" else ACCESS_DENIED if is_denied(exc) else AWS_ERROR
            self._fail(reason, items, describe_error(exc), **where)
            return
        for item in items:
            self.seen.put(item.finding.id)

    async def _merge(self, iam: Any, account: str, role: str, new: list[dict[str, Any]]) -> tuple[Merge, int]:
        """The role's containment policy merged with ``new``, and the characters it may use."""
        names: list[str] = []
        marker: str | None = None
        while True:
            kwargs = {"RoleName": role} | ({"Marker": marker} if marker else {})
            page = await self.aws.call(f"iam:ListRolePolicies {role}", lambda kw=kwargs: iam.list_role_policies(**kw))
            names += page.get("PolicyNames", [])
            marker = page.get("Marker") if page.get("IsTruncated") else None
            if not marker:
                break
        existing: Any = None
        others = 0
        for name in names:
            answer = await self.aws.call(
                f"iam:GetRolePolicy {role} {name}", lambda n=name: iam.get_role_policy(RoleName=role, PolicyName=n)
            )
            if name == self.settings.policy_name:
                existing = answer["PolicyDocument"]
            else:
                others += policy_size(answer["PolicyDocument"])
        budget = ROLE_POLICY_LIMIT - others
        recent = self.written.get((account, role))
        if recent is not None and time.monotonic() - recent[0] < READ_AFTER_WRITE_SECONDS:
            existing = rebase(existing, recent[1])
        return merge(existing, new, budget), budget

    def _report(self, result: Merge, budget: int, items: list[Incoming], where: dict[str, str]) -> None:
        by_sid = {sid(item.finding.id): item for item in items}
        present = [by_sid[s] for s in result.present if s in by_sid]
        self.metrics.statements_present.inc(len(present))
        if present:
            log.info("containment_already_present", **where, finding_ids=[i.finding.id for i in present])
        too_large = [by_sid[s] for s in result.too_large]
        if policy_size(result.document) > budget:  # other inline policies leave no room at all
            too_large = [by_sid[s] for s in result.added] + too_large
        if too_large:
            self._fail(POLICY_TOO_LARGE, too_large, f"the statements do not fit in {budget} characters beside the "
                       "role's other inline policies (IAM's 10,240 in aggregate)", **where)  # fmt: skip

    def _fail(self, reason: str, items: list[Incoming], error: str, **where: str) -> None:
        self.metrics.failed.labels(reason).inc(len(items))
        for item in items:
            self.seen.put(item.finding.id)
        log.error("respond_failed", reason=reason, error=error, finding_ids=[i.finding.id for i in items], **where)


def responder(settings: RespondSettings) -> FindingConsumer:
    metrics = RespondMetrics()
    return FindingConsumer(settings, metrics, Responder(settings, metrics))


async def serve(settings: RespondSettings) -> int:
    """`detector respond` until SIGTERM/SIGINT; the process exit status."""
    return await serve_consumer(responder(settings))
