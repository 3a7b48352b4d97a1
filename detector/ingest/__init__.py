"""``detector ingest``: the bridge from AWS (SQS queues of EventBridge events and S3 notifications) to the
input topic (SPEC §14 "In").

:mod:`.bodies` is pure (message bodies, log-file splitting, partition keys); :mod:`.bridge` is the thin
adapter around it (aiobotocore, aiokafka, HTTP).
"""
