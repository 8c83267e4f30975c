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
        summary = run_demo_client(stack, epochs=1)
    finally:
        codes = stack.stop()
    assert codes == {"trainer": 0, "encoder": 0, "decoder": 0}, codes
    assert len(summary["base"]["dice"]) == 4 and len(summary["base"]["iou_scores"]) == 4
    training = summary["training"]
    assert training["adapter_version"] == 1 and training["events"] > 2 and not training["error"], training
    assert summary["adapter"]["adapter"] == "demo:1"
    assert summary["adapter"]["base_unchanged"] is True
