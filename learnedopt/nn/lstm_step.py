"""One time step of a stacked LSTM with a hand-written backward: both rules' LSTM, in the
optimizer's no-grad step and under autograd in meta-training.

A learned optimizer runs its LSTM for exactly one time step per optimizer step, on a batch of
``n`` coordinates (tens of thousands to millions) with a small hidden size (20). At that shape
its matrix products are skinny (``(n, 22 or 40)`` by ``(22 or 40, 4H = 80)`` in the paper's
two-layer configuration, and their transposes) and its elementwise work is bound by memory
traffic. On the CPU hosts where both were timed, ``torch.nn.LSTM`` (oneDNN's RNN
primitive) ran slower than this step, forward (``benchmarks/lstm_chunk.py``) and forward plus
backward (``benchmarks/meta_train_throughput.py``).
:class:`LSTMStackStep` runs each layer of float32 CPU tensors (hidden size a multiple of 4) as
the fused kernel :mod:`learnedopt.kernels.lstm_layer_cpu`: forward and backward each one pass
over the coordinates, four at a time, their gates in registers (on an AMD EPYC host, a
meta-training truncation 1.30x to 1.64x faster than the formulation below;
``benchmarks/results/meta_train_throughput_*fused.md``); given a linear head (CoordinateLSTM's
output layer, :func:`lstm_step`'s ``head``), the top layer's kernel applies it in the same pass,
forward and backward. Otherwise (other dtypes, devices or hidden sizes,
``LEARNEDOPT_CPU_KERNEL=0``, or no C++ compiler) each layer is one BLAS product plus ONE pointwise
function (:func:`cell_forward`), saving the gate activations; its backward is the closed-form LSTM
gradient: per layer one pointwise function (:func:`cell_backward`) plus two BLAS products.

The two pointwise functions are compiled with ``torch.compile`` (one fused loop each instead of
about fifteen passes over memory) the first time they run, which takes seconds once per process
and kind of input (device, dtype, hidden size), and once more when the batch size first changes
(see :class:`_Compiled`); set ``LEARNEDOPT_COMPILE=0`` to run them eagerly (and not to build the
fused kernel either). If compiling fails (no C++ compiler, an unsupported platform) they run
eagerly, with one warning for the process (none on CPU tensors where the fused kernel has
already warned that it could not be built: without a working compiler, one warning in all). Every way computes the same math as ``torch.nn.LSTM`` (torch's gate
order ``i, f, g, o``), equal to rounding; the optimizer's no-grad step and meta-training take the
same way for the same inputs, so they give the same bits (one exception: a head that alone needs
gradients, the LSTM frozen, runs in torch operations under autograd, so that it has derivatives
of any order; the no-grad step's head in the kernel then differs from it by rounding).

The backward is first order: the meta-gradient of an unroll needs one backward through each rule
call; differentiating that backward again (``create_graph=True`` through it) raises an error, and
so do ``torch.func`` transforms (``grad``, ``vmap``), which this ``autograd.Function`` does not
support, and forward-mode dual tensors (``torch.autograd.forward_ad``) among the LSTM's inputs or
weights (a head's tangents are kept: :func:`lstm_step` then runs the head in torch).
"""

from __future__ import annotations

import os
import threading
import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.autograd.function import FunctionCtx, once_differentiable

from ..kernels import lstm_layer_cpu
from ..switches import env_switch


def cell_forward(gates: Tensor, bias: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pointwise part of an LSTM cell.

    Args:
        gates: ``(n, 4H)`` pre-activations without the bias, column blocks ``i, f, g, o``.
        bias: ``(4H,)``, added to every row of ``gates``.
        c: ``(n, H)`` cell state.

    Returns:
        ``(activations (n, 4H), c' (n, H), h' (n, H), tanh(c') (n, H))``.
    """
    hidden = c.shape[1]
    # tanh(z) = 2 sigmoid(2z) - 1, so that one sigmoid runs over all 4H contiguous columns: the
    # compiled loop over separate H-wide blocks (H = 20: one full and one partial vector each)
    # ran more than 2x slower on CPU (benchmarks/lstm_step_parts.py). ``scale`` is a constant
    # of the compiled code.
    scale = gates.new_tensor([1.0] * (2 * hidden) + [2.0] * hidden + [1.0] * hidden)
    activations = torch.sigmoid((gates + bias) * scale) * scale - (scale - 1.0)
    i, f, g, o = activations.chunk(4, dim=1)
    c_new = f * c + i * g
    tanh_c = 2.0 * torch.sigmoid(2.0 * c_new) - 1.0
    return activations, c_new, o * tanh_c, tanh_c


def cell_backward(
    activations: Tensor, c: Tensor, tanh_c: Tensor, grad_h: Tensor, grad_c: Tensor
) -> tuple[Tensor, Tensor]:
    """The gradient of :func:`cell_forward` (all ``(n, H)`` but ``activations``, ``(n, 4H)``).

    Args:
        activations, c, tanh_c: as :func:`cell_forward` took and returned them.
        grad_h, grad_c: the loss's gradients with respect to ``h'`` and ``c'``.

    Returns:
        ``(grad of the pre-activation gates (n, 4H), grad of c (n, H))``.
    """
    i, f, g, o = activations.chunk(4, dim=1)
    dc = grad_h * o * (1 - tanh_c * tanh_c) + grad_c  # directly, and through h' = o tanh(c')
    d_gates = torch.cat(
        (dc * g * i * (1 - i), dc * c * f * (1 - f), dc * i * (1 - g * g), grad_h * tanh_c * o * (1 - o)), dim=1
    )
    return d_gates, dc * f


def compile_enabled() -> bool:
    """Whether the pointwise functions are compiled (``LEARNEDOPT_COMPILE``, default on; ``0``,
    ``false``, ``off`` or ``no``, in any case, turn it off, ``1``, ``true``, ``on``, ``yes`` or
    empty leave it on; any other value raises ValueError)."""
    return env_switch("LEARNEDOPT_COMPILE", on="compile the LSTM step", off="run it eagerly")


def check_settings() -> None:
    """Read the step's switches now (``LEARNEDOPT_COMPILE``, ``LEARNEDOPT_CPU_KERNEL`` and, where
    that kernel is on, ``LEARNEDOPT_CXX_TIMEOUT``, read at its first build), so that a bad value
    is refused before a run starts; raises ValueError naming it."""
    compile_enabled()
    if lstm_layer_cpu.enabled():
        lstm_layer_cpu.compiler_timeout()


class _Compiled:
    """``fn`` compiled on first use, or ``fn`` itself when compiling is off or fails.

    Each kind of input (device, dtype and every size but the first, the batch size: the hidden
    size for both pointwise functions) gets its own compiled copy of ``fn``. Dynamo keeps at most
    ``torch._dynamo.config.recompile_limit`` (8) compiled variants per code object and runs any
    later one eagerly, more slowly and with other rounding; a process that builds rules of
    several hidden sizes and dtypes (a sweep, a test suite) would reach that with one copy.

    ``dynamic`` is ``torch.compile``'s. The default (``None``) compiles the first call's shapes
    as constants and recompiles once, with the batch size symbolic, when another shape comes. A
    run whose coordinate count never changes (one task family of fixed architecture) keeps the
    constant-shape code, which Inductor runs faster on CPU and which gives the same bits as the
    symbolic-shape code (``benchmarks/meta_train_throughput.py`` times both; a test checks the
    bits).
    """

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]], dynamic: bool | None = None) -> None:
        self.fn = fn
        self.dynamic = dynamic
        self.compiled: dict[tuple, Callable[..., tuple[Tensor, ...]]] = {}
        self.failed = False

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        global _compile_warned
        # meta tensors (shape-only runs) have nothing to compile for, and a failed compile would
        # turn compiling off for the real tensors too
        if self.failed or not compile_enabled() or args[0].is_meta:
            return self.fn(*args)
        kind = tuple((a.device.type, a.dtype, tuple(a.shape[1:])) for a in args)
        compiled = self.compiled.get(kind)
        try:
            if compiled is None:
                # one compile at a time in the process: catch_warnings saves the process's warning
                # filters and restores them on leaving, so two threads compiling at once (two
                # optimizers stepping in two threads) left the ignore filter below in place for
                # good; a compiled function is published once its first call (the compile) is over
                with _compile_lock:
                    compiled = self.compiled.get(kind)
                    if compiled is None:
                        try:
                            # compiling imports parts of torch that warn of torch's own deprecated
                            # APIs (torch 2.13: torch.jit.script_method, from torch.utils.mkldnn),
                            # which under warnings as errors (``-W error``, pytest's
                            # ``filterwarnings = error``) failed the step
                            with warnings.catch_warnings():
                                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
                                compiled = torch.compile(_with_own_code(self.fn), dynamic=self.dynamic)
                                return compiled(*args)
                        finally:
                            if compiled is not None:
                                self.compiled[kind] = compiled
            return compiled(*args)
        except (torch.OutOfMemoryError, MemoryError):
            # running out of memory while the compiled code runs is the step's error, not the
            # compiler's: compiling stays on (CPU allocations that fail raise a plain RuntimeError,
            # which cannot be told from a compiler's)
            raise
        except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly
            self.failed = True
            # one warning for the toolchain, not one per function (the forward's, then the
            # backward's), and none on the CPU where the kernel's build failed and said so
            if _compile_warned or (lstm_layer_cpu.failed() and all(a.device.type == "cpu" for a in args)):
                return self.fn(*args)
            _compile_warned = True
            warnings.warn(
                f"torch.compile of {self.fn.__name__} failed ({type(err).__name__}: {str(err)[:200]}); "
                "the LSTM step runs eagerly (slower; the same math, other rounding)",
                stacklevel=3,
            )
            return self.fn(*args)


def _with_own_code(fn: Callable) -> Callable:
    """A copy of ``fn`` with a code object of its own, so its own cache of compiled variants."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__
    return copy


def cell_forward_into(gates: Tensor, bias: Tensor, c: Tensor, h_out: Tensor, c_out: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`cell_forward` writing ``h'`` and ``c'`` into ``h_out`` and ``c_out`` ``(n, H)``
    (compiled, in the same pass); returns ``(activations, tanh(c'))``."""
    activations, c_new, h_new, tanh_c = cell_forward(gates, bias, c)
    h_out.copy_(h_new)
    c_out.copy_(c_new)
    return activations, tanh_c


def cell_backward_into(
    activations: Tensor, c: Tensor, tanh_c: Tensor, grad_h: Tensor, grad_h_more: Tensor, grad_c: Tensor, grad_c_out: Tensor
) -> Tensor:
    """:func:`cell_backward` for ``h'``'s gradient ``grad_h + grad_h_more`` (from the next step and
    from the layer above), writing ``c``'s gradient into ``grad_c_out``; returns the gates'
    gradient ``(n, 4H)``."""
    d_gates, grad_c_prev = cell_backward(activations, c, tanh_c, grad_h + grad_h_more, grad_c)
    grad_c_out.copy_(grad_c_prev)
    return d_gates


#: whether a failed compile has warned in this process (shared by every :class:`_Compiled`)
_compile_warned = False
#: held while a :class:`_Compiled` compiles (its first call for a kind of input): one at a time
_compile_lock = threading.RLock()


def _after_fork_in_child() -> None:
    # a lock held by another thread of the parent at the fork (compiling) would be held in the
    # child forever, by a thread the child does not have
    global _compile_lock
    _compile_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
_cell_forward = _Compiled(cell_forward_into)
_cell_backward = _Compiled(cell_backward_into)


def _layer_forward(
    layer_input: Tensor, h: Tensor, weight: Tensor, bias: Tensor, c: Tensor, h_out: Tensor, c_out: Tensor
) -> tuple[Tensor, Tensor]:
    """One layer of :class:`LSTMStackStep`'s forward: the gates ``[x, h] @ weight^T`` ``(n, 4H)``,
    then :func:`cell_forward_into` (compiled) with ``bias`` ``(4H,)``, writing ``h'`` and ``c'``
    into ``h_out`` and ``c_out``; returns ``(activations, tanh(c'))``.

    The bias is added in the pointwise pass, not by ``addmm``, which on CPU first copies it into
    every row of the output, an extra pass over ``(n, 4H)`` (``benchmarks/lstm_step_parts.py``,
    "gate bias": product and pointwise forward 1.15-1.19x faster this way; a bitwise-equal
    meta-gradient in a one-off check). (``benchmarks/lstm_fused_gemm.py`` replaces this function
    by a candidate that fuses the two.)
    """
    gates = torch.cat((layer_input, h), dim=1) @ weight.t()
    return _cell_forward(gates, bias, c, h_out, c_out)


def linear_head(top: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A linear map of each row of ``top`` ``(n, H)`` to one number: ``(n,)``, with ``weight``
    ``(1, H)`` and ``bias`` ``(1,)`` (an ``nn.Linear(H, 1)``'s).

    A per-row sum, not a ``(n, H) x (H, 1)`` BLAS product, whose rounding of a row can depend on
    ``n``: a coordinate's step must not depend on how coordinates were batched (chunks, tensors,
    FSDP shards)."""
    return (top * weight[0]).sum(dim=1) + bias[0]


def _fused_layers(x: Tensor, h: Tensor, c: Tensor, weights: tuple[Tensor, ...]) -> list[bool]:
    """Per layer, whether it runs as :mod:`learnedopt.kernels.lstm_layer_cpu` (building it if
    need be)."""
    layers, hidden = h.shape[0], h.shape[2]
    if not (compile_enabled() and lstm_layer_cpu.applies(x, h, c, *weights, hidden=hidden)):
        return [False] * layers
    return [lstm_layer_cpu.ready(weights[3 * layer].shape[1], hidden) for layer in range(layers)]


def _stack_forward(
    x: Tensor, h: Tensor, c: Tensor, weights: tuple[Tensor, ...], save: bool, head: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor | None, list[bool], list[Tensor], list[Tensor | None], list[Tensor | None]]:
    """:class:`LSTMStackStep`'s forward: ``(h', c', head, fused, products, activations,
    tanh_cs)``, per layer whether it ran as :mod:`learnedopt.kernels.lstm_layer_cpu` and what the
    backward needs (``save=False``: no backward to come; the fused kernel then writes only ``h'``,
    ``c'``). ``head``: a linear head's ``(weight (1, H), bias (1,))``, computed by the top layer's
    fused kernel (which must apply); the head's output ``(n,)`` is None without."""
    layers = h.shape[0]
    # in the dtype of the computation (the products refuse a weight of another), as a stack
    # of the layers' results
    dtype = torch.promote_types(x.dtype, h.dtype)
    h_new = torch.empty(h.shape, dtype=dtype, device=h.device)
    c_new = torch.empty(c.shape, dtype=dtype, device=c.device)
    fused = _fused_layers(x, h, c, weights)
    if head is not None and not fused[-1]:
        raise RuntimeError("lstm_step: a fused head needs the top layer to run as the fused CPU kernel")
    products, activations, tanh_cs, head_out = [], [], [], None
    layer_input = x
    for layer in range(layers):
        weight_ih, weight_hh, bias = weights[3 * layer : 3 * layer + 3]
        # one product of [x, h] with [W_ih, W_hh] (the backward uses the same concatenated
        # W); about as fast as a product and an in-place addmm_ into its output (benchmarks/
        # lstm_step_parts.py: within 16% either way)
        weight = torch.cat((weight_ih, weight_hh), dim=1)
        # detached: whether c or bias requires grad would otherwise be a guard of the
        # compiled function, one more compilation (and, in the backward, a doubling of its
        # variants)
        c_layer, bias = c[layer].detach(), bias.detach()
        if fused[layer]:
            top_head = head if layer == layers - 1 and head is not None else (None, None)
            act, tanh_c, out = lstm_layer_cpu.lstm_layer_forward(
                layer_input, h[layer], c_layer, weight, bias, h_new[layer], c_new[layer], save=save,
                head_weight=top_head[0], head_bias=top_head[1],
            )  # fmt: skip
            head_out = out if out is not None else head_out
        else:
            act, tanh_c = _layer_forward(layer_input, h[layer], weight, bias, c_layer, h_new[layer], c_new[layer])
        products.append(weight)
        activations.append(act)
        tanh_cs.append(tanh_c)
        layer_input = h_new[layer]
    return h_new, c_new, head_out, fused, products, activations, tanh_cs


class LSTMStackStep(torch.autograd.Function):
    """One time step of every layer of a stacked LSTM: ``top, h', c' = LSTM(x, (h, c))``.

    Shapes: ``x`` ``(n, in)``; ``h`` and ``c`` ``(L, n, H)``; a linear head's ``weight`` ``(1,
    H)`` and ``bias`` ``(1,)``, or None and None; then, per layer ``l``, its ``weight_ih`` ``(4H,
    in_l)``, ``weight_hh`` ``(4H, H)`` and ``bias`` ``(4H,)`` (``bias_ih + bias_hh``). Returns
    ``top`` ``(n, H)`` (the last layer's ``h'``; with a head, the head's output ``(n,)``) and
    ``h'``, ``c'`` ``(L, n, H)``. A head needs the top layer fused (:func:`_fused_layers`): its
    kernel computes the head in the same pass, where the same per-row sum in torch operations
    (:func:`linear_head`) and its backward are passes of their own over ``(n, H)`` (a
    meta-training truncation 1.02x to 1.08x faster in five of six runs, 0.97x in one,
    ``benchmarks/results/meta_train_throughput_*head*.md``).

    All layers are one function so that the pointwise passes write each layer's ``h'`` and
    ``c'`` straight into the ``(L, n, H)`` outputs, and its backward each layer's gradient of
    ``c`` into one ``(L, n, H)`` tensor, where a function per layer needed a stack of the layers'
    states and another of their gradients per step (``benchmarks/lstm_step_parts.py``, "two-layer
    step", on an Intel Xeon host: forward and backward 1.08x faster, the same bits;
    ``meta_train_throughput.py`` there: a truncation 0.64 s before, 0.60 s after).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        h: Tensor,
        c: Tensor,
        head_weight: Tensor | None,
        head_bias: Tensor | None,
        *weights: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        head = None if head_weight is None else (head_weight, head_bias)
        h_new, c_new, head_out, fused, products, activations, tanh_cs = _stack_forward(x, h, c, weights, save=True, head=head)
        ctx.layers = h.shape[0]
        ctx.fused = fused
        # an output without a gradient (the last step's h' and c' in a truncation) comes to the
        # backward as None, which it reads as zero, not as a tensor of zeros filled for it
        ctx.set_materialize_grads(False)
        ctx.head_shapes = None if head is None else (head_weight.shape, head_bias.shape)
        ctx.save_for_backward(x, h, c, h_new, head_weight, *products, *activations, *tanh_cs)
        # a tensor of its own, not a view of h': a custom function's outputs must not alias
        return (h_new[-1].clone() if head_out is None else head_out), h_new, c_new

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_top: Tensor | None, grad_h_new: Tensor | None, grad_c_new: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            # create_graph=True: a derivative of this backward is wanted. once_differentiable alone
            # raises only in a later .backward(); torch.autograd.grad with inputs skips its error
            # node and returned second derivatives without the LSTM's share, silently wrong
            raise RuntimeError(
                "learnedopt.nn.lstm_step has a first-order backward: it cannot be differentiated "
                "twice (create_graph=True through the update rule's LSTM; e.g. a Hessian-vector "
                "product with respect to the rule's weights)"
            )
        return LSTMStackStep._first_order_backward(ctx, grad_top, grad_h_new, grad_c_new)

    @staticmethod
    @once_differentiable
    def _first_order_backward(
        ctx: FunctionCtx, grad_top: Tensor | None, grad_h_new: Tensor | None, grad_c_new: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        layers = ctx.layers
        x, h, c, h_new, head_weight, *rest = ctx.saved_tensors
        products, activations, tanh_cs = rest[:layers], rest[layers : 2 * layers], rest[2 * layers :]
        needs = ctx.needs_input_grad
        hidden = h.shape[2]
        zeros = lambda: torch.zeros_like(tanh_cs[0])  # noqa: E731 - a gradient that is None
        grad_h = torch.empty_like(h_new) if needs[1] else None
        grad_c = torch.empty_like(h_new)
        grads: list[Tensor | None] = [None] * (5 + 3 * layers)
        # the gradient of a layer's output from the layer above (for the top: from ``top``, or
        # the head's, which the top layer's kernel takes); contiguous: a column slice of a
        # product would be a new stride guard, one more compilation of the pointwise backward
        grad_head = None if ctx.head_shapes is None or grad_top is None else grad_top.contiguous()
        grad_above = None if ctx.head_shapes is not None or grad_top is None else grad_top.contiguous()
        for layer in reversed(range(layers)):
            layer_input, weight = (x if layer == 0 else h_new[layer - 1]), products[layer]
            inputs = layer_input.shape[1]
            # the gradients of the input and h as column slices of one product with the needed
            # columns of W (layer 0 of an unroll reads a detached x)
            needs_input = layer > 0 or needs[0]
            if ctx.fused[layer]:
                top_head = layer == layers - 1 and ctx.head_shapes is not None
                grad_input, grad_weight, grad_bias, grad_head_weight, grad_head_bias = lstm_layer_cpu.lstm_layer_backward(
                    layer_input,
                    h[layer],
                    c[layer].detach(),
                    weight,
                    activations[layer],
                    tanh_cs[layer],
                    None if grad_h_new is None else grad_h_new[layer],
                    grad_above,
                    None if grad_c_new is None else grad_c_new[layer],
                    grad_c[layer],
                    grad_h[layer] if needs[1] else None,
                    need_x=needs_input,
                    grad_head=grad_head if top_head else None,
                    head_weight=head_weight if top_head else None,
                )
                if top_head:
                    grads[3] = grad_head_weight.reshape(ctx.head_shapes[0]) if needs[3] else None
                    grads[4] = grad_head_bias.reshape(ctx.head_shapes[1]) if needs[4] else None
                if any(needs[5 + 3 * layer : 8 + 3 * layer]):
                    grads[5 + 3 * layer : 8 + 3 * layer] = grad_weight[:, :inputs], grad_weight[:, inputs:], grad_bias
                grad_above = grad_input
                continue
            d_gates = _cell_backward(
                activations[layer],
                c[layer].detach(),
                tanh_cs[layer],
                zeros() if grad_h_new is None else grad_h_new[layer].contiguous(),
                zeros() if grad_above is None else grad_above,
                zeros() if grad_c_new is None else grad_c_new[layer].contiguous(),
                grad_c[layer],
            )
            lo, hi = (0 if needs_input else inputs), (weight.shape[1] if needs[1] else inputs)
            grad_xh = d_gates @ weight[:, lo:hi] if lo < hi else None
            if needs[1]:
                grad_h[layer].copy_(grad_xh[:, inputs - lo :])
            if needs_input:
                grad_above = grad_xh[:, :inputs].contiguous()
            if any(needs[5 + 3 * layer : 8 + 3 * layer]):
                # all weight gradients as one product [x, h, 1]^T d_gates, (in + H + 1, 4H):
                # one pass over d_gates where d_gates^T x, d_gates^T h and a column sum take
                # three, and in this orientation (BLAS is slow on d_gates^T x with x of 2
                # columns; together 2.1x faster for layer 0, 1.4x for layer 1 on an Intel Xeon
                # host, 2.7x and 1.2x on an AMD EPYC one: benchmarks/lstm_step_parts.py,
                # results/lstm_step_parts.md and results/earlier_hosts/lstm_step_parts.md)
                ones = layer_input.new_ones(layer_input.shape[0], 1)
                grad_weight = (torch.cat((layer_input, h[layer], ones), dim=1).t() @ d_gates).t()
                grads[5 + 3 * layer : 8 + 3 * layer] = (
                    grad_weight[:, :inputs],
                    grad_weight[:, inputs : inputs + hidden],
                    grad_weight[:, -1],
                )
        grads[0] = grad_above if needs[0] else None
        grads[1] = grad_h
        grads[2] = grad_c if needs[2] else None
        return tuple(grads)


def lstm_step(
    lstm: nn.LSTM, x: Tensor, h: Tensor, c: Tensor, head: nn.Linear | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One time step of every layer of ``lstm`` (unidirectional, with biases, no projections),
    and optionally a linear head on its output.

    Args:
        lstm: the module whose weights are used.
        x: ``(n, input_size)``.
        h, c: ``(num_layers, n, hidden_size)``.
        head: an ``nn.Linear(hidden_size, 1)`` applied to each row of the output as
            :func:`linear_head` does (the fused CPU kernel computes it in the top layer's pass;
            a head whose weights a ``torch.func`` transform wraps or that carry forward-mode
            tangents, or that alone needs gradients, in torch operations).

    Returns:
        ``(top, h', c')``: the last layer's output ``(n, hidden_size)`` (with ``head``: the
        head's ``(n,)``) and the new states ``(num_layers, n, hidden_size)``, as ``lstm(x[None],
        (h, c))`` gives them.
    """
    weights = []
    for layer in range(lstm.num_layers):
        weights += [
            getattr(lstm, f"weight_ih_l{layer}"),
            getattr(lstm, f"weight_hh_l{layer}"),
            getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}"),
        ]
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (x, h, c, *weights)):
        raise RuntimeError(
            "learnedopt.nn.lstm_step (the update rules' LSTM) does not run under torch.func "
            "transforms (grad, vmap, jvp, jacrev): its hand-written backward is a classic "
            "torch.autograd.Function; use torch.autograd.grad, and a loop instead of vmap"
        )
    hidden = h.shape[2]
    if head is not None and (tuple(head.weight.shape) != (1, hidden) or head.bias is None):
        # the torch path read only the first output of a wider head, the kernel refused it
        raise ValueError(
            f"lstm_step: the head must be an nn.Linear({hidden}, 1) with a bias (one step per coordinate), got a weight of "
            f"shape {tuple(head.weight.shape)}" + (" and no bias" if head.bias is None else "")
        )
    if any(forward_ad.unpack_dual(t).tangent is not None for t in (x, h, c, *weights)):
        # the outputs would come back without a tangent: a sum with other terms silently lacks
        # the LSTM's share
        raise RuntimeError(
            "learnedopt.nn.lstm_step (the update rules' LSTM) has no forward-mode derivative "
            "(torch.autograd.forward_ad dual tensors): use torch.autograd.grad"
        )
    # a head under a torch.func transform (vmap over the head's weights alone: no wrapped tensor
    # reaches the LSTM) or with forward-mode tangents (torch.autograd.forward_ad duals, which the
    # kernel would drop) runs in torch operations, which follow both; so does a head that alone
    # needs gradients (the LSTM frozen), whose derivatives of any order torch gives, where the
    # fused step's backward is first order
    grad = torch.is_grad_enabled()
    lstm_needs_grad = grad and any(t.requires_grad for t in (x, h, c, *weights))
    fused_head = (
        head is not None
        and (lstm_needs_grad or not (grad and (head.weight.requires_grad or head.bias.requires_grad)))
        and not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (head.weight, head.bias))
        and not any(forward_ad.unpack_dual(t).tangent is not None for t in (head.weight, head.bias))
        and lstm_layer_cpu.applies(head.weight, head.bias, hidden=hidden)
        and _fused_layers(x, h, c, tuple(weights))[-1]
    )
    head_weights = (head.weight, head.bias) if fused_head else (None, None)
    if not lstm_needs_grad:  # a fused head that needs gradients is one where the LSTM does too
        h_new, c_new, head_out, *_ = _stack_forward(x, h, c, tuple(weights), save=False, head=head_weights if fused_head else None)
        top = h_new[-1].clone() if head_out is None else head_out
    else:
        top, h_new, c_new = LSTMStackStep.apply(x, h, c, *head_weights, *weights)
    if head is not None and not fused_head:
        top = linear_head(top, head.weight, head.bias)
    return top, h_new, c_new
