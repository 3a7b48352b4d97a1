"""Prometheus metrics of the findings-topic consumers: ``detector_export_*`` and ``detector_respond_*``.

Base units, ``_total`` counters, bounded labels (reasons, topics, partitions; never an account, a role or
an address). Labelled series are created at zero so ``increase()`` sees their first event.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from .findings import SKIP_REASONS

# failure reasons shared by both consumers
ASSUME_ROLE = "assume_role"  # the account's role could not be assumed
ACCESS_DENIED = "access_denied"
AWS_ERROR = "aws_error"  # another non-transient AWS error
INTERNAL_ERROR = "internal_error"  # an unexpected exception: logged with its traceback, the batch skipped


class OutputMetrics:
    def __init__(self, prefix: str, *, skip_reasons: tuple[str, ...] = (), fail_reasons: tuple[str, ...] = ()) -> None:
        p = prefix
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.consumed = Counter(f"{p}_findings_consumed_total", "Messages read from the findings topic.", registry=r)
        self.skipped = Counter(f"{p}_skipped_total", "Findings not acted on, by reason.", ["reason"], registry=r)
        self.failed = Counter(f"{p}_failed_total", "Findings whose AWS action failed, by reason.", ["reason"], registry=r)
        self.throttled = Counter(
            f"{p}_throttled_retries_total", "Throttled AWS answers (TooManyRequests, Throttling...), each retried: at once or with its batch.", registry=r
        )
        self.aws_retries = Counter(
            f"{p}_aws_retries_total", "Transient AWS errors (5xx, connection), each retried: at once or with its batch.", registry=r
        )
        self.batch_retries = Counter(
            f"{p}_batch_retries_total", "Batches left uncommitted to be fetched and tried again.", registry=r
        )
        self.aws_calls = Histogram(
            f"{p}_aws_call_seconds", "Duration of one AWS call (retries excluded).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )  # fmt: skip
        self.commits = Counter(f"{p}_commits_total", "Offset commits that succeeded.", registry=r)
        self.commit_failures = Counter(f"{p}_commit_failures_total", "Offset commits that failed.", registry=r)
        self.broker_errors = Counter(f"{p}_broker_errors_total", "Failed attempts to reach the Kafka cluster.", registry=r)
        self.ready = Gauge(f"{p}_ready", "1 when connected and a member of the consumer group.", registry=r)
        self.consumer_lag = Gauge(
            f"{p}_consumer_lag", "Findings between the consumer position and the high watermark.",
            ["topic", "partition"], registry=r,
        )  # fmt: skip
        for reason in (*SKIP_REASONS, *skip_reasons):
            self.skipped.labels(reason)
        for reason in (ASSUME_ROLE, ACCESS_DENIED, AWS_ERROR, INTERNAL_ERROR, *fail_reasons):
            self.failed.labels(reason)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
