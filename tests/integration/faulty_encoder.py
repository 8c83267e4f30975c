"""``python -m tests.integration.faulty_encoder``: the real encoder service with two injected faults, for
failure-isolation tests (test doubles for a failure, nothing else is replaced):

- resizing an image of exactly :data:`BAD_RESIZE_SIZE` pixels raises (a preprocessing fault);
- an encoder call whose batch holds the all-:data:`POISON` image of :data:`POISON_SIZE` raises (an encoder fault).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from sam_core.inference.predictor import Predictor
from sam_core.modeling import preprocess
from sam_core.modeling.family import Features, ModelSpec
from services.common.server import exit_now

BAD_RESIZE_SIZE = (77, 99)
POISON = 7
POISON_SIZE = (48, 64)


def install() -> None:
    real_shape = preprocess.resized_shape
    real_encode = Predictor.encode_tensor

    def resized_shape(original_size: tuple[int, int], img_size: int) -> tuple[int, int]:
        if tuple(original_size) == BAD_RESIZE_SIZE:
            raise ValueError("injected preprocessing fault")
        return real_shape(original_size, img_size)

    @functools.cache
    def poisoned_row(spec: ModelSpec) -> torch.Tensor:
        return preprocess.preprocess(np.full((*POISON_SIZE, 3), POISON, np.uint8), spec)[0][0]

    def encode_tensor(self: Predictor, batch: torch.Tensor) -> Features:
        if any(torch.equal(row, poisoned_row(self.spec)) for row in batch):
            raise RuntimeError("injected encoder fault")
        return real_encode(self, batch)

    preprocess.resized_shape = resized_shape  # type: ignore[assignment]
    Predictor.encode_tensor = encode_tensor  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    from services.encoder.__main__ import main

    exit_now(main())
