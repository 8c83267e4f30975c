"""Adapter store contract: tenant / adapter / alias names, adapter references, the polling watch."""

from __future__ import annotations

import threading

import pytest

from sam_core.adapters.store import AdapterRef, validate_name, watch_revision
from sam_core.errors import InvalidInput

# ---------------------------------------------------------------------------------------------- names, refs


@pytest.mark.parametrize("value", ["ships", "a", "x" * 63, "ships-v2.1_b", "0abc"])
def test_valid_names(value):
    assert validate_name("name", value) == value


@pytest.mark.parametrize("value", ["../x", "..", "a/b", ".hidden", "", "x" * 64, "x" * 100, "schiffé", "Ships",
                                   "a..b", "-a", "a b", "a\n", "a\x00", "\u212aelvin", None, 3])
@pytest.mark.parametrize("kind", ["tenant", "name", "alias"])
def test_invalid_names_are_refused_with_the_field(kind, value):
    with pytest.raises(InvalidInput) as err:
        validate_name(kind, value)
    assert err.value.field == kind


def test_index_json_is_not_a_tenant():
    with pytest.raises(InvalidInput):
        validate_name("tenant", "index.json")


def test_parse_refs():
    assert AdapterRef.parse("ships") == AdapterRef("ships", None, None)
    assert AdapterRef.parse("ships:3") == AdapterRef("ships", 3, None)
    assert AdapterRef.parse("ships@prod") == AdapterRef("ships", None, "prod")
    for text in ("ships", "ships:3", "ships@prod"):
        assert str(AdapterRef.parse(text)) == text


@pytest.mark.parametrize("text", ["", "ships:", "ships:0", "ships:-1", "ships:x", "ships:03", "ships@", "@prod",
                                  ":3", "ships:3@prod", "ships@prod:3", "ships@a@b", "../x:1", "a/b@prod", None])
def test_bad_refs_are_invalid_input_on_adapter(text):
    with pytest.raises(InvalidInput) as err:
        AdapterRef.parse(text)
    assert err.value.field == "adapter"


# ---------------------------------------------------------------------------------------------- watch


def test_watch_revision_calls_back_on_change_and_survives_errors() -> None:
    revisions = iter([0, 0, 1, 1])
    seen: list[int] = []
    changed = threading.Event()

    def revision() -> int:
        value = next(revisions, None)
        if value is None:
            raise OSError("index unreadable")  # logged, the watch goes on
        return value

    def callback(current: int) -> None:
        seen.append(current)
        changed.set()

    stop = watch_revision(revision, callback, interval=0.01, label="test store")
    try:
        assert changed.wait(timeout=5)
    finally:
        stop()
        stop()  # idempotent
    assert seen == [1]
    with pytest.raises(InvalidInput) as err:
        watch_revision(revision, callback, interval=0, label="test store")
    assert err.value.field == "interval"
