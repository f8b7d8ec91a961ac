import pytest
import torch

from lcpn import devices
from lcpn.devices import DeviceError, bf16_supported, resolve_device, training_note, want_bf16


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


def test_auto_falls_back_to_the_cpu_and_a_named_device_must_exist(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="--device cuda was asked for, but no CUDA GPU is available"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="MPS is not available"):
        resolve_device("mps")


def test_auto_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_finetune_on_a_cpu_says_where_it_runs_and_what_it_costs(monkeypatch):
    line = training_note(torch.device("cpu"), "finetune")
    assert "finetune mode runs on the CPU" in line
    assert "slow" in line and "13-20 s per step of 16 images on 2 cores" in line and "--mode features" in line
    assert "slow" not in training_note(torch.device("cpu"), "features")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some GPU")
    assert training_note(torch.device("cuda"), "finetune") == "finetune mode runs on cuda (Some GPU)"


def test_precision_choice():
    cpu = torch.device("cpu")
    assert want_bf16("bf16", cpu) and not want_bf16("fp32", cpu)
    assert want_bf16("auto", cpu) == bf16_supported(cpu)
    assert not bf16_supported(torch.device("meta"))
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        want_bf16("fp8", cpu)
