"""The AdapterStore suite: versions, aliases, atomic publish, verification, tenancy, locking, watch.

The ``store`` fixture runs every contract test against both stores, the file-system store and the S3 store
on a real S3 API server (moto); tests of one store's own mechanics (fsync, flock, the on-disk verification
cache) use ``fs_store``. The S3 store's concurrency and crash tests are in test_adapter_store_s3.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from sam_core.adapters.artifact import CONFIG_NAME, WEIGHTS_NAME
from sam_core.adapters.filesystem import FileSystemAdapterStore
from sam_core.adapters.s3 import S3AdapterStore
from sam_core.adapters.store import AdapterConflict, AdapterRef, AdapterStore, content_sha256
from sam_core.errors import AdapterInvalid, InvalidInput, NotFound


@pytest.fixture()
def fs_store(tmp_path) -> FileSystemAdapterStore:
    return FileSystemAdapterStore(tmp_path / "registry")


@pytest.fixture(params=["filesystem", "s3"])
def store(request, tmp_path) -> AdapterStore:
    if request.param == "filesystem":
        return FileSystemAdapterStore(tmp_path / "registry")
    server = request.getfixturevalue("s3_server")
    return S3AdapterStore(request.getfixturevalue("s3_url"), server.client(), cache_dir=tmp_path / "s3-cache")


def _published(store: AdapterStore, make_artifact, n: int, tenant: str = "acme", name: str = "ships"):
    return [store.publish(tenant, name, make_artifact(seed)) for seed in range(n)]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _stored(store: AdapterStore) -> list[str]:
    """Everything the store keeps: the files under its root, or the object keys in its bucket."""
    if isinstance(store, FileSystemAdapterStore):
        return _tree(store.root)
    assert isinstance(store, S3AdapterStore)
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []))


# ---------------------------------------------------------------------------------------------- names


def test_path_traversal_never_reaches_the_file_system(store, make_artifact, tmp_path):
    source = make_artifact()
    for tenant, name in (("../x", "ships"), ("acme", "../x"), ("acme", "a/b"), (".hidden", "ships"), ("acme", "")):
        with pytest.raises(InvalidInput):
            store.publish(tenant, name, source)
    for call in (lambda: store.resolve("..", "ships"), lambda: store.resolve("acme", "../../etc"),
                 lambda: store.list("a/b"), lambda: store.get("acme", "..", 1),
                 lambda: store.promote("acme", "ships", "../prod", 1), lambda: store.delete("acme", "/abs", 1)):
        with pytest.raises(InvalidInput):
            call()
    assert not (tmp_path / "x").exists()
    assert [p for p in _stored(store) if not p.startswith(".")] == []


# ---------------------------------------------------------------------------------------------- versions


def test_publish_resolve_latest_version_and_metadata(store, make_artifact):
    assert isinstance(store, AdapterStore)
    assert store.revision() == 0 and store.list("acme") == []
    v1, v2 = _published(store, make_artifact, 2)
    assert (v1.version, v2.version) == (1, 2) and v1.sha256 != v2.sha256
    assert v1.tenant == "acme" and v1.name == "ships" and v1.method == "decoder" and v1.shares_base_embeddings
    assert v1.metrics == {"val_dice": 0.5} and v1.n_parameters > 0 and v1.aliases == () and v1.parent is None
    assert v1.created_at.endswith("+00:00")
    assert store.resolve("acme", "ships") == v2
    assert store.resolve("acme", "ships:1") == v1 == store.get("acme", "ships", 1)
    assert store.resolve("acme", AdapterRef("ships", version=2)) == v2
    assert store.list("acme") == [v1, v2] == store.list("acme", "ships")
    assert store.list("acme", "boats") == []
    path = store.path_of(v1)
    assert path == v1.path
    if isinstance(store, FileSystemAdapterStore):
        assert path == store.root / "acme" / "ships" / "v1"
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert content_sha256(path) == v1.sha256
    assert {v1, v2} == {v1, v2}  # hashable (e.g. as an LRU key)
    with pytest.raises(NotFound) as err:
        store.resolve("acme", "ships:3")
    assert err.value.field == "adapter"


def test_parent_is_recorded_as_a_pinned_version(store, make_artifact):
    v1 = store.publish("acme", "ships", make_artifact(0))
    store.promote("acme", "ships", "prod", 1)
    v2 = store.publish("acme", "ships", make_artifact(1), parent="ships@prod")
    assert v2.parent == v1.ref == "ships:1"
    with pytest.raises(NotFound) as err:
        store.publish("acme", "ships", make_artifact(2), parent="ships:9")
    assert err.value.field == "parent"
    assert [v.version for v in store.list("acme")] == [1, 2]


def test_publishing_never_rewrites_earlier_versions(store, make_artifact):
    v1 = store.publish("acme", "ships", make_artifact(0))
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in v1.path.iterdir()}
    revision = store.revision()
    v2 = store.publish("acme", "ships", make_artifact(1))
    assert store.revision() > revision
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in v1.path.iterdir()} == files
    assert store.get("acme", "ships", 1) == v1 and v2.path != v1.path
    # version numbers are never reused, even after a delete
    store.delete("acme", "ships", 2)
    assert store.publish("acme", "ships", make_artifact(2)).version == 3
    assert [v.version for v in store.list("acme")] == [1, 3]


# ---------------------------------------------------------------------------------------------- aliases


def test_promote_and_rollback_move_the_alias(store, make_artifact):
    v1, v2, v3 = _published(store, make_artifact, 3)
    with pytest.raises(NotFound):
        store.resolve("acme", "ships@prod")
    revisions = [store.revision()]
    for version in (1, 2, 3):
        promoted = store.promote("acme", "ships", "prod", version)
        assert promoted.version == version and promoted.aliases == ("prod",)
        assert store.resolve("acme", "ships@prod").version == version
        revisions.append(store.revision())
    assert revisions == sorted(set(revisions))  # strictly increasing
    assert store.promote("acme", "ships", "prod", 3).version == 3  # no-op: no history entry, no revision bump
    assert store.revision() == revisions[-1]
    assert store.get("acme", "ships", 3).aliases == ("prod",) and store.get("acme", "ships", 2).aliases == ()
    assert store.rollback("acme", "ships", "prod").version == 2
    assert store.resolve("acme", "ships@prod") == store.get("acme", "ships", 2)
    assert store.rollback("acme", "ships", "prod").version == 1  # twice walks the history
    assert store.resolve("acme", "ships@prod").sha256 == v1.sha256
    with pytest.raises(AdapterConflict) as err:
        store.rollback("acme", "ships", "prod")
    assert isinstance(err.value, AdapterInvalid) and err.value.field == "alias"
    assert store.resolve("acme", "ships@prod").version == 1
    with pytest.raises(NotFound):
        store.rollback("acme", "ships", "staging")
    with pytest.raises(NotFound):
        store.promote("acme", "ships", "prod", 7)
    assert store.resolve("acme", "ships").version == 3  # latest is unaffected by aliases


def test_delete_is_refused_while_aliased(store, make_artifact):
    _published(store, make_artifact, 2)
    store.promote("acme", "ships", "prod", 1)
    store.promote("acme", "ships", "canary", 1)
    with pytest.raises(AdapterConflict) as err:
        store.delete("acme", "ships", 1)
    assert "ships@canary" in str(err.value) and "ships@prod" in str(err.value)
    store.promote("acme", "ships", "prod", 2)
    store.promote("acme", "ships", "canary", 2)
    revision = store.revision()
    store.delete("acme", "ships", 1)
    assert store.revision() == revision + 1
    assert [v.version for v in store.list("acme")] == [2]
    assert len([p for p in _stored(store) if p.endswith(WEIGHTS_NAME)]) == 1  # the files of v1 are gone
    with pytest.raises(NotFound):
        store.resolve("acme", "ships:1")
    with pytest.raises(NotFound):
        store.delete("acme", "ships", 1)
    with pytest.raises(AdapterConflict):  # the deleted version left the alias history
        store.rollback("acme", "ships", "prod")


# ---------------------------------------------------------------------------------------------- integrity


def _corrupt_weights(folder: Path) -> None:
    weights = folder / WEIGHTS_NAME
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["weights_bytes", "weights_missing", "config_json", "config_keys", "truncated"])
def test_corrupt_source_artifact_is_refused_and_nothing_is_visible(store, make_artifact, damage):
    store.publish("acme", "boats", make_artifact(9))
    before_tree, before_revision = _stored(store), store.revision()
    source = make_artifact(0)
    if damage == "weights_bytes":
        _corrupt_weights(source)
    elif damage == "weights_missing":
        (source / WEIGHTS_NAME).unlink()
    elif damage == "config_json":
        (source / CONFIG_NAME).write_text("{not json")
    elif damage == "config_keys":
        config = json.loads((source / CONFIG_NAME).read_text())
        del config["weights_sha256"]
        (source / CONFIG_NAME).write_text(json.dumps(config))
    else:
        weights = source / WEIGHTS_NAME
        weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterInvalid):
        store.publish("acme", "ships", source)
    assert store.list("acme", "ships") == [] and store.revision() == before_revision
    assert _stored(store) == before_tree
    with pytest.raises(NotFound):
        store.resolve("acme", "ships")
    with pytest.raises(NotFound):
        store.publish("acme", "ships", source.parent / "does-not-exist")


def test_version_changed_on_disk_is_refused_at_resolve(fs_store, make_artifact):
    v1, v2, v3 = _published(fs_store, make_artifact, 3)
    fs_store.resolve("acme", "ships:1")
    _corrupt_weights(v1.path)
    with pytest.raises(AdapterInvalid) as err:
        fs_store.resolve("acme", "ships:1")
    assert err.value.field == "adapter" and "ships:1" in str(err.value)
    with pytest.raises(AdapterInvalid):
        fs_store.promote("acme", "ships", "prod", 1)  # an alias never moves to a broken version
    (v2.path / "extra.txt").write_text("not part of the artifact")
    with pytest.raises(AdapterInvalid):
        fs_store.resolve("acme", "ships:2")
    os.chmod(v3.path / CONFIG_NAME, 0o644)
    (v3.path / CONFIG_NAME).unlink()
    with pytest.raises(AdapterInvalid):
        fs_store.resolve("acme", "ships")


def test_verification_is_cached_until_the_files_change(fs_store, make_artifact, monkeypatch):
    import sam_core.adapters.filesystem as filesystem

    v1 = fs_store.publish("acme", "ships", make_artifact(0))
    monkeypatch.setattr(filesystem, "_RACY_SECONDS", 0.0)  # trust stat signatures at once (normally after 2 s)
    fs_store.resolve("acme", "ships:1")
    real, calls = filesystem.content_sha256, []
    monkeypatch.setattr(filesystem, "content_sha256", lambda folder: calls.append(folder) or real(folder))
    assert fs_store.resolve("acme", "ships:1") == v1 and calls == []  # served from the verification cache
    weights = v1.path / WEIGHTS_NAME
    os.chmod(weights, 0o644)
    with open(weights, "ab") as handle:
        handle.write(b"tail")
    with pytest.raises(AdapterInvalid):
        fs_store.resolve("acme", "ships:1")
    assert calls == [v1.path]


def test_publish_fsyncs_files_folders_and_index(fs_store, make_artifact, fsynced):
    source = make_artifact(0)
    fs_store.publish("acme", "boats", make_artifact(1))  # the root, the lock and the staging area exist
    fsynced.clear()
    synced = fsynced
    v1 = fs_store.publish("acme", "ships", source)
    root = fs_store.root.resolve()
    staged = [Path(p) for p in synced if Path(p).parent.parent == root / ".staging"]
    assert sorted(p.name for p in staged) == [CONFIG_NAME, WEIGHTS_NAME]  # the copies, before the rename
    assert str(staged[0].parent) in synced  # the staged folder itself
    assert str(v1.path.parent.resolve()) in synced  # the rename into acme/ships/
    index_temp = next(i for i, p in enumerate(synced) if Path(p).name.startswith(".index.json."))
    assert synced[index_temp + 1] == str(root)  # the index replacement, then its folder


def test_orphan_of_a_crashed_publish_is_replaced(fs_store, make_artifact):
    fs_store.publish("acme", "ships", make_artifact(0))
    orphan = fs_store.root / "acme" / "ships" / "v2"  # renamed in, but the index was never written
    orphan.mkdir()
    (orphan / WEIGHTS_NAME).write_bytes(b"half")
    with pytest.raises(NotFound):
        fs_store.resolve("acme", "ships:2")
    v2 = fs_store.publish("acme", "ships", make_artifact(1))
    assert v2.version == 2 and fs_store.resolve("acme", "ships:2") == v2
    assert sorted(p.name for p in v2.path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


# ---------------------------------------------------------------------------------------------- tenancy


def test_tenants_are_isolated(store, make_artifact):
    a = store.publish("tenant-a", "ships", make_artifact(0))
    store.promote("tenant-a", "ships", "prod", 1)
    assert store.list("tenant-b") == [] and store.list("tenant-b", "ships") == []
    for call in (lambda t: store.resolve(t, "ships"), lambda t: store.resolve(t, "ships@prod"),
                 lambda t: store.get(t, "ships", 1), lambda t: store.delete(t, "ships", 1),
                 lambda t: store.promote(t, "ships", "prod", 1), lambda t: store.rollback(t, "ships", "prod")):
        with pytest.raises(NotFound) as b_err:
            call("tenant-b")
        with pytest.raises(NotFound) as c_err:
            call("tenant-c")  # a tenant that never published: the answer must be indistinguishable
        assert str(b_err.value) == str(c_err.value) and "tenant-a" not in str(b_err.value)
    b = store.publish("tenant-b", "ships", make_artifact(1))
    assert b.version == 1 and b.path != a.path
    assert store.resolve("tenant-a", "ships") == store.get("tenant-a", "ships", 1)
    assert store.resolve("tenant-a", "ships").sha256 == a.sha256 != b.sha256
    assert [v.tenant for v in store.list("tenant-b")] == ["tenant-b"]


# ---------------------------------------------------------------------------------------------- processes, watch


def _publish_in_process(root: str, source: str, ready, results) -> None:
    try:
        ready.wait(120)  # both children have finished importing: publish at the same moment
        results.put(FileSystemAdapterStore(root).publish("acme", "ships", source).version)
    except BaseException as exc:  # report, do not hang the parent
        results.put(repr(exc))


@pytest.mark.slow  # two spawned interpreters import torch + torchvision (~4-5 s CPU each)
def test_concurrent_publish_from_two_processes(fs_store, make_artifact):
    sources = [make_artifact(0), make_artifact(1)]
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Barrier(len(sources)), ctx.Queue()
    procs = [ctx.Process(target=_publish_in_process, args=(str(fs_store.root), str(s), ready, results))
             for s in sources]
    try:
        for proc in procs:
            proc.start()
        got = sorted((results.get(timeout=120) for _ in procs), key=str)
        for proc in procs:
            proc.join(timeout=30)
            assert proc.exitcode == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
    assert got == [1, 2]
    versions = fs_store.list("acme", "ships")
    assert [v.version for v in versions] == [1, 2] and fs_store.revision() == 2
    assert {v.sha256 for v in versions} == {content_sha256(s) for s in sources}
    for v in versions:
        assert fs_store.resolve("acme", v.ref) == v
    assert list((fs_store.root / ".staging").iterdir()) == []
    assert sorted(p.name for p in (fs_store.root / "acme" / "ships").iterdir()) == ["v1", "v2"]


def test_watch_fires_after_a_promote(store, make_artifact):
    _published(store, make_artifact, 2)
    seen: list[int] = []
    fired = threading.Event()

    def callback(revision: int) -> None:
        seen.append(revision)
        fired.set()

    stop = store.watch(callback, interval=0.02)
    try:
        store.promote("acme", "ships", "prod", 2)
        assert fired.wait(timeout=5)
        assert seen[-1] == store.revision()
    finally:
        stop()
        stop()  # idempotent
    with pytest.raises(InvalidInput):
        store.watch(callback, interval=0)
