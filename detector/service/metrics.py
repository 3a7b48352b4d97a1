"""Prometheus metrics of the service: app prefix ``detector_``, base units, ``_total`` counters.

No label ever carries a session, instance, account or address: cardinality stays bounded by topics,
partitions, finding types and reasons. Each service instance owns its own ``CollectorRegistry`` so tests
can run several in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.exposition import generate_latest

from .. import __version__
from ..core.engine import AFTER_STOP, HIGH, IMDSV1, INSIDE_AWS, LOW, MEDIUM, OTHER_INSTANCE, OUTSIDE_AWS

# Every finding type and severity the engine opens (SPEC §5, §11-§13).
FINDING_KINDS = (
    (INSIDE_AWS, MEDIUM),
    (INSIDE_AWS, HIGH),
    (OUTSIDE_AWS, HIGH),
    (AFTER_STOP, HIGH),
    (OTHER_INSTANCE, HIGH),
    (IMDSV1, LOW),
)


def type_label(finding_type: str) -> str:
    """The ``type`` label of a finding type: its last name (``OutsideAWS``, ``AfterInstanceStopped``,
    ``InstanceCredentialsDeliveredByIMDSv1``), short enough for a legend and still unambiguous."""
    return finding_type.rsplit("/", 1)[-1].rsplit(".", 1)[-1]

LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
PROCESSING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

disable_created_metrics()  # no *_created series: dashboards and promtool want the plain counters


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.build_info = Info("detector_build", "Version of the running detector.", registry=r)
        self.build_info.info({"version": __version__})
        # --- the names SPEC §9 requires -------------------------------------------------------------
        self.events = Counter("detector_events_total", "Input messages consumed, by topic.", ["topic"], registry=r)
        self.malformed = Counter(
            "detector_events_malformed_total", "Malformed inputs or records, by reason.", ["reason"], registry=r
        )
        self.instance_events = Counter(
            "detector_instance_events_total", "CloudTrail records made with EC2 instance credentials.", registry=r
        )
        self.findings = Counter(
            "detector_findings_total", "Finding groups opened, by type and severity.", ["type", "severity"], registry=r
        )
        self.sessions = Gauge("detector_sessions", "Entries in the session index.", registry=r)
        self.lifecycle_instances = Gauge(
            "detector_lifecycle_instances",
            "Instances with a lifecycle entry (SPEC §11 stop and start times) in the index.",
            registry=r,
        )
        self.event_lag = Histogram(
            "detector_event_lag_seconds",
            "Finding publish time minus the eventTime of the record that caused it.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.processing = Histogram(
            "detector_processing_seconds",
            "Time to process one fetched batch, from decode to acknowledged output.",
            buckets=PROCESSING_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "detector_consumer_lag",
            "Messages between the consumer position and the high watermark.",
            ["topic", "partition"],
            registry=r,
        )
        # --- operations -----------------------------------------------------------------------------
        self.finding_updates = Counter(
            "detector_finding_updates_total", "Finding states published (new and updated).", registry=r
        )
        self.findings_open = Gauge("detector_findings_open", "Finding groups held in state.", registry=r)
        self.dead_letters = Counter(
            "detector_dead_letters_total", "Messages published to the dead-letter topic.", registry=r
        )
        self.rebalances = Counter(
            "detector_rebalances_total", "Consumer-group rebalances seen, by event.", ["event"], registry=r
        )
        self.assigned_partitions = Gauge(
            "detector_assigned_partitions", "Input partitions assigned to this instance.", registry=r
        )
        self.commits = Counter("detector_commits_total", "Offset commits that succeeded.", registry=r)
        self.commit_failures = Counter("detector_commit_failures_total", "Offset commits that failed.", registry=r)
        self.registry_reloads = Counter(
            "detector_registry_reloads_total", "Registry reloads, by result.", ["result"], registry=r
        )
        self.registry_accounts = Gauge("detector_registry_accounts", "Accounts in the registry in force.", registry=r)
        self.evictions = Counter(
            "detector_index_evictions_total", "Session entries removed, by reason (ttl, lru).", ["reason"], registry=r
        )
        self.session_ttl = Gauge("detector_session_ttl_seconds", "Idle TTL of a session entry.", registry=r)
        self.session_capacity = Gauge("detector_session_capacity", "Cap of the session index.", registry=r)
        self.broker_errors = Counter(
            "detector_broker_errors_total", "Failed attempts to reach the Kafka cluster.", registry=r
        )
        self.ready = Gauge("detector_ready", "1 when partitions are assigned and state is restored.", registry=r)
        self.restoring_partitions = Gauge(
            "detector_restoring_partitions", "Partitions whose state is being restored.", registry=r
        )
        self.restored_records = Counter(
            "detector_restore_records_total", "Changelog records replayed while restoring state.", registry=r
        )
        self.restore_seconds = Histogram(
            "detector_restore_seconds",
            "Time to restore the state of one assignment.",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
            registry=r,
        )
        self.changelog_records = Counter(
            "detector_changelog_records_total", "State changes written to the changelog topic.", registry=r
        )
        self.repartitioned = Counter(
            "detector_repartitioned_total", "Instance-session records routed to the internal topic.", registry=r
        )
        self.detected = Counter(
            "detector_detect_records_total",
            "Records of the internal topic applied by the detection stage (compare with repartitioned).",
            registry=r,
        )
        self.records_dropped = Counter(
            "detector_records_dropped_total",
            "CloudTrail records dropped early: not made with, nor issuing, instance credentials.",
            registry=r,
        )
        self.registry_syncs = Counter(
            "detector_registry_syncs_total", "In-process registry syncs from AWS, by result.", ["result"], registry=r
        )

        # Labelled series exist from the start at zero, so increase() sees their first event.
        for finding_type, severity in FINDING_KINDS:
            self.findings.labels(type_label(finding_type), str(severity))
        for result in ("success", "failure"):
            self.registry_reloads.labels(result)
            self.registry_syncs.labels(result)
        for reason in ("ttl", "lru"):
            self.evictions.labels(reason)
        for event in ("assigned", "revoked"):
            self.rebalances.labels(event)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
