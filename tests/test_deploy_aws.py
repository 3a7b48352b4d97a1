"""deploy/aws: the CloudFormation templates pass cfn-lint, and the ingest policy they grant is enough for
`detector ingest` and no more (checked against a moto server that enforces IAM)."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aws_helpers import MotoServer, create_user
from ingest_support import aws_env, ingest_settings, make_queue, notify_bucket, sample, start_ingest, stop_ingest
from kafka_support import broker, read_topic, unique, wait_until  # noqa: F401 - fixtures

from detector.embedded import EmbeddedBroker

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "deploy" / "aws").glob("*.yaml"))


def test_templates_exist() -> None:
    names = {p.name for p in TEMPLATES}
    assert {"eventbridge-queue.yaml", "eventbridge-forwarder.yaml", "s3-notifications.yaml", "ingest-iam.yaml"} <= names


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_cfn_lint_finds_no_error(template: Path) -> None:
    cfn_lint = shutil.which("cfn-lint", path=str(Path(sys.executable).parent)) or shutil.which("cfn-lint")
    assert cfn_lint, "cfn-lint is a dev dependency"
    proc = subprocess.run([cfn_lint, "--format", "parseable", str(template)], capture_output=True, text=True)
    # exit status bits: 2 errors, 4 warnings, 8 informational; 1 a failure of cfn-lint itself
    errors = [line for line in proc.stdout.splitlines() if re.search(r":E\d{4}:", line)]
    assert proc.returncode & 3 == 0 and not errors, proc.stdout + proc.stderr


def resolve(value: Any, params: dict[str, Any], conditions: dict[str, bool]) -> Any:
    """Just enough of CloudFormation's intrinsic functions for the policy document."""
    if isinstance(value, list):
        out = [resolve(v, params, conditions) for v in value]
        return [v for v in out if v is not _NO_VALUE]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Ref"}:
        return _NO_VALUE if value["Ref"] == "AWS::NoValue" else params[value["Ref"]]
    if set(value) == {"Fn::Sub"}:
        return re.sub(r"\$\{([^}]+)\}", lambda m: str(params[m.group(1)]), value["Fn::Sub"])
    if set(value) == {"Fn::If"}:
        name, yes, no = value["Fn::If"]
        return resolve(yes if conditions[name] else no, params, conditions)
    return {k: resolve(v, params, conditions) for k, v in value.items()}


_NO_VALUE = object()


def ingest_policy(queue_arns: list[str], bucket: str, prefix: str) -> dict[str, Any]:
    from cfnlint.decode import cfn_yaml

    template = cfn_yaml.load(str(ROOT / "deploy" / "aws" / "ingest-iam.yaml"))
    params = {
        "QueueArns": queue_arns, "TrailBucketName": bucket, "TrailPrefix": prefix, "KmsKeyArn": "",
        "AWS::Partition": "aws", "AWS::Region": "us-east-1",
    }  # fmt: skip
    document = template["Resources"]["IngestPolicy"]["Properties"]["PolicyDocument"]
    return resolve(json.loads(json.dumps(document)), params, {"HasKmsKey": False})


@pytest.fixture
def enforcing() -> Iterator[MotoServer]:
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.kafka
@pytest.mark.aws
async def test_ingest_runs_on_the_templates_policy_alone(broker: EmbeddedBroker, enforcing: MotoServer) -> None:
    """With only the policy of ingest-iam.yaml: log files under the trail prefix go through; an object
    outside it is unreadable (AccessDenied), counted, and its message left to the redrive policy."""
    topic = unique("ingest-iam")
    url, dlq = make_queue(enforcing, max_receives=1)
    bucket = unique("trail")
    notify_bucket(enforcing, bucket, url)
    arn = enforcing.client("sqs").get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    keys = create_user(enforcing, "detector-ingest", ingest_policy([arn], bucket, "AWSLogs/"))
    admin = create_user(enforcing, "admin", {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
    enforcing.enforce_iam()
    sqs = enforcing.client("sqs", **admin)

    def counts(queue: str) -> tuple[int, int]:
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=names)["Attributes"]
        return int(attrs[names[0]]), int(attrs[names[1]])

    inside = gzip.compress(json.dumps({"Records": [{"eventVersion": "1.08", "eventID": "in", "userIdentity": {"type": "Root"}, "eventTime": "2026-11-30T00:00:00Z"}]}).encode())
    s3 = enforcing.client("s3", **admin)
    s3.put_object(Bucket=bucket, Key="AWSLogs/111122223333/CloudTrail/us-east-1/2026/11/30/a.json.gz", Body=inside)
    s3.put_object(Bucket=bucket, Key="elsewhere/b.json.gz", Body=inside)
    with aws_env(enforcing.url):
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = keys["aws_access_key_id"], keys["aws_secret_access_key"]
        service, task = await start_ingest(ingest_settings(broker.bootstrap, topic, url, visibility_timeout_seconds=2))
        await wait_until(lambda: counts(url) == (0, 0) and counts(dlq)[0] == 1, timeout=60)
        assert await stop_ingest(service, task) == 0
    assert sample(service, "detector_ingest_failures_total", reason="access_denied") == 1
    assert sample(service, "detector_ingest_objects_total") == 1
    got = await read_topic(broker.bootstrap, topic)
    assert [json.loads(m.value)["eventID"] for m in got] == ["in"]
