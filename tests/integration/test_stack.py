"""`samforge up --demo` end to end on the tiny model: three real service processes, the demo client
(embed, segment many prompts, fine-tune through TrainerService, promote, segment with the adapter
selected per request), then a graceful shutdown of every process."""

from __future__ import annotations

import pytest

from services.stack import run_demo_client, start_stack

pytestmark = pytest.mark.integration


def test_local_stack_demo(tmp_path):
    stack = start_stack(tmp_path / "var", model="tiny", extra_env={"SAMFORGE_THREADS": "1"})
    try:
        summary = run_demo_client(stack, epochs=1, allow_regression=True)
    finally:
        codes = stack.stop()
    assert codes == {"trainer": 0, "encoder": 0, "decoder": 0}, codes
    assert len(summary["base"]["dice"]) == 4 and len(summary["base"]["iou_scores"]) == 4
    training = summary["training"]
    assert training["adapter_version"] == 1 and training["events"] > 2 and not training["error"], training
    assert summary["adapter"]["adapter"] == "demo:1"
    assert summary["adapter"]["base_unchanged"] is True


def test_local_stack_demo_with_the_s3_adapter_store(tmp_path, s3_server, s3_url):
    """The same demo with SAMFORGE_REGISTRY_URL: the trainer publishes into the bucket, the decoder hot-loads it."""
    stack = start_stack(tmp_path / "var", model="tiny", extra_env={"SAMFORGE_THREADS": "1", **s3_server.env(s3_url)})
    try:
        summary = run_demo_client(stack, epochs=1, allow_regression=True)
    finally:
        codes = stack.stop()
    assert codes == {"trainer": 0, "encoder": 0, "decoder": 0}, codes
    assert summary["training"]["adapter_version"] == 1 and not summary["training"]["error"], summary["training"]
    assert summary["adapter"]["adapter"] == "demo:1" and summary["adapter"]["base_unchanged"] is True
    bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert f"{prefix}/index.json" in keys and any(k.endswith("adapter_model.safetensors") for k in keys)
    assert not (tmp_path / "var" / "registry" / "index.json").exists()  # the folder was only the download cache
