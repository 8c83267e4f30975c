"""S3AdapterStore on a real S3 API server (moto): races, a killed publisher, bucket tampering, the factory.

The AdapterStore contract itself runs against this store in test_adapter_registry.py (``store`` fixture).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sam_core.adapters.artifact import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_tensors
from sam_core.adapters.factory import open_store
from sam_core.adapters.filesystem import FileSystemAdapterStore
from sam_core.adapters.s3 import S3AdapterStore
from sam_core.adapters.store import AdapterConflict, content_sha256
from sam_core.errors import AdapterInvalid, InvalidInput, NotFound
from tests.s3_server import CREDENTIALS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def open_s3(s3_server, s3_url, tmp_path):
    """open_s3() -> a new S3AdapterStore on the test's bucket, with its own client and download cache."""
    counter = iter(range(1000))

    def make() -> S3AdapterStore:
        return S3AdapterStore(s3_url, s3_server.client(), cache_dir=tmp_path / f"cache{next(counter)}")

    return make


def _keys(store: S3AdapterStore) -> list[str]:
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def test_concurrent_publishers_get_distinct_versions(open_s3, make_artifact):
    sources = [make_artifact(seed) for seed in range(6)]
    stores = [open_s3() for _ in sources]  # separate clients and caches: as separate trainers would be
    start = threading.Barrier(len(sources))

    def publish(i: int) -> int:
        start.wait(timeout=30)
        return stores[i].publish("acme", "ships", sources[i]).version

    with ThreadPoolExecutor(len(sources)) as pool:
        versions = list(pool.map(publish, range(len(sources))))
    assert sorted(versions) == list(range(1, len(sources) + 1))
    reader = open_s3()
    listed = reader.list("acme", "ships")
    assert [v.version for v in listed] == sorted(versions) and reader.revision() == len(sources)
    assert {v.sha256 for v in listed} == {content_sha256(s) for s in sources}
    for version in listed:
        assert content_sha256(reader.resolve("acme", version.ref).path) == version.sha256


def test_promote_and_rollback_races_lose_no_update(open_s3, make_artifact):
    n = 5
    setup = open_s3()
    for seed in range(n):
        setup.publish("acme", "ships", make_artifact(seed))
    stores = [open_s3() for _ in range(n)]
    for store in stores:  # download every version first, so the race is over the index only
        for version in range(1, n + 1):
            store.path_of(store.get("acme", "ships", version))
    revision = setup.revision()
    start = threading.Barrier(n)

    def promote(i: int) -> int:
        start.wait(timeout=30)
        return stores[i].promote("acme", "ships", "prod", i + 1).version

    with ThreadPoolExecutor(n) as pool:
        assert sorted(pool.map(promote, range(n))) == list(range(1, n + 1))
    assert setup.revision() == revision + n  # every promote moved the alias: none was lost
    current = setup.resolve("acme", "ships@prod").version

    def rollback(i: int) -> int:
        start.wait(timeout=30)
        return stores[i].rollback("acme", "ships", "prod").version

    start = threading.Barrier(n - 1)
    with ThreadPoolExecutor(n - 1) as pool:
        targets = list(pool.map(rollback, range(n - 1)))
    # the n - 1 rollbacks popped n - 1 different history entries: with the current target, all n versions
    assert sorted([*targets, current]) == list(range(1, n + 1)) and len(set(targets)) == n - 1
    assert setup.revision() == revision + 2 * n - 1
    with pytest.raises(AdapterConflict):
        setup.rollback("acme", "ships", "prod")
    assert setup.resolve("acme", "ships@prod").version in targets


def test_a_reader_during_publish_only_sees_loadable_versions(open_s3, make_artifact):
    sources = [make_artifact(seed) for seed in range(4)]
    writer, reader = open_s3(), open_s3()
    done = threading.Event()
    seen: set[int] = set()
    rounds = [0]
    errors: list[BaseException] = []

    def read() -> None:
        while not done.is_set():
            try:
                for listed in reader.list("acme", "ships"):
                    version = reader.resolve("acme", listed.ref)
                    read_adapter_tensors(version.path, read_adapter_config(version.path))
                    seen.add(version.version)
                rounds[0] += 1
            except BaseException as exc:  # reported below: a reader must never fail
                errors.append(exc)
                return

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for source in sources:
            writer.publish("acme", "ships", source)
    finally:
        done.set()
        thread.join(timeout=60)
    assert errors == [] and rounds[0] > 1
    assert seen <= set(range(1, len(sources) + 1))
    assert [v.version for v in reader.list("acme", "ships")] == [1, 2, 3, 4]


_KILLED_PUBLISHER = """
import sys, time
from pathlib import Path
from sam_core.adapters.s3 import S3AdapterStore
from tests.s3_server import S3Server

url, endpoint, source, marker, cache = sys.argv[1:6]
client = S3Server(endpoint, None).client()

class StallAfterFirstFile:
    def __getattr__(self, name):
        return getattr(client, name)

    def put_object(self, **kwargs):
        result = client.put_object(**kwargs)
        if not kwargs["Key"].endswith("index.json"):
            Path(marker).write_text(kwargs["Key"])
            while True:  # killed here, one file uploaded
                time.sleep(60)
        return result

S3AdapterStore(url, StallAfterFirstFile(), cache_dir=cache).publish("acme", "ships", source)
"""


@pytest.mark.slow  # a Python child process that imports torch
def test_a_publisher_killed_mid_upload_leaves_nothing_visible(s3_server, s3_url, open_s3, make_artifact, tmp_path):
    store = open_s3()
    store.publish("acme", "boats", make_artifact(9))
    revision, marker = store.revision(), tmp_path / "uploaded"
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_PUBLISHER, s3_url, s3_server.endpoint,
                              str(make_artifact(0)), str(marker), str(tmp_path / "child-cache")], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # polling for the child's progress marker
        assert marker.exists(), f"the publisher never uploaded (exit code {child.poll()})"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert marker.read_text() in _keys(store)  # one object of the upload is in the bucket ...
    assert store.list("acme", "ships") == [] and store.revision() == revision  # ... and invisible
    with pytest.raises(NotFound):
        store.resolve("acme", "ships")
    published = store.publish("acme", "ships", make_artifact(1))
    assert published.version == 1 and store.resolve("acme", "ships") == published


def test_objects_changed_in_the_bucket_are_refused_and_a_damaged_cache_is_refetched(open_s3, make_artifact):
    writer = open_s3()
    v1, v2 = writer.publish("acme", "ships", make_artifact(0)), writer.publish("acme", "ships", make_artifact(1))
    reader = open_s3()
    path = reader.resolve("acme", "ships:1").path
    weights = path / WEIGHTS_NAME
    os.chmod(weights, 0o644)
    weights.write_bytes(weights.read_bytes()[:-4] + b"junk")  # the local copy is damaged: downloaded again
    assert content_sha256(reader.resolve("acme", "ships:1").path) == v1.sha256
    tampered = _weights_key(writer, v2)
    body = writer.client.get_object(Bucket=writer.bucket, Key=tampered)["Body"].read()
    writer.client.put_object(Bucket=writer.bucket, Key=tampered, Body=body[:-4] + b"junk")
    fresh = open_s3()
    with pytest.raises(AdapterInvalid) as err:
        fresh.resolve("acme", "ships:2")
    assert err.value.field == "adapter" and "ships:2" in str(err.value)
    with pytest.raises(AdapterInvalid):
        fresh.promote("acme", "ships", "prod", 2)  # an alias never moves to a broken version
    assert not (fresh.cache_dir / "objects" / v2.sha256).exists()
    writer.client.delete_object(Bucket=writer.bucket, Key=tampered.replace(WEIGHTS_NAME, CONFIG_NAME))
    with pytest.raises(AdapterInvalid):
        fresh.resolve("acme", "ships:2")


def _weights_key(store: S3AdapterStore, version) -> str:
    """The object key of ``version``'s weights, as recorded in the bucket's index.json."""
    index = json.loads(store.client.get_object(Bucket=store.bucket, Key=f"{store.prefix}/index.json")["Body"].read())
    location = index["tenants"][version.tenant][version.name]["versions"][str(version.version)]["location"]
    return f"{store.prefix}/{location}/{WEIGHTS_NAME}"


def test_open_store_picks_the_store_from_the_url(s3_server, s3_url, tmp_path, monkeypatch):
    assert isinstance(open_store("", tmp_path / "registry"), FileSystemAdapterStore)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    store = open_store(s3_url, tmp_path / "cache", endpoint_url=s3_server.endpoint)
    assert isinstance(store, S3AdapterStore) and store.cache_dir == tmp_path / "cache"
    assert store.revision() == 0 and store.list("acme") == []
    for bad in ("/var/registry", "gs://bucket", "s3://", "s3://bucket/a/../b"):
        with pytest.raises(InvalidInput) as err:
            open_store(bad, tmp_path)
        assert err.value.field == "registry_url"


def test_sweep_removes_only_old_unreferenced_uploads(s3_server, s3_url, open_s3, make_artifact, monkeypatch, capsys):
    from services.cli import main

    store = open_s3()
    kept = store.publish("acme", "ships", make_artifact(1))
    orphan = f"{store._key('acme', 'ships', 'uploads', 'f' * 32)}"
    for name in (CONFIG_NAME, WEIGHTS_NAME):  # what a publisher killed before its index commit leaves
        store.client.put_object(Bucket=store.bucket, Key=f"{orphan}/{name}", Body=b"partial")
    assert store.sweep_uploads(3600) == ()  # younger than the grace period: maybe still on its way
    assert store.sweep_uploads(0, dry_run=True) == ("acme/ships/uploads/" + "f" * 32,)
    assert sum(key.startswith(orphan) for key in _keys(store)) == 2
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", CREDENTIALS.get("AWS_DEFAULT_REGION", "us-east-1"))
    assert main(["registry-sweep", "--registry-url", s3_url, "--endpoint-url", s3_server.endpoint,
                 "--older-than-hours", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["orphaned_uploads"] == ["acme/ships/uploads/" + "f" * 32]
    assert not any(key.startswith(orphan) for key in _keys(store))
    reader = open_s3()
    served = reader.resolve("acme", "ships")
    assert served.version == kept.version and content_sha256(served.path) == kept.sha256
