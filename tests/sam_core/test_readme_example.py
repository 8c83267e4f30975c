"""The README's library example runs as written (on a generated scan.png) and its shape comments hold."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[2] / "README.md"


def library_example() -> str:
    section = README.read_text().split("## Library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_library_example_runs(tmp_path, monkeypatch):
    image = np.zeros((160, 200, 3), np.uint8)
    image[30:110, 20:100] = 200  # a bright square inside the example's box prompt
    Image.fromarray(image).save(tmp_path / "scan.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(library_example(), str(README), "exec"), scope)
    result = scope["result"]
    assert result.masks.shape == (2, 1, 160, 200) and result.masks.dtype == bool
    assert result.iou_scores.shape == (2, 1)
    assert result.low_res_logits.shape == (2, 1, 256, 256)
    assert result.masks[0, 0, 60, 60]  # the box prompt finds the square
