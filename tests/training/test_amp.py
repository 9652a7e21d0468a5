"""Precision follows the hardware: the trainer's bf16 autocast and the inference dtype "auto" are
bf16 on a GPU or a CPU with AMX bf16 units, float32 on other CPUs (where bf16 matmuls are
emulated and far slower)."""

from __future__ import annotations

import pytest
import torch

import did_engine.hardware as hardware
from did_engine.training.trainer import Trainer
from support.training_data import make_dataset

from tests.training.test_train_llama import _config  # noqa: E402


def test_cpu_flag_reading_matches_proc_cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    hardware.cpu_has_amx_bf16.cache_clear()
    assert hardware.cpu_has_amx_bf16() == ("amx_bf16" in flags)


@pytest.mark.parametrize("amx", [True, False])
def test_auto_amp_is_bf16_exactly_on_amx_cpus(amx, monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "cpu_has_amx_bf16", lambda: amx)
    data = make_dataset(tmp_path / "data")
    trainer = Trainer(_config(data, tmp_path / "run", "preset:tiny", amp="auto", device="cpu"))
    assert trainer.amp_dtype == (torch.bfloat16 if amx else None)
    forced = Trainer(_config(data, tmp_path / "run2", "preset:tiny", amp="off", device="cpu"))
    assert forced.amp_dtype is None


@pytest.mark.parametrize("amx", [True, False])
def test_auto_inference_dtype_follows_the_same_rule(amx, monkeypatch):
    from did_engine.errors import UserError
    from did_engine.modeling.loading import resolve_dtype

    monkeypatch.setattr(hardware, "cpu_has_amx_bf16", lambda: amx)
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if amx else torch.float32)
    assert resolve_dtype("float32", "cpu") == torch.float32 and resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(UserError, match="dtype 'int8'"):
        resolve_dtype("int8")
