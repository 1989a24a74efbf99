"""Compile every fused Triton kernel for an NVIDIA GPU on a machine without one, and report what
each launch configuration costs in registers, spilled stack and shared memory.

Triton compiles a kernel to PTX and then, with the ``ptxas`` its wheel ships, to a cubin; none
of that needs a GPU, only a target. This script installs a compile-only driver (target
``cuda:<arch>``, default 90 = Hopper), launches each kernel through its public launcher on small
CPU tensors with launches turned into compilations (``warmup``), and reads each cubin's resource
usage with the wheel's ``cuobjdump -res-usage``. A nonzero ``STACK`` means the compiler spilled
registers to local memory: that configuration moves more bytes than the kernel's minimum and is
a poor default on the GPU. A kernel that does not compile for the target is reported (and the
exit status is 1): the interpreter, which runs every CI test, never compiles anything.

Rows: the in-place optimizer steps (``coordinate_lstm_step_kernel`` for the paper's rule,
``l2l-2016``, and the default preset's rule with its momentum and rms inputs, ``l2l-random``;
``meta_lstm_step_kernel``), each at every ``--blocks`` x ``--warps`` x dot/sum choice, and the
differentiable pairs of meta-training (forward and backward kernels of the three rules) at the
launchers' defaults (a backward kernel takes about a minute to compile on two CPU cores).

    python benchmarks/kernel_resources.py [--arch 90] [--blocks 32 64 128] [--warps 2 4 8]
    python benchmarks/kernel_resources.py --defaults   # the launchers' defaults only (a check)
"""

from __future__ import annotations

import os

# Must precede any import of triton (learnedopt imports its kernels): compiled, not interpreted.
if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
    raise SystemExit("kernel_resources.py compiles kernels: unset TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import inspect  # noqa: E402
import itertools  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

import common  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from common import Distinct, positive_int, power_of_two, results_dir, write_results  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from learnedopt import LSTMOptimizer  # noqa: E402
from learnedopt.kernels import (  # noqa: E402
    coordinate_lstm_backward,
    coordinate_lstm_step,
    meta_lstm_backward,
    meta_lstm_step,
)
from learnedopt.nn import CoordinateLSTM, MetaLSTMCell  # noqa: E402
from learnedopt.weights import build_preset  # noqa: E402

#: What the differentiable launchers run with :class:`KernelOptions` defaults on a GPU.
DEFAULT_OPTIONS = {"use_dot": True, "block": "64 fwd / 32 bwd", "num_warps": 4}
KERNEL_MODULES = (coordinate_lstm_step, coordinate_lstm_backward, meta_lstm_step, meta_lstm_backward)


class CompileOnlyDriver:
    """The part of a Triton driver that compiling needs: a device index, a stream and a target."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def install_compile_only(arch: int) -> list[tuple[str, object]]:
    """Make every kernel launch compile for ``sm_<arch>`` instead of running; returns the list
    that each launch appends ``(kernel name, compiled kernel)`` to."""
    compiled: list[tuple[str, object]] = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    driver.set_active(CompileOnlyDriver(arch))
    JITFunction.run = compile_only
    # The launchers refuse CPU tensors outside the interpreter; here nothing runs on them.
    for module in KERNEL_MODULES:
        module.check_launch_device = lambda tensors, **_: next(iter(tensors.values())).device
    return compiled


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED`` (static; bytes) and ``LOCAL`` of a one-kernel cubin."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def coordinate_launches(
    preset: str, grid: list[tuple[bool, int, int]], differentiable: bool
) -> Iterator[tuple[dict, Callable[[], object]]]:
    """The rule's in-place step kernel at each ``(use_dot, block, num_warps)`` of ``grid``, then,
    with ``differentiable``, its forward and backward kernels at the launchers' defaults."""
    rule: CoordinateLSTM = build_preset(preset)[0]  # its weights do not matter here, its shapes do
    cfg = rule.config
    L, H, K, n = cfg.num_layers, cfg.hidden_size, cfg.num_inputs, 256
    weights = coordinate_lstm_step.rule_weights(rule)
    step_inputs = coordinate_lstm_step.feature_count(
        cfg.momentum_decays, cfg.rms_decays, cfg.param_input
    )
    packed_step = coordinate_lstm_step.pack_weights(
        weights, num_layers=L, hidden_size=H, num_inputs=step_inputs
    )
    g, p = torch.randn(n), torch.randn(n)
    h, c = torch.randn(L, n, H), torch.randn(L, n, H)
    moments = {
        name: torch.rand(len(decays), n)
        for name, decays in (("m", cfg.momentum_decays), ("v", cfg.rms_decays))
        if decays
    }
    for use_dot, block, num_warps in grid:
        config = {"rule": preset, "use_dot": use_dot, "block": block, "num_warps": num_warps}
        yield config, lambda: coordinate_lstm_step.coordinate_lstm_step_(
            g, p, p, h, c, packed_step, num_layers=L, hidden_size=H,
            preprocess_p=cfg.preprocess_p, output_scale=cfg.output_scale, lr=1e-3,
            maximize=False, momentum_decays=cfg.momentum_decays, rms_decays=cfg.rms_decays,
            param_input=cfg.param_input, **moments, use_dot=use_dot, block=block,
            num_warps=num_warps,
        )  # fmt: skip
    if not differentiable:
        return
    packed = coordinate_lstm_step.pack_weights(weights, num_layers=L, hidden_size=H, num_inputs=K)
    x = torch.randn(n, K)
    config = {"rule": preset, **DEFAULT_OPTIONS}
    yield config, lambda: coordinate_lstm_backward.coordinate_lstm_forward(
        x, h, c, packed, output_scale=cfg.output_scale
    )
    yield config, lambda: coordinate_lstm_backward.coordinate_lstm_backward(
        x, h, c, h, packed, g, h, c, output_scale=cfg.output_scale
    )


def meta_launches(
    grid: list[tuple[bool, int, int]], differentiable: bool
) -> Iterator[tuple[dict, Callable[[], object]]]:
    """:class:`MetaLSTMCell`'s step kernel at each configuration of ``grid``, then, with
    ``differentiable``, its forward and backward kernels at the launchers' defaults."""
    rule = MetaLSTMCell()
    H, n = rule.config.hidden_size, 256
    packed = meta_lstm_step.pack_weights(meta_lstm_step.rule_weights(rule), hidden_size=H)
    g, p = torch.randn(n), torch.randn(n)
    h, c, fi = torch.randn(1, n, H), torch.randn(1, n, H), torch.rand(2, n)
    for use_dot, block, num_warps in grid:
        config = {"rule": "meta-lstm", "use_dot": use_dot, "block": block, "num_warps": num_warps}
        yield config, lambda: meta_lstm_step.meta_lstm_step_(
            g, p, p, h, c, fi, packed, loss=0.5, hidden_size=H,
            preprocess_p=rule.config.preprocess_p, lr=1e-3, maximize=False, use_dot=use_dot,
            block=block, num_warps=num_warps,
        )  # fmt: skip
    if not differentiable:
        return
    x = torch.randn(n, 4)
    config = {"rule": "meta-lstm", **DEFAULT_OPTIONS}
    yield config, lambda: meta_lstm_backward.meta_lstm_forward(x, g, p, h, c, fi, packed)
    yield config, lambda: meta_lstm_backward.meta_lstm_backward(
        x, g, p, h, c, fi, h, packed, g, h, c, fi
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=positive_int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--blocks", type=power_of_two(16), nargs="+", action=Distinct, default=[32, 64, 128])
    parser.add_argument("--warps", type=power_of_two(1), nargs="+", action=Distinct, default=[2, 4, 8])
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="only the step launchers' default block and warps, with tl.dot and with sums",
    )
    parser.add_argument(
        "--no-differentiable",
        action="store_true",
        help="skip the forward and backward kernels of meta-training (about a minute each)",
    )
    parser.add_argument("--results-dir", type=results_dir, default=None, help=f"default {common.RESULTS}")
    args = parser.parse_args()
    if args.results_dir is not None:
        common.RESULTS = args.results_dir
    if args.defaults:
        launcher = inspect.signature(coordinate_lstm_step.coordinate_lstm_step_).parameters
        block, warps = launcher["block"].default, launcher["num_warps"].default
        grid = [(True, block, warps), (False, block, warps)]
    else:
        grid = list(itertools.product([True, False], args.blocks, args.warps))
    differentiable = not args.no_differentiable

    compiled = install_compile_only(args.arch)
    # Consumed lazily: each launch closes over its loop's current configuration.
    launches = itertools.chain(
        coordinate_launches("l2l-2016", grid, differentiable),
        coordinate_launches(LSTMOptimizer.default_preset, grid, differentiable),
        meta_launches(grid, differentiable),
    )
    rows, failures = [], []
    for config, launch in launches:
        start, before = time.perf_counter(), len(compiled)
        try:
            launch()
        except Exception as e:  # noqa: BLE001 (a compile error is the finding to report)
            failures.append({**config, "error": f"{type(e).__name__}: {e}"[:2000]})
            print(f"FAILED {config}: {failures[-1]['error']}", flush=True)
            continue
        seconds = time.perf_counter() - start
        for name, kernel in compiled[before:]:
            rows.append(
                {
                    **config,
                    "kernel": name,
                    **resource_usage(kernel.asm["cubin"]),
                    "dynamic_shared": kernel.metadata.shared,
                    "ttir_dots": kernel.asm["ttir"].count("tt.dot"),
                    "compile_s": seconds,
                }
            )
            print(rows[-1], flush=True)

    table = [
        "| rule | kernel | tl.dot | block | warps | registers | spill stack (B) | shared (B) | dots in TTIR |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        table.append(
            f"| {r['rule']} | {r['kernel']} | {r['use_dot']} | {r['block']} | {r['num_warps']} | "
            f"{r['reg']} | {r['stack']} | {r['dynamic_shared']} | {r['ttir_dots']} |"
        )
    notes = (
        f"Compiled for `sm_{args.arch}` by Triton {triton.__version__} on a machine without a GPU "
        f"(nothing ran). Registers per thread (255 is the most a thread can have), the stack "
        f"frame that spilled registers live in (local memory: 0 means no spills), the shared "
        f"memory Triton asks for per program, and the matrix products (`tt.dot`) in Triton's IR: "
        f"the sum variants (tl.dot False) must have none, or Triton turned their fp32 sums into "
        f"TF32 products."
    )
    if failures:
        notes += "\n\nDid not compile: " + "; ".join(str(f) for f in failures)
    write_results(
        "kernel_resources",
        {"arch": args.arch, "triton": triton.__version__, "rows": rows, "failures": failures},
        notes + "\n\n" + "\n".join(table),
    )
    print(f"wrote {common.RESULTS / 'kernel_resources.md'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
