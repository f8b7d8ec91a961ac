import pytest
import torch

from lcpn import backbones
from lcpn.runtime import Runtime, recorded_precision


def test_a_bf16_runtime_embeds_close_to_fp32_on_the_cpu():
    embedder = backbones.Embedder(backbones.create("efficientnet-lite0", 0), 2).eval()  # pretrained
    x = torch.rand(3, 3, 32, 32)
    fp32, bf16 = Runtime(torch.device("cpu"), bf16=False), Runtime(torch.device("cpu"), bf16=True)
    a, b = fp32.run(embedder, x), bf16.run(embedder, x)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b)
    assert torch.linalg.vector_norm(a - b) < 0.05 * torch.linalg.vector_norm(a)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"precision": "bf16", "bf16": False}, "bf16"),
        ({"precision": "fp32"}, "fp32"),
        ({"bf16": True}, "bf16"),  # folders written before the precision was recorded
        ({"bf16": False}, "fp32"),
        ({}, "fp32"),
    ],
)
def test_the_recorded_precision_reads_old_and_new_backbone_folders(config, expected):
    assert recorded_precision(config) == expected
