"""``detector run --stage route|detect`` (issue 11): the two stages in two processes give the findings one
``--stage all`` process gives."""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka_support import (  # noqa: F401 - fixtures
    DetectorProcess,
    broker,
    create_topics,
    finding_key,
    latest_findings,
    librdkafka_produce,
    read_topic,
    unique,
    wait_until,
)
from test_state import expected_keys, run_world_through, settings_for, world_registry
from worldgen import make_world

from detector.embedded import EmbeddedBroker
from detector.service.app import DetectorService

pytestmark = pytest.mark.kafka


async def test_route_and_detect_processes_equal_one_all_process(broker: EmbeddedBroker, tmp_path: Path) -> None:
    world = make_world(seed=41, n_accounts=4, instances_per_account=5)
    one = await run_world_through(1, world, broker, tmp_path)
    assert one == expected_keys(world)

    prefix = unique("stages")
    s = settings_for(broker.bootstrap, prefix, world_registry(world, tmp_path))
    await create_topics(broker.bootstrap, {s.input_topics: 3})
    log = tmp_path / "stages.log"
    detect = DetectorProcess(s, log, env={"DETECTOR_STAGE": "detect"})  # first: it waits for nothing
    route = DetectorProcess(s, log, env={"DETECTOR_STAGE": "route"})
    try:
        await wait_until(route.ready, timeout=60)
        await wait_until(detect.ready, timeout=60)
        messages = world.messages()
        librdkafka_produce(broker.bootstrap, s.input_topics, messages)

        async def caught_up() -> bool:
            routed, detected = await route.metrics(), await detect.metrics()
            return (
                routed.get("detector_events_total", 0) >= len(messages)
                and detected.get("detector_detect_records_total", 0) >= routed.get("detector_repartitioned_total", 0) > 0
                # each process runs its stage only
                and routed.get("detector_detect_records_total", 0) == 0
                and detected.get("detector_events_total", 0) == 0
            )

        await wait_until(caught_up, timeout=90)
        assert route.terminate() == 0
        assert detect.terminate() == 0
    finally:
        route.ensure_stopped()
        detect.ensure_stopped()
    latest = latest_findings(await read_topic(broker.bootstrap, s.findings_topic))
    assert sorted(finding_key(f) for f in latest.values()) == one


def test_stage_setting_selects_the_stages_a_service_runs() -> None:
    from kafka_support import service_settings

    stages = {
        stage: [st.name for st in DetectorService(service_settings("localhost:9092", "x", stage=stage)).stages]
        for stage in ("all", "route", "detect")
    }
    assert stages == {"all": ["detect", "route"], "route": ["route"], "detect": ["detect"]}
