"""``benchmarks/reproduction_check.py``'s weight comparison on generated weight files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reproduction_check import weight_difference  # noqa: E402


def test_weight_difference_reports_bitwise_equality_and_the_largest_difference(tmp_path: Path) -> None:
    a = {"w": torch.tensor([1.0, -2.0, 3.0]), "b": torch.tensor([0.5])}
    save_file(a, tmp_path / "a.safetensors")
    save_file({k: v.clone() for k, v in a.items()}, tmp_path / "same.safetensors")
    save_file({"w": torch.tensor([1.0, -2.25, 3.0]), "b": torch.tensor([0.5])}, tmp_path / "other.safetensors")
    same = weight_difference(str(tmp_path / "a.safetensors"), str(tmp_path / "same.safetensors"))
    assert same == {"bitwise_equal": True, "max_abs_diff": 0.0, "max_abs_value": 3.0}
    other = weight_difference(str(tmp_path / "a.safetensors"), str(tmp_path / "other.safetensors"))
    assert other["bitwise_equal"] is False and other["max_abs_diff"] == 0.25


def test_weight_difference_refuses_files_with_other_tensors(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(3)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(4)}, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="hold different tensors"):
        weight_difference(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
