"""Time one optimizer step of the coordinatewise LSTM rule and of the Ravi & Larochelle
meta-learner: PyTorch paths, the fused Triton kernels, and Adam, on one flat parameter vector of
each given size.

Columns (methods):

* ``eager``: the optimizer's batched PyTorch path, :func:`learnedopt.optim.update.flat_update_`
  (8192-coordinate chunks);
* ``compiled``: the same rule under ``torch.compile``, applied to the whole range at once (the
  chunk loop would unroll into the graph);
* ``fused_dot`` / ``fused_sum``: ``coordinate_lstm_step_`` with ``use_dot=True`` / ``False``
  (weights packed once, outside the timing), plus ``fused_dot_<precision>`` for each extra
  ``--precisions`` entry;
* ``rich_eager`` / ``rich_compiled`` / ``rich_fused_dot`` / ``rich_fused_sum`` (and
  ``rich_fused_dot_<precision>``): the same for the rule with the extra inputs of
  ``LSTMOptimizer``'s default preset (``l2l-blend``, as ``l2l-random``: momenta at decays 0.5, 0.9, 0.99 and
  rms-normalised gradients at 0.99, 0.999, read from the preset; 10 inputs), whose ``m`` and
  ``v`` states the step also reads and writes;
* ``meta_eager`` / ``meta_compiled`` / ``meta_fused_dot`` / ``meta_fused_sum`` (and
  ``meta_fused_dot_<precision>``): the same for :class:`MetaLSTMCell` (``MetaLSTMOptimizer``'s
  rule, hidden ``--hidden-size``, one LSTM layer whatever ``--num-layers``), the fused columns
  timing :func:`learnedopt.kernels.meta_lstm_step.meta_lstm_step_` with its loss features
  preprocessed once outside the timing (the optimizer pays one host sync per step for them);
* ``adam_fused`` / ``adam_foreach``: ``torch.optim.Adam(fused=True)`` / ``(foreach=True)``;
* the differentiable step of meta-training (float32 states only; up to ``--backward-max-size``
  coordinates), for the three rules (prefixes ``""``, ``rich_`` and ``meta_``, the last through
  :mod:`learnedopt.kernels.meta_lstm_backward`): ``backward_autograd``,
  autograd's backward through the reference :class:`CoordinateLSTM` (graph built once outside
  the timing, ``retain_graph=True``), against ``backward_triton``, the backward kernel of
  :mod:`learnedopt.kernels.coordinate_lstm_backward` on the rule's input features (forward
  outputs computed once outside the timing); ``fwd_bwd_autograd`` and ``fwd_bwd_triton`` time
  forward plus backward, the latter as the unroll runs it (the input features by PyTorch, then
  both kernels). Each gives gradients for the states, the gradient input and all rule weights.

For each it reports ms/step, the bytes one step must move per coordinate (gradient read,
parameter read and write, every ``h``/``c`` state read and written: 652 B for two fp32 layers of
20 units, 692 B with the rich inputs' five moments; the meta-learner adds its two gate states
and has one layer: 348 B at 20 units; Adam:
gradient, parameter, two moments), the achieved GB/s as a fraction of a
device-to-device copy measured in the same run, and the useful (unpadded) GFLOP/s as a fraction
of a square fp32 matmul measured in the same run. The backward columns count the minimum traffic
of the backward kernel (the ``K`` input features and their gradients, ``d step``; per layer the
old ``h`` and ``c``, the new ``h``, the incoming ``d h`` and ``d c`` and the outgoing ``d h`` and
``d c``: 1,140 B for two fp32 layers of 20 units and K = 2, 1,204 B for the rich inputs' K = 10)
and three times the forward's matrix FLOPs (recomputed gates, the input gradients and the weight
gradients); the fwd_bwd columns add those of a forward that is not in place (features and step,
old and new states: 1,792 B and 1,888 B, and 4x the FLOPs in all). For the meta-learner: 636 B
(features, gradient, parameter, ``h``, ``c``, ``fi``, new ``h`` and the four outputs' gradients
read, the six inputs' gradients written) and 1,000 B with its forward, at 20 units.

The Triton columns need CUDA. On a machine without it only the CPU-capable columns (``eager``,
``compiled``, their ``rich_`` twins, ``meta_eager``, ``meta_compiled``, ``adam_*``, ``backward_autograd``,
``fwd_bwd_autograd``) run, and the results say so; never time in the Triton interpreter (``TRITON_INTERPRET=1``) — it is a
debugging tool, thousands of times slower.

    python benchmarks/kernel_bench.py [--sizes 100000 1000000 10000000] [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable

import common
import torch
from common import Distinct, positive_int, power_of_two, results_dir, write_results

from learnedopt import LSTMOptimizer
from learnedopt.nn import CoordinateLSTM, MetaLSTMCell
from learnedopt.optim.update import flat_update_
from learnedopt.weights import build_preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def flops_per_coordinate(num_layers: int, hidden_size: int, num_inputs: int = 2) -> int:
    """Useful multiply-adds x 2 per coordinate: 2 x 4H x (inputs + H) per layer, 2H for the head."""
    total, inputs = 0, num_inputs
    for _ in range(num_layers):
        total += 2 * 4 * hidden_size * (inputs + hidden_size)
        inputs = hidden_size
    return total + 2 * hidden_size


def bytes_per_coordinate(
    num_layers: int,
    hidden_size: int,
    grad_bytes: int,
    param_bytes: int,
    state_bytes: int,
    num_moments: int = 0,
) -> int:
    """Minimum traffic of one step per coordinate: grad in, param in/out, h and c in/out, and
    each of ``num_moments`` momentum or second-moment states (``m``, ``v``) in/out."""
    states = 2 * num_layers * hidden_size + num_moments
    return grad_bytes + 2 * param_bytes + 2 * states * state_bytes


def meta_flops_per_coordinate(hidden_size: int) -> int:
    """Useful FLOPs per coordinate of :class:`MetaLSTMCell`: the input LSTM (4 inputs) and the
    two gates' ``H + 2``-term dot products."""
    return 2 * 4 * hidden_size * (4 + hidden_size) + 2 * 2 * (hidden_size + 2)


def meta_bytes_per_coordinate(
    hidden_size: int, grad_bytes: int, param_bytes: int, state_bytes: int
) -> int:
    """Minimum traffic of a :class:`MetaLSTMCell` step per coordinate: grad in, param in/out,
    ``h``, ``c`` (H each) and ``fi`` (2) in/out."""
    return grad_bytes + 2 * param_bytes + 2 * (2 * hidden_size + 2) * state_bytes


def backward_bytes_per_coordinate(num_layers: int, hidden_size: int, num_inputs: int) -> int:
    """Minimum traffic of the fp32 backward kernel per coordinate: the ``K`` input features read
    and their gradients written, ``d step``; per layer old ``h``, ``c``, new ``h``, incoming
    ``d h``, ``d c`` read, ``d h``, ``d c`` written."""
    return 2 * 4 * num_inputs + 4 + 7 * num_layers * hidden_size * 4


def make_timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Seconds per call: CUDA events via ``triton.testing.do_bench`` on GPUs, wall clock on CPUs."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100 * repeats, return_mode="median") / 1e3
    return lambda fn: common.time_call(fn, repeats=repeats, min_time=0.1)


def copy_gbps(device: torch.device, timer, mib: int) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second / 1e9)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / seconds / 1e9


def matmul_gflops(device: torch.device, timer, size: int) -> float:
    """Square fp32 ``torch.matmul`` GFLOP/s (TF32 off: the fp32 peak the kernel's FMAs can reach)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        seconds = timer(lambda: torch.matmul(a, b))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * size**3 / seconds / 1e9


def default_preset_features() -> dict[str, tuple[float, ...]]:
    """The extra inputs of ``LSTMOptimizer``'s default preset (``l2l-blend``, as ``l2l-random``): its
    ``momentum_decays`` and ``rms_decays``, timed as the ``rich_*`` columns."""
    config = build_preset(LSTMOptimizer.default_preset)[0].config
    return {"momentum_decays": config.momentum_decays, "rms_decays": config.rms_decays}


def make_rule(
    num_layers: int, hidden_size: int, device: torch.device, **features
) -> CoordinateLSTM:
    """A :class:`CoordinateLSTM` with ``features`` (extra inputs) whose every weight is nonzero."""
    rule = CoordinateLSTM(num_layers=num_layers, hidden_size=hidden_size, **features).to(device)
    with torch.no_grad():
        for q in rule.parameters():
            q.add_(torch.randn_like(q) * 0.1)
    return rule


def lstm_states(
    rule: CoordinateLSTM, n: int, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Random states of ``rule`` for ``n`` coordinates: ``h``, ``c`` and, where the rule has
    them, momenta ``m`` and second moments ``v`` of the benchmark gradient's size."""
    scale = {"h": 0.1, "c": 0.1, "m": 1e-2, "v": 1e-2}
    states = {}
    for name, spec in rule.state_spec().items():
        x = torch.randn(spec.shape(n), device=device) * scale[name]
        states[name] = (x.square() if name == "v" else x).to(dtype)
    return states


def lstm_methods(
    prefix: str,
    rule: CoordinateLSTM,
    packed,
    fused_mod,
    grad: torch.Tensor,
    param: torch.Tensor,
    states: dict[str, torch.Tensor],
    args: argparse.Namespace,
    *,
    lr: float,
    nbytes: int,
    flops: int,
    tune: bool,
) -> dict[str, tuple[Callable[[], object], int, int]]:
    """The columns of one :class:`CoordinateLSTM`, named ``prefix`` + ``eager``, ``compiled``
    (unless ``--no-compile``) and, when ``fused_mod`` (CUDA) is given, ``fused_dot``,
    ``fused_sum``, ``fused_dot_<precision>`` and, with ``tune``, the block x warps sweep of both:
    ``{name: (fn, bytes per coordinate, FLOPs per coordinate)}``. Every column advances
    ``states`` (and ``param``) in place."""
    cfg = rule.config
    methods = {}

    def eager() -> None:
        with torch.no_grad():
            flat_update_(
                rule,
                [param],
                [grad],
                states,
                [0],
                lr=lr,
                loss=None,
                maximize=False,
                compute_dtype=torch.float32,
            )

    methods[f"{prefix}eager"] = (eager, nbytes, flops)

    if not args.no_compile:

        def whole(g: torch.Tensor, p: torch.Tensor, states: dict) -> None:
            step, new = rule(g.float(), p.float(), {k: v.float() for k, v in states.items()})
            for k, v in states.items():
                v.copy_(new[k])
            p.add_(step, alpha=lr)

        compiled_step = torch.compile(whole)

        def compiled() -> None:
            with torch.no_grad():
                compiled_step(grad, param, states)

        methods[f"{prefix}compiled"] = (compiled, nbytes, flops)

    if fused_mod is None:
        return methods

    def fused(
        use_dot: bool, precision: str = "ieee", block: int = args.block, warps: int = args.num_warps
    ) -> Callable[[], None]:
        return lambda: fused_mod.coordinate_lstm_step_(
            grad,
            param,
            param,
            states["h"],
            states["c"],
            packed,
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            preprocess_p=cfg.preprocess_p,
            output_scale=cfg.output_scale,
            lr=lr,
            maximize=False,
            momentum_decays=cfg.momentum_decays,
            rms_decays=cfg.rms_decays,
            m=states.get("m"),
            v=states.get("v"),
            use_dot=use_dot,
            block=block,
            num_warps=warps,
            input_precision=precision,
        )

    methods[f"{prefix}fused_dot"] = (fused(True), nbytes, flops)
    methods[f"{prefix}fused_sum"] = (fused(False), nbytes, flops)
    for precision in args.precisions:
        methods[f"{prefix}fused_dot_{precision}"] = (fused(True, precision), nbytes, flops)
    if tune:
        for block in (32, 64, 128):
            for warps in (2, 4, 8):
                for precision in ("ieee", *args.precisions):
                    methods[f"{prefix}fused_dot_{precision}_b{block}_w{warps}"] = (
                        fused(True, precision, block, warps),
                        nbytes,
                        flops,
                    )
                methods[f"{prefix}fused_sum_b{block}_w{warps}"] = (
                    fused(False, block=block, warps=warps),
                    nbytes,
                    flops,
                )
    return methods


Graph = Callable[[], tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]]


def differentiable_columns(
    prefix: str,
    reference_graph: Graph,
    kernel_graph: Graph | None,
    kernel_backward: Callable[[list[torch.Tensor]], object] | None,
    *,
    bwd_bytes: int,
    fwd_bwd_bytes: int,
    flops: int,
) -> dict[str, tuple[Callable[[], object], int, int]]:
    """The four columns of one rule's differentiable step: ``{prefix + name: (fn, bytes per
    coordinate, FLOPs per coordinate)}``.

    ``reference_graph()`` and ``kernel_graph()`` run the forward through autograd (the PyTorch
    module; the rule's features then the Triton kernels, as the unroll does) and return
    ``(outputs, leaves)``; ``kernel_backward(cotangents)`` runs the backward kernel alone on a
    forward computed beforehand. The Triton columns only when those are given (CUDA).
    """
    outputs, leaves = reference_graph()
    cotangents = [torch.randn_like(o) for o in outputs]
    methods = {
        "backward_autograd": (
            lambda: torch.autograd.grad(outputs, leaves, cotangents, retain_graph=True),
            bwd_bytes,
            3 * flops,
        ),
        "fwd_bwd_autograd": (
            lambda: torch.autograd.grad(*reference_graph(), cotangents),
            fwd_bwd_bytes,
            4 * flops,
        ),
    }
    if kernel_graph is not None and kernel_backward is not None:
        methods["backward_triton"] = (lambda: kernel_backward(cotangents), bwd_bytes, 3 * flops)
        methods["fwd_bwd_triton"] = (
            lambda: torch.autograd.grad(*kernel_graph(), cotangents),
            fwd_bwd_bytes,
            4 * flops,
        )
    return {prefix + name: entry for name, entry in methods.items()}


def lstm_differentiable_columns(
    prefix: str,
    rule: CoordinateLSTM,
    backward_mod,
    grad: torch.Tensor,
    states: dict[str, torch.Tensor],
    flops: int,
) -> dict[str, tuple[Callable[[], object], int, int]]:
    """:func:`differentiable_columns` of a :class:`CoordinateLSTM` (``states``: its ``h``, ``c``
    and, with rich inputs, ``m``, ``v``)."""
    cfg = rule.config
    num_layers, k = cfg.num_layers, cfg.num_inputs
    bwd_bytes = backward_bytes_per_coordinate(num_layers, cfg.hidden_size, k)
    # the forward, not in place: features in, step out, old states in, new states out
    fwd_bwd_bytes = bwd_bytes + 4 * k + 4 + 4 * num_layers * cfg.hidden_size * 4
    # copies: the in-place columns advance the states, which the saved graphs must not see
    grad = grad.float().clone()
    states = {name: t.float().clone() for name, t in states.items()}
    moments = {name: t for name, t in states.items() if name in ("m", "v")}
    weights = list(rule.parameters())

    def leaves() -> list[torch.Tensor]:
        return [t.detach().requires_grad_(True) for t in (grad, states["h"], states["c"])]

    def reference_graph():
        g, h, c = inputs = leaves()
        step, new = rule(g, g, {"h": h, "c": c, **moments})
        return (step, new["h"], new["c"]), [*inputs, *weights]

    kernel_graph = kernel_backward = None
    if backward_mod is not None:
        named = dict(rule.named_parameters())

        def kernel_graph():
            g, h, c = inputs = leaves()
            x, _ = rule.features(g, g, moments)
            return backward_mod.coordinate_lstm_step(x, h, c, named, cfg), [*inputs, *weights]

        packed = backward_mod.pack_weights(
            {name: t.detach() for name, t in named.items()},
            num_layers=num_layers,
            hidden_size=cfg.hidden_size,
            num_inputs=k,
        )
        with torch.no_grad():
            x, _ = rule.features(grad, grad, moments)
        scale = {"output_scale": cfg.output_scale}
        h, c = states["h"], states["c"]
        _, h_new, _ = backward_mod.coordinate_lstm_forward(x, h, c, packed, **scale)

        def kernel_backward(cotangents):
            return backward_mod.coordinate_lstm_backward(
                x, h, c, h_new, packed, *cotangents, **scale
            )

    return differentiable_columns(
        prefix,
        reference_graph,
        kernel_graph,
        kernel_backward,
        bwd_bytes=bwd_bytes,
        fwd_bwd_bytes=fwd_bwd_bytes,
        flops=flops,
    )


def meta_differentiable_columns(
    rule: MetaLSTMCell,
    meta_backward_mod,
    grad: torch.Tensor,
    param: torch.Tensor,
    states: dict[str, torch.Tensor],
    loss: torch.Tensor,
    flops: int,
) -> dict[str, tuple[Callable[[], object], int, int]]:
    """:func:`differentiable_columns` of a :class:`MetaLSTMCell`, prefix ``meta_``."""
    hidden = rule.config.hidden_size
    # x (4), grad, param, h, c, fi (2), new h, d step, d new h, d new c, d new fi (2) read;
    # d x (4), d grad, d param, d h, d c, d fi (2) written
    bwd_bytes = 4 * (7 * hidden + 19)
    # the forward: x, grad, param, h, c, fi read; step, new h, c, fi written
    fwd_bwd_bytes = bwd_bytes + 4 * (4 * hidden + 11)
    grad, param = grad.float().clone(), param.float().clone()
    states = {name: t.float().clone() for name, t in states.items()}
    weights = list(rule.parameters())

    def leaves() -> list[torch.Tensor]:
        tensors = (grad, param, states["h"], states["c"], states["fi"])
        return [t.detach().requires_grad_(True) for t in tensors]

    def reference_graph():
        g, p, h, c, fi = inputs = leaves()
        step, new = rule(g, p, {"h": h, "c": c, "fi": fi}, loss)
        return (step, new["h"], new["c"], new["fi"]), [*inputs, *weights]

    kernel_graph = kernel_backward = None
    if meta_backward_mod is not None:
        named = dict(rule.named_parameters())

        def kernel_graph():
            g, p, h, c, fi = inputs = leaves()
            x = rule.features(g, loss)
            outputs = meta_backward_mod.meta_lstm_step(x, g, p, h, c, fi, named, rule.config)
            return outputs, [*inputs, *weights]

        packed = meta_backward_mod.pack_weights(
            {name: t.detach() for name, t in named.items()}, hidden_size=hidden
        )
        with torch.no_grad():
            x = rule.features(grad, loss)
        saved = (x, grad, param, states["h"], states["c"], states["fi"])
        _, h_new, _, _ = meta_backward_mod.meta_lstm_forward(*saved, packed)

        def kernel_backward(cotangents):
            return meta_backward_mod.meta_lstm_backward(*saved, h_new, packed, *cotangents)

    return differentiable_columns(
        "meta_",
        reference_graph,
        kernel_graph,
        kernel_backward,
        bwd_bytes=bwd_bytes,
        fwd_bwd_bytes=fwd_bwd_bytes,
        flops=flops,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=positive_int, nargs="+", action=Distinct, default=None, help="parameter counts")
    parser.add_argument("--num-layers", type=positive_int, default=2)
    parser.add_argument("--hidden-size", type=positive_int, default=20)
    parser.add_argument("--param-dtype", choices=DTYPES, default="float32")
    parser.add_argument("--state-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--block", type=power_of_two(16), default=64)
    parser.add_argument("--num-warps", type=power_of_two(1), default=4)
    parser.add_argument(
        "--precisions", nargs="*", default=["tf32x3"], help="extra tl.dot input precisions to time"
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="also sweep block x num_warps for fused_dot, fused_sum and their rich_ twins "
        "at the largest size",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument(
        "--backward-max-size",
        type=positive_int,
        default=None,
        help="largest size for the backward columns (default 10^7 on CUDA, 10^6 on CPU)",
    )
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--results-dir", type=results_dir, default=None, help=f"default {common.RESULTS}")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.results_dir is not None:
        common.RESULTS = args.results_dir

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interpreted = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    triton_reason = None
    if device.type != "cuda":
        triton_reason = "no CUDA device: the Triton columns were not run (they need a GPU)"
    elif interpreted:
        triton_reason = "TRITON_INTERPRET is set: the Triton columns were not run (interpreter timings are meaningless)"
    sizes = args.sizes or (
        [100_000, 1_000_000, 10_000_000] if device.type == "cuda" else [10_000, 100_000, 1_000_000]
    )
    timer = make_timer(device, args.repeats)
    torch.manual_seed(0)

    L, H = args.num_layers, args.hidden_size
    param_dtype, state_dtype = DTYPES[args.param_dtype], DTYPES[args.state_dtype]
    rule = make_rule(L, H, device)
    rich_features = default_preset_features()
    rich_rule = make_rule(L, H, device, **rich_features)
    flops = flops_per_coordinate(L, H)
    rich_flops = flops_per_coordinate(L, H, rich_rule.config.num_inputs)
    elt = lambda dt: torch.empty(0, dtype=dt).element_size()
    rule_bytes = bytes_per_coordinate(L, H, elt(param_dtype), elt(param_dtype), elt(state_dtype))
    num_moments = len(rich_features["momentum_decays"]) + len(rich_features["rms_decays"])
    rich_bytes = bytes_per_coordinate(
        L, H, elt(param_dtype), elt(param_dtype), elt(state_dtype), num_moments
    )
    adam_bytes = elt(param_dtype) * (1 + 2 + 2 + 2)  # grad; param, exp_avg, exp_avg_sq in and out
    meta_rule = MetaLSTMCell(hidden_size=H).to(device)
    meta_flops = meta_flops_per_coordinate(H)
    meta_bytes = meta_bytes_per_coordinate(H, elt(param_dtype), elt(param_dtype), elt(state_dtype))
    meta_loss = torch.tensor(0.5, device=device)

    peak_copy = copy_gbps(device, timer, 1024 if device.type == "cuda" else 128)
    peak_flops = matmul_gflops(device, timer, 8192 if device.type == "cuda" else 2048)
    print(
        f"device {device}: copy {peak_copy:.1f} GB/s, fp32 matmul {peak_flops:.1f} GFLOP/s",
        flush=True,
    )
    if triton_reason:
        print(triton_reason, flush=True)

    fused_mod = None
    backward_mod = None
    meta_backward_mod = None
    meta_mod = None
    packed = None
    rich_packed = None
    if triton_reason is None:
        from learnedopt.kernels import coordinate_lstm_backward as backward_mod
        from learnedopt.kernels import meta_lstm_backward as meta_backward_mod
        from learnedopt.kernels import coordinate_lstm_step as fused_mod
        from learnedopt.kernels import meta_lstm_step as meta_mod

        packed = fused_mod.pack_weights(
            fused_mod.rule_weights(rule, device), num_layers=L, hidden_size=H
        )
        rich_packed = fused_mod.pack_weights(
            fused_mod.rule_weights(rich_rule, device),
            num_layers=L,
            hidden_size=H,
            num_inputs=fused_mod.feature_count(**rich_features),
        )
        meta_packed = meta_mod.pack_weights(meta_mod.rule_weights(meta_rule, device), hidden_size=H)
        meta_features = meta_mod.loss_features(meta_loss, meta_rule.config.preprocess_p)
    backward_max = args.backward_max_size or (10**7 if device.type == "cuda" else 10**6)
    # (column prefix, rule, packed weights, bytes and FLOPs per coordinate)
    lstm_rules = [
        ("", rule, packed, rule_bytes, flops),
        ("rich_", rich_rule, rich_packed, rich_bytes, rich_flops),
    ]

    rows: list[dict] = []
    errors: dict[str, str] = {}
    lr = 1e-3

    def report() -> None:
        """Write the results so far (after each size: a timed-out run keeps what it measured)."""
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        notes = [
            (
                f"Device: **{device_name}**. Rule: {L} layers x {H} units, params {args.param_dtype}, "
                f"states {args.state_dtype}; fused kernel block {args.block}, {args.num_warps} warps. "
                f"The rich_* columns run the same rule with the default preset's extra inputs "
                f"(momentum decays {rich_features['momentum_decays']}, rms decays "
                f"{rich_features['rms_decays']}: {rich_rule.config.num_inputs} inputs)."
            ),
            (
                f"Device-to-device copy in this run: **{peak_copy:.1f} GB/s** (read + write); square "
                f"fp32 matmul (TF32 off): **{peak_flops:.1f} GFLOP/s**. Useful FLOPs per coordinate: "
                f"{flops} (LSTM rule), {rich_flops} (rich inputs), {meta_flops} (MetaLSTMCell, "
                f"hidden {H}); bytes per coordinate: {rule_bytes} (LSTM rule), {rich_bytes} (rich "
                f"inputs), {meta_bytes} (MetaLSTMCell), {adam_bytes} (Adam), "
                f"{backward_bytes_per_coordinate(L, H, rule.config.num_inputs)} (backward kernel), "
                f"{backward_bytes_per_coordinate(L, H, rich_rule.config.num_inputs)} (its rich twin)."
            ),
        ]
        if triton_reason:
            notes.append(f"**{triton_reason}.**")
        if errors:
            notes.append("Not timed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
        table = [
            "| params | method | ms/step | B/coord | GB/s | % of copy | GFLOP/s | % of matmul |",
            "|---" * 8 + "|",
        ]
        for r in rows:
            table.append(
                f"| {r['params']:,} | {r['method']} | {r['ms']:.3f} | {r['bytes_per_coord']} | {r['gbps']:.1f} | "
                f"{100 * r['fraction_of_copy']:.1f} | {r['gflops']:.1f} | {100 * r['fraction_of_matmul']:.1f} |"
            )
        payload = {
            "device": device_name,
            "triton_columns": triton_reason or "run",
            "copy_gbps": peak_copy,
            "matmul_gflops": peak_flops,
            "config": {
                "num_layers": L,
                "hidden_size": H,
                "param_dtype": args.param_dtype,
                "state_dtype": args.state_dtype,
                "block": args.block,
                "num_warps": args.num_warps,
                "backward_max_size": backward_max,
                "rich_features": rich_features,
            },
            "rows": rows,
            "errors": errors,
        }
        write_results("kernel_bench", payload, "\n\n".join(notes) + "\n\n" + "\n".join(table))
        print(f"wrote {common.RESULTS / 'kernel_bench.md'}", flush=True)

    for n in sizes:
        grad = (torch.randn(n, device=device) * 1e-2).to(param_dtype)
        param = torch.randn(n, device=device).to(param_dtype)
        methods: dict[str, tuple[Callable[[], object], int, int]] = {}
        rule_states = {prefix: lstm_states(r, n, device, state_dtype) for prefix, r, *_ in lstm_rules}
        for prefix, lstm_rule, lstm_packed, lstm_bytes, lstm_flops in lstm_rules:
            methods.update(
                lstm_methods(
                    prefix,
                    lstm_rule,
                    lstm_packed,
                    fused_mod,
                    grad,
                    param,
                    rule_states[prefix],
                    args,
                    lr=lr,
                    nbytes=lstm_bytes,
                    flops=lstm_flops,
                    tune=args.tune and n == max(sizes),
                )
            )

        # ---- MetaLSTMCell (MetaLSTMOptimizer's rule): own states, same gradient and parameter
        meta_states = {
            "h": (torch.randn(1, n, H, device=device) * 0.1).to(state_dtype),
            "c": (torch.randn(1, n, H, device=device) * 0.1).to(state_dtype),
            "fi": torch.rand(2, n, device=device).to(state_dtype),
        }

        def meta_eager(grad=grad, param=param, states=meta_states) -> None:
            with torch.no_grad():
                flat_update_(
                    meta_rule,
                    [param],
                    [grad],
                    states,
                    [0],
                    lr=lr,
                    loss=meta_loss,
                    maximize=False,
                    compute_dtype=torch.float32,
                )

        methods["meta_eager"] = (meta_eager, meta_bytes, meta_flops)

        if not args.no_compile:

            def meta_whole(
                g: torch.Tensor, p: torch.Tensor, states: dict, loss: torch.Tensor
            ) -> None:
                step, new = meta_rule(
                    g.float(), p.float(), {k: v.float() for k, v in states.items()}, loss
                )
                for k, v in states.items():
                    v.copy_(new[k])
                p.add_(step, alpha=lr)

            meta_compiled_step = torch.compile(meta_whole)

            def meta_compiled(
                step_fn=meta_compiled_step, grad=grad, param=param, states=meta_states
            ) -> None:
                with torch.no_grad():
                    step_fn(grad, param, states, meta_loss)

            methods["meta_compiled"] = (meta_compiled, meta_bytes, meta_flops)

        if meta_mod is not None:

            def meta_fused(
                use_dot: bool, precision: str = "ieee", grad=grad, param=param, states=meta_states
            ):
                return lambda: meta_mod.meta_lstm_step_(
                    grad,
                    param,
                    param,
                    states["h"],
                    states["c"],
                    states["fi"],
                    meta_packed,
                    loss=meta_features,
                    hidden_size=H,
                    preprocess_p=meta_rule.config.preprocess_p,
                    lr=lr,
                    maximize=False,
                    use_dot=use_dot,
                    block=args.block,
                    num_warps=args.num_warps,
                    input_precision=precision,
                )

            methods["meta_fused_dot"] = (meta_fused(True), meta_bytes, meta_flops)
            methods["meta_fused_sum"] = (meta_fused(False), meta_bytes, meta_flops)
            for precision in args.precisions:
                methods[f"meta_fused_dot_{precision}"] = (
                    meta_fused(True, precision),
                    meta_bytes,
                    meta_flops,
                )

        if state_dtype != torch.float32:
            errors[f"backward n={n}"] = "the backward columns need float32 states"
        elif n <= backward_max:
            for prefix, r, _, _, r_flops in lstm_rules:
                methods.update(
                    lstm_differentiable_columns(
                        prefix, r, backward_mod, grad, rule_states[prefix], r_flops
                    )
                )
            methods.update(
                meta_differentiable_columns(
                    meta_rule, meta_backward_mod, grad, param, meta_states, meta_loss, meta_flops
                )
            )

        for name, kwargs in (
            ("adam_fused", {"fused": True}),
            ("adam_foreach", {"foreach": True}),
        ):
            p_adam = torch.randn(n, device=device).to(param_dtype).requires_grad_(True)
            p_adam.grad = grad.clone()
            try:
                opt = torch.optim.Adam([p_adam], lr=lr, **kwargs)
                opt.step()
            except Exception as e:  # noqa: BLE001 (fused Adam is not implemented for every device/dtype)
                errors[f"{name} n={n}"] = f"{type(e).__name__}: {e}"[:300]
                continue
            methods[name] = (opt.step, adam_bytes, 0)

        for name, (fn, nbytes, nflops) in methods.items():
            try:
                seconds = timer(fn)
            except Exception as e:  # noqa: BLE001 (e.g. torch.compile without a C++ compiler on CPU)
                errors[f"{name} n={n}"] = f"{type(e).__name__}: {e}"[:300]
                print(f"{name} n={n}: {errors[f'{name} n={n}']}", flush=True)
                continue
            gbps = nbytes * n / seconds / 1e9
            gflops = nflops * n / seconds / 1e9
            rows.append(
                {
                    "params": n,
                    "method": name,
                    "ms": seconds * 1e3,
                    "bytes_per_coord": nbytes,
                    "gbps": gbps,
                    "fraction_of_copy": gbps / peak_copy,
                    "gflops": gflops,
                    "fraction_of_matmul": gflops / peak_flops,
                }
            )
            print(rows[-1], flush=True)
        report()


if __name__ == "__main__":
    sys.exit(main())
