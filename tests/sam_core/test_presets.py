"""Hardware presets as a pure function of a described machine (no GPU needed), and explicit values winning."""

from __future__ import annotations

import pytest

from sam_core.errors import InvalidInput
from sam_core.training.presets import Machine, Preset, choose_preset, override

TWO_CORE_AVX2 = Machine(cuda_devices=0, cpu_cores=2, cpu_capability="AVX2", cpu_bf16=False)
ONE_GPU = Machine(cuda_devices=1, cpu_cores=8, cpu_capability="AVX512", cpu_bf16=False, gpu_bf16=True)
FOUR_GPUS = Machine(cuda_devices=4, cpu_cores=32, cpu_capability="AVX512", cpu_bf16=True, gpu_bf16=True)


def test_a_two_core_avx2_cpu_gets_the_cpu_preset_in_fp32():
    preset = choose_preset(TWO_CORE_AVX2)
    assert preset == Preset("cpu", batch_size=4, bf16=False, threads=2, processes=1)
    assert preset.describe() == "preset cpu: batch 4, fp32, 2 threads, 1 process, no DDP"
    assert choose_preset(Machine(0, 2, "AVX512", cpu_bf16=True)).bf16  # AMX / AVX512-BF16 computes bf16 natively


def test_one_gpu_gets_the_gpu_preset_with_bf16():
    preset = choose_preset(ONE_GPU)
    assert preset == Preset("gpu", batch_size=8, bf16=True, threads=8, processes=1, grad_checkpoint=True)
    assert not preset.ddp and not choose_preset(Machine(1, 8, "AVX2", False, gpu_bf16=False)).bf16


def test_four_gpus_get_ddp_over_four_processes():
    preset = choose_preset(FOUR_GPUS)
    assert preset == Preset("multi-gpu", batch_size=8, bf16=True, threads=8, processes=4, grad_checkpoint=True)
    assert preset.ddp and preset.global_batch == 32
    assert preset.describe() == ("preset multi-gpu: batch 32, bf16 autocast, 8 threads, DDP over 4 processes, "
                                 "gradient checkpointing")
    assert not override(preset, grad_checkpoint=False).grad_checkpoint  # an explicit flag wins


def test_a_named_preset_overrides_the_choice_but_needs_its_hardware():
    assert choose_preset(FOUR_GPUS, "gpu").processes == 1
    assert choose_preset(ONE_GPU, "cpu") == Preset("cpu", batch_size=4, bf16=False, threads=8, processes=1)
    for name, machine in (("gpu", TWO_CORE_AVX2), ("multi-gpu", TWO_CORE_AVX2), ("tpu", ONE_GPU)):
        with pytest.raises(InvalidInput) as info:
            choose_preset(machine, name)
        assert info.value.field == "preset"


def test_explicit_values_override_the_preset():
    preset = choose_preset(FOUR_GPUS)
    assert override(preset) == preset
    changed = override(preset, batch_size=8, bf16=False, threads=2)
    assert (changed.global_batch, changed.batch_size, changed.bf16, changed.threads) == (8, 2, False, 2)
    with pytest.raises(InvalidInput) as info:
        override(preset, batch_size=6)  # does not split over 4 processes
    assert info.value.field == "batch_size"


def test_detect_describes_this_machine():
    machine = Machine.detect()
    assert machine.cpu_cores >= 1 and machine.cuda_devices >= 0 and machine.cpu_capability
    assert choose_preset(machine).name in ("cpu", "gpu", "multi-gpu")
