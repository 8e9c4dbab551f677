"""The training-throughput benchmark: its FLOP count against the analytic figure of a
convolution, its MFU against hand-computed values, and one tiny end-to-end run."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from bench import throughput as bench
from vae.models.blocks import ResBlock3d

TINY = ["model.depth=2", "model.base_filters=4", "model.z_dim=8", "model.norm_groups=2", "model.broadcast_grid=4",
        "data.num_workers=0"]


def conv_forward_flops(c_in: int, c_out: int, kernel: int, out_voxels: int) -> int:
    """2 k^3 C_in C_out per output voxel: one multiply and one add per weight."""
    return 2 * kernel**3 * c_in * c_out * out_voxels


@pytest.mark.parametrize("stride, padding, out_edge", [(1, 1, 6), (2, 0, 2)])
def test_conv3d_forward_flops_are_analytic(stride, padding, out_edge):
    conv = nn.Conv3d(3, 5, 3, stride=stride, padding=padding)
    x = torch.randn(2, 3, 6, 6, 6)
    expected = conv_forward_flops(3, 5, 3, 2 * out_edge**3)
    with torch.no_grad():
        assert bench.count_flops(lambda: conv(x)) == expected


def test_conv3d_backward_adds_one_forward_per_gradient():
    """The weight's gradient costs a forward pass, the input's another (when it needs one)."""
    conv = nn.Conv3d(3, 5, 3, padding=1)
    forward = conv_forward_flops(3, 5, 3, 2 * 6**3)
    x = torch.randn(2, 3, 6, 6, 6)
    assert bench.count_flops(lambda: conv(x).sum().backward()) == 2 * forward
    x.requires_grad_(True)
    assert bench.count_flops(lambda: conv(x).sum().backward()) == 3 * forward


def test_residual_block_flops_are_its_convolutions():
    """Two 3^3 convolutions and the 1^3 skip of a width change; norms and SiLU count nothing."""
    block = ResBlock3d(4, 8, norm="group", norm_groups=4)
    voxels = 2 * 8**3
    expected = sum(conv_forward_flops(c_in, 8, k, voxels) for c_in, k in [(4, 3), (8, 3), (4, 1)])
    with torch.no_grad():
        assert bench.count_flops(lambda: block(torch.randn(2, 4, 8, 8, 8))) == expected


@pytest.mark.parametrize("device, precision, tf32, achieved, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, 395.76e12, 0.40),  # 989.4 TFLOP/s dense bf16
    ("NVIDIA H100 PCIe", "bf16", True, 378.25e12, 0.50),  # 756.5
    ("NVIDIA H200", "fp32", True, 247.35e12, 0.50),  # TF32 494.7
    ("NVIDIA A100-SXM4-80GB", "fp32", False, 9.75e12, 0.50),  # FP32 19.5
    ("NVIDIA H200 NVL", "bf16", True, 83.55e12, 0.10),  # 835.5, not the SXM H200's figure
])
def test_mfu_against_hand_computed_values(device, precision, tf32, achieved, expected):
    assert bench.mfu(achieved, device, precision, tf32) == pytest.approx(expected)


def test_mfu_of_an_unknown_device_is_none():
    assert bench.mfu(1e12, "AMD EPYC", "fp32", True) is None


@pytest.mark.parametrize("text, setting", [
    ("fp32", bench.Setting()),
    ("bf16+cl+compile", bench.Setting("bf16", True, True)),
    ("cl", bench.Setting("fp32", True, False)),
])
def test_setting_parses_and_labels(text, setting):
    assert bench.Setting.parse(text) == setting
    assert bench.Setting.parse(setting.label) == setting


@pytest.mark.parametrize("text", ["bf16+fp16", "fp32+bf16", "bf16+"])
def test_bad_setting_is_refused(text):
    with pytest.raises(ValueError, match="setting"):
        bench.Setting.parse(text)


def test_main_runs_end_to_end(tmp_path):
    code = bench.main([
        "--device", "cpu", "--sizes", "16", "--batch", "2", "--steps", "1", "--threads", "1",
        "--variants", "sbd-input", "--settings", "cl", "--overrides", *TINY,
        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path),
    ])
    assert code == 0
    result = json.loads((tmp_path / "throughput.json").read_text())
    assert {"date", "command", "machine", "device", "batch", "steps", "loaders", "rows"} <= set(result)
    assert [(r["variant"], r["size"], r["setting"], r["status"]) for r in result["rows"]] == [
        ("sbd-input", 16, "fp32", "ok"), ("sbd-input", 16, "fp32+cl", "ok"),
    ]
    for row in result["rows"]:
        for key in ("flops_per_volume", "median_step_s", "volumes_per_s", "achieved_flops_per_s", "peak_memory_bytes"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["mfu"] is None  # no GPU peak on a CPU
        assert row["volumes_per_s"] == pytest.approx(2 / row["median_step_s"])
    fp32, channels_last = result["rows"]
    assert fp32["flops_per_volume"] == channels_last["flops_per_volume"]  # the memory format changes no FLOP
    assert result["loaders"][0]["size"] == 16 and result["loaders"][0]["volumes_per_s"] > 0
    section = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- bench/throughput.py -->" in section and "| sbd-input | 16^3 | fp32+cl |" in section


def test_bad_override_exits_2_with_one_line(tmp_path, capsys):
    code = bench.main(["--device", "cpu", "--sizes", "16", "--overrides", "model.z_dimm=3", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "z_dimm" in err
    assert not (tmp_path / "throughput.json").exists()
