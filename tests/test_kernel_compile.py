"""Every in-place step kernel compiles for a Hopper GPU (``sm_90``) with the installed Triton,
and its ``use_dot=False`` variant stays fp32 sums.

The other kernel tests run in the Triton interpreter, which compiles nothing: a kernel the
compiler rejects, or a launcher that only works in the interpreter, passes them all. Triton's
wheel ships ``ptxas``, so ``benchmarks/kernel_resources.py`` compiles the kernels here without a
GPU (in a subprocess: this process imported them in interpreter mode). On an H200 (2026-12-04) the
sum variants had been rewritten by Triton into TF32 ``tl.dot`` products, 1e-4 to 1e-3 off the
fp32 reference; the ``tt.dot`` count in Triton's IR catches that here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from learnedopt import LSTMOptimizer

pytest.importorskip("triton", reason="the fused kernels need Triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("kernel_resources")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "triton_cache")
    proc = subprocess.run(
        [
            sys.executable,
            "kernel_resources.py",
            "--defaults",
            "--no-differentiable",
            "--results-dir",
            str(out),
        ],
        cwd=ROOT / "benchmarks",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = out / "kernel_resources.json"
    if not results.exists():
        pytest.fail(f"kernel_resources.py wrote nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"rc": proc.returncode, **json.loads(results.read_text())}


def test_every_step_kernel_compiles_for_sm90(compiled: dict) -> None:
    assert compiled["failures"] == [], compiled["failures"]
    assert compiled["rc"] == 0
    seen = {(r["rule"], r["kernel"], r["use_dot"]) for r in compiled["rows"]}
    expected = {
        (rule, kernel, use_dot)
        for rule, kernel in (
            ("l2l-2016", "coordinate_lstm_step_kernel"),
            (LSTMOptimizer.default_preset, "coordinate_lstm_step_kernel"),  # momentum and rms inputs
            ("meta-lstm", "meta_lstm_step_kernel"),
        )
        for use_dot in (True, False)
    }
    assert seen == expected
    for r in compiled["rows"]:
        assert 0 < r["reg"] <= 255, r


def test_sum_variants_have_no_matrix_products(compiled: dict) -> None:
    for r in compiled["rows"]:
        if r["use_dot"]:
            assert r["ttir_dots"] > 0, r  # the count does see products where there are some
        else:
            assert r["ttir_dots"] == 0, f"Triton turned the fp32 sums into tl.dot: {r}"
