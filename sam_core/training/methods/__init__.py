"""Fine-tuning methods as plug-ins: one module per method behind a registry (see :mod:`.base`).

Like segment-anything's model registry, the table below is the one place that names them; it registers
them in the order CLIs offer them.
"""

from sam_core.training.methods.adapter import AdapterMethod
from sam_core.training.methods.base import (
    DEFAULT_METHOD,
    FineTuningMethod,
    MethodConfig,
    get_method,
    method_names,
    register,
    train_mode,
    trainable_names,
    trainable_state,
)
from sam_core.training.methods.decoder import DecoderMethod
from sam_core.training.methods.full import FullMethod
from sam_core.training.methods.lora import LoraMethod
from sam_core.training.methods.persam import PersamMethod

for _plugin in (DecoderMethod(), LoraMethod(), AdapterMethod(), FullMethod(), PersamMethod()):
    register(_plugin)

__all__ = [
    "DEFAULT_METHOD",
    "FineTuningMethod",
    "MethodConfig",
    "get_method",
    "method_names",
    "train_mode",
    "trainable_names",
    "trainable_state",
]
