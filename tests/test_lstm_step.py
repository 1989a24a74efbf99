"""The hand-written LSTM step of meta-training (learnedopt.nn.lstm_step) against torch.nn.LSTM."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers import needs_compiler, run_without_hanging

from learnedopt.nn import CoordinateLSTM, MetaLSTMCell
from learnedopt.nn import lstm_step as lstm_step_module
from learnedopt.nn.lstm_step import lstm_step


def _inputs(dtype: torch.dtype, n: int = 37, inputs: int = 3, hidden: int = 5, layers: int = 2):
    lstm = torch.nn.LSTM(inputs, hidden, layers).to(dtype)
    x = torch.randn(n, inputs, dtype=dtype, requires_grad=True)
    h = torch.randn(layers, n, hidden, dtype=dtype, requires_grad=True)
    c = torch.randn(layers, n, hidden, dtype=dtype, requires_grad=True)
    return lstm, x, h, c


def _values_and_grads(step, lstm, x, h, c):
    """Outputs of one step and the gradients of a loss reading all three outputs."""
    top, h_new, c_new = step(lstm, x, h, c)
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (top, h_new, c_new)]
    loss = sum((t * w).sum() for t, w in zip((top, h_new, c_new), weights, strict=True))
    grads = torch.autograd.grad(loss, [x, h, c, *lstm.parameters()])
    return (top, h_new, c_new), grads


def _reference(lstm, x, h, c):
    top, (h_new, c_new) = lstm(x.unsqueeze(0), (h, c))
    return top[0], h_new, c_new


@pytest.mark.parametrize(
    ("dtype", "sizes", "tol", "compiled"),
    [
        (torch.float64, {}, 1e-12, False),
        (torch.float64, {}, 1e-12, True),
        (torch.float32, {"n": 300, "inputs": 2, "hidden": 20}, 1e-5, True),
    ],
    ids=["float64-eager", "float64-compiled", "float32-compiled"],
)
def test_matches_torch_lstm_values_and_gradients(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, sizes: dict, tol: float, compiled: bool
) -> None:
    """Outputs and the gradients of every input and weight agree with ``nn.LSTM``: to 1e-12 in
    float64, to float32 rounding in float32."""
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "1" if compiled else "0")
    lstm, x, h, c = _inputs(dtype, **sizes)
    values, grads = _values_and_grads(lstm_step, lstm, x, h, c)
    ref_values, ref_grads = _values_and_grads(_reference, lstm, x, h, c)
    for got, want in zip((*values, *grads), (*ref_values, *ref_grads), strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("layers", [1, 3])
def test_any_number_of_layers_matches_torch_lstm(monkeypatch: pytest.MonkeyPatch, layers: int) -> None:
    """One layer (MetaLSTMCell's input LSTM) and three: the backward's chain from each layer's
    input gradient to the layer below, and the per-layer weight gradients, agree with ``nn.LSTM``."""
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "0")
    lstm, x, h, c = _inputs(torch.float64, layers=layers)
    values, grads = _values_and_grads(lstm_step, lstm, x, h, c)
    ref_values, ref_grads = _values_and_grads(_reference, lstm, x, h, c)
    for got, want in zip((*values, *grads), (*ref_values, *ref_grads), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("x_grad", "h_grad"), [(False, True), (True, False), (False, False)])
def test_gradients_when_some_inputs_need_none(monkeypatch: pytest.MonkeyPatch, x_grad: bool, h_grad: bool) -> None:
    """The backward computes the gradients of x and h as column slices of one product: with
    either (or both) not needed, the others still match ``nn.LSTM`` (layer 0 of an unroll
    reads a detached x)."""
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "0")
    lstm, x, h, c = _inputs(torch.float64)
    x.requires_grad_(x_grad)
    h.requires_grad_(h_grad)
    wanted = [t for t in (x, h, c, *lstm.parameters()) if t.requires_grad]
    results = []
    for step in (lstm_step, _reference):
        top, h_new, c_new = step(lstm, x, h, c)
        loss = (top * 1.5).sum() + (h_new * h_new).sum() + (c_new * torch.arange(c_new.shape[-1])).sum()
        results.append(torch.autograd.grad(loss, wanted))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("trained", ["bias_hh_l1", "weight_hh_l0", "bias_ih_l0"])
def test_gradients_of_one_trainable_weight_among_frozen_ones(monkeypatch: pytest.MonkeyPatch, trained: str) -> None:
    """Only one weight of the stack requires grad (the others frozen, and no input): its
    gradient still matches ``nn.LSTM``, whichever of a layer's three weight inputs it feeds."""
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "0")
    lstm, x, h, c = _inputs(torch.float64)
    for name, param in lstm.named_parameters():
        param.requires_grad_(name == trained)
    for t in (x, h, c):
        t.requires_grad_(False)
    results = []
    for step in (lstm_step, _reference):
        top, h_new, c_new = step(lstm, x, h, c)
        loss = (top * 1.5).sum() + (h_new * h_new).sum() + (c_new * c_new).sum()
        results.append(torch.autograd.grad(loss, [getattr(lstm, trained)]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


@needs_compiler  # torch.compile's C++ code
def test_constant_and_symbolic_shape_code_agree_bitwise() -> None:
    """The step's pointwise functions compile with constant shapes first and symbolic ones after a
    shape change. A resumed run may compute a shape with the other variant than the run it
    continues did, so exact resume needs the two to agree to the bit."""
    g = torch.Generator().manual_seed(1)
    n, hidden = 1031, 20
    gates, c = torch.randn(n, 4 * hidden, generator=g), torch.randn(n, hidden, generator=g)
    bias = torch.randn(4 * hidden, generator=g)
    grad_h, grad_more, grad_c = (torch.randn(n, hidden, generator=g) for _ in range(3))
    results = []
    for dynamic in (False, True):
        torch._dynamo.reset()
        forward = torch.compile(lstm_step_module.cell_forward_into, dynamic=dynamic)
        backward = torch.compile(lstm_step_module.cell_backward_into, dynamic=dynamic)
        h_new, c_new, grad_c_prev = (torch.empty(n, hidden) for _ in range(3))
        activations, tanh_c = forward(gates, bias, c, h_new, c_new)
        d_gates = backward(activations, c, tanh_c, grad_h, grad_more, grad_c, grad_c_prev)
        results.append((activations, c_new, h_new, tanh_c, d_gates, grad_c_prev))
    torch._dynamo.reset()
    # and the compiled code writes the same values as the plain functions compute
    want = lstm_step_module.cell_forward(gates, bias, c)
    torch.testing.assert_close(results[0][:4], (want[0], want[1], want[2], want[3]))
    for constant, symbolic in zip(*results, strict=True):
        assert torch.equal(constant, symbolic)


def test_a_new_batch_size_recompiles_and_still_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "1")
    for n in (64, 101, 7):
        lstm, x, h, c = _inputs(torch.float32, n=n, inputs=2, hidden=20)
        values, grads = _values_and_grads(lstm_step, lstm, x, h, c)
        ref_values, ref_grads = _values_and_grads(_reference, lstm, x, h, c)
        for got, want in zip((*values, *grads), (*ref_values, *ref_grads), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradcheck() -> None:
    lstm, x, h, c = _inputs(torch.float64, n=4, inputs=2, hidden=3)
    weights = [p.detach().clone().requires_grad_() for p in lstm.parameters()]

    def fn(x, h, c, *weights):
        return lstm_step(_Bound(lstm, weights), x, h, c)

    assert torch.autograd.gradcheck(fn, (x, h, c, *weights))


class _Bound:
    """An ``nn.LSTM`` look-alike whose weights are given tensors (for gradcheck)."""

    def __init__(self, lstm: torch.nn.LSTM, weights) -> None:
        self.num_layers = lstm.num_layers
        for (name, _), w in zip(lstm.named_parameters(), weights, strict=True):
            setattr(self, name, w)


def test_differentiating_the_backward_again_raises() -> None:
    lstm, x, h, c = _inputs(torch.float64)
    x.requires_grad_(False)
    top, _, _ = lstm_step(lstm, x, h, c)
    weight = torch.randn(top.shape, dtype=top.dtype, requires_grad=True)  # the incoming gradient has a graph
    with pytest.raises(RuntimeError, match="first-order backward: it cannot be differentiated twice"):
        torch.autograd.grad((top * weight).sum(), [h], create_graph=True)


def test_a_hessian_vector_product_through_a_rule_raises_instead_of_dropping_the_lstm() -> None:
    """torch.autograd.grad with inputs skipped once_differentiable's error node: the second
    derivative came back without the LSTM's share (as large an error as the value)."""
    from learnedopt.nn import CoordinateLSTM

    rule = CoordinateLSTM(hidden_size=3).double()
    state = rule.init_state(4, dtype=torch.float64, device="cpu")
    grad = torch.randn(4, dtype=torch.float64)
    params = list(rule.parameters())
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(rule(grad, grad, state)[0].square().sum(), params, create_graph=True)
    first = torch.autograd.grad(rule(grad, grad, state)[0].square().sum(), params)  # first order works
    assert all(torch.isfinite(g).all() for g in first)


def test_torch_func_transforms_raise_a_clear_error() -> None:
    from torch.func import functional_call, vmap

    from learnedopt.nn import CoordinateLSTM

    rule = CoordinateLSTM(hidden_size=4)
    state = rule.init_state(5, dtype=torch.float32, device="cpu")
    params = {k: v.detach() for k, v in rule.named_parameters()}
    loss = lambda p: functional_call(rule, p, (torch.randn(5), torch.randn(5), state))[0].sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="does not run under torch.func transforms"):
        torch.func.grad(loss)(params)
    batched = {k: v.expand(2, *v.shape) for k, v in state.items()}
    with pytest.raises(RuntimeError, match="does not run under torch.func transforms"):
        vmap(lambda g, s: rule(g, g, s)[0])(torch.randn(2, 5), batched)


@pytest.mark.parametrize(("head", "message"), [
    (torch.nn.Linear(8, 2), r"nn.Linear\(8, 1\) with a bias .*got a weight of shape \(2, 8\)$"),
    (torch.nn.Linear(8, 1, bias=False), r"got a weight of shape \(1, 8\) and no bias"),
    (torch.nn.Linear(4, 1), r"got a weight of shape \(1, 4\)"),
])  # fmt: skip
def test_a_head_other_than_one_output_with_a_bias_is_refused(head: torch.nn.Linear, message: str) -> None:
    """A wider head had its first output used in torch and was refused by the kernel; one
    without a bias raised AttributeError: both paths now refuse them in one line."""
    lstm = torch.nn.LSTM(3, 8, 2)
    x, h, c = torch.randn(5, 3), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=message):
        lstm_step(lstm, x, h, c, head=head)


def test_a_head_that_alone_needs_gradients_has_second_derivatives(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the LSTM frozen and only the head trainable, the head runs in torch operations, so a
    second derivative through it works (the fused step's backward is first order: with the head
    in the kernel it raised), equal to the kernel-off path's."""
    lstm, head = torch.nn.LSTM(3, 8, 2).requires_grad_(False), torch.nn.Linear(8, 1)
    x, h, c = torch.randn(11, 3), torch.randn(2, 11, 8), torch.randn(2, 11, 8)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("LEARNEDOPT_CPU_KERNEL", switch)
        out = lstm_step(lstm, x, h, c, head=head)[0]
        (g,) = torch.autograd.grad((out**3).sum(), head.weight, create_graph=True)
        results.append(torch.autograd.grad(g.sum(), head.weight)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_vmap_over_only_the_heads_weights_runs_the_head_in_torch() -> None:
    """The LSTM's tensors outside the transform (no wrapped tensor reaches the LSTM): the head,
    batched by ``vmap``, must not go to the fused kernel (which read its missing storage: "Cannot
    access data pointer"); it runs in torch operations, as before the kernel took the head."""
    from torch.func import functional_call, vmap

    from learnedopt.nn import CoordinateLSTM

    rule = CoordinateLSTM(hidden_size=8).requires_grad_(False)
    x, h, c = torch.randn(9, rule.config.num_inputs), torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    head_weights = torch.randn(3, 1, 8)

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rule = rule

        def forward(self) -> torch.Tensor:
            return self.rule.step_from_features(x, h, c)[0]

    steps = vmap(lambda w: functional_call(Step(), {"rule.head.weight": w}, ()))(head_weights)
    for weight, got in zip(head_weights, steps, strict=True):
        rule.head.weight.copy_(weight)
        torch.testing.assert_close(got, rule.step_from_features(x, h, c)[0], rtol=1e-6, atol=1e-6)


def test_forward_mode_tangents_of_the_heads_weights_are_kept() -> None:
    """A head weight that is a forward-mode dual (``torch.autograd.forward_ad``), the LSTM frozen:
    the step's tangent is the head's (the fused kernel read the primal only and returned no
    tangent, silently; the head in torch operations keeps it, as before the kernel took it)."""
    import torch.autograd.forward_ad as fwAD

    from learnedopt.nn import CoordinateLSTM

    rule = CoordinateLSTM(hidden_size=8).requires_grad_(False)
    x, h, c = torch.randn(9, rule.config.num_inputs), torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    weight, tangent = rule.head.weight.detach().clone(), torch.randn(1, 8)
    with fwAD.dual_level():
        del rule.head.weight
        rule.head.weight = fwAD.make_dual(weight, tangent)
        got = fwAD.unpack_dual(rule.step_from_features(x, h, c)[0]).tangent
    assert got is not None
    top = rule.lstm(x[None], (h, c))[0][0]
    torch.testing.assert_close(got, (top * tangent[0]).sum(1) * rule.config.output_scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dual", ["x", "weight"])
def test_forward_mode_tangents_into_the_lstm_raise(dual: str) -> None:
    """A forward-mode dual (``torch.autograd.forward_ad``) among the LSTM's inputs or weights:
    the step's outputs came back without a tangent (kernel on or off), silently."""
    import torch.autograd.forward_ad as fwAD

    lstm, x, h, c = _inputs(torch.float32, hidden=8)
    lstm.requires_grad_(False)
    x, h, c = x.detach(), h.detach(), c.detach()
    with fwAD.dual_level():
        if dual == "x":
            x = fwAD.make_dual(x, torch.randn_like(x))
        else:
            weight = lstm.weight_hh_l0.detach().clone()
            del lstm.weight_hh_l0
            lstm.weight_hh_l0 = fwAD.make_dual(weight, torch.randn_like(weight))
        with pytest.raises(RuntimeError, match="no forward-mode derivative"):
            lstm_step(lstm, x, h, c)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "1")

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    fresh = lstm_step_module._Compiled(lstm_step_module.cell_forward_into)
    monkeypatch.setattr(lstm_step_module, "_cell_forward", fresh)
    # the backward's too: the module's own would stay eager ("failed") for the rest of the process
    monkeypatch.setattr(lstm_step_module, "_cell_backward", lstm_step_module._Compiled(lstm_step_module.cell_backward_into))
    monkeypatch.setattr(lstm_step_module, "_compile_warned", False)
    monkeypatch.setattr(lstm_step_module.lstm_layer_cpu, "_failed", False)  # else the kernel has warned already
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    lstm, x, h, c = _inputs(torch.float64)
    with pytest.warns(UserWarning) as caught:  # one warning for the process: the forward's, not the backward's too
        values, _ = _values_and_grads(lstm_step, lstm, x, h, c)
    assert [str(w.message).split(" (")[0] for w in caught] == ["torch.compile of cell_forward_into failed"]
    assert all("no C++ compiler" in str(w.message) for w in caught)
    ref_values, _ = _values_and_grads(_reference, lstm, x, h, c)
    for got, want in zip(values, ref_values, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert fresh.failed and lstm_step_module._cell_backward.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the eager path is kept
        _values_and_grads(lstm_step, lstm, x, h, c)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_out_of_memory_in_compiled_code_is_raised_and_compiling_stays_on(monkeypatch: pytest.MonkeyPatch, error: type) -> None:
    """Running out of memory while the compiled pointwise function runs (a transient shortage, as
    in a later chunk of a step on a GPU) is the step's error, raised as it is, not a compiler's
    failure: it was taken for one, with a warning that torch.compile had failed, the function run
    again eagerly, and compiling switched off for the rest of the process (slower, other rounding)."""
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "1")
    monkeypatch.setattr(lstm_step_module, "_compile_warned", False)
    calls = []

    def fake_compile(fn, **kwargs):
        def compiled(*args):
            calls.append(len(calls))
            if len(calls) == 1:
                raise error("simulated out of memory")
            return fn(*args)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    fresh = lstm_step_module._Compiled(lambda x: (x + 1,))
    x = torch.zeros(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(error, match="simulated out of memory"):
            fresh(x)
        assert not fresh.failed
        assert torch.equal(fresh(x)[0], x + 1)
    assert calls == [0, 1]  # both calls ran the compiled function, none an eager one


def test_compiling_hides_only_torchs_own_deprecation_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a function is compiled (``torch.compile``, and its first call, where Dynamo and
    Inductor run) the DeprecationWarnings of torch's modules are ignored; a warning of another
    kind, or a DeprecationWarning of another module, still reaches the user, and later calls
    hide nothing."""
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "1")

    def warn(category, module):
        warnings.warn_explicit(f"{category.__name__} of {module}", category, "file.py", 1, module=module)

    def fake_compile(fn, **kwargs):
        warn(DeprecationWarning, "torch.utils.mkldnn")  # as torch.jit.script_method's, on import

        def compiled(*args):
            warn(DeprecationWarning, "torch._dynamo.fake")  # while the first call compiles
            warn(UserWarning, "torch._inductor.fake")
            warn(DeprecationWarning, "user_code")
            return fn(*args)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    fresh = lstm_step_module._Compiled(lambda x: (x + 1,))
    x = torch.zeros(2, 3)
    for expected in (["UserWarning of torch._inductor.fake", "DeprecationWarning of user_code"],
                     ["DeprecationWarning of torch._dynamo.fake", "UserWarning of torch._inductor.fake",
                      "DeprecationWarning of user_code"]):  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert torch.equal(fresh(x)[0], x + 1)
        assert [str(w.message) for w in caught] == expected
    assert not fresh.failed


def test_two_threads_compiling_at_once_leave_the_warning_filters_as_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads whose first calls compile at once (two optimizers stepping in two threads,
    float64 models) each entered ``warnings.catch_warnings``, which saves and restores the
    process's filters: where the first to enter left first, the second restored the filters it
    had found, the first's "ignore torch's DeprecationWarnings" among them, for good. Compiles
    are one at a time: the filters end as they were, and both results are right."""
    import threading
    import time

    monkeypatch.setenv("LEARNEDOPT_COMPILE", "1")
    compiling, both = [], threading.Event()

    def fake_compile(fn, **kwargs):
        # the first to compile waits (a second at most) for the other to compile meanwhile, as
        # two real compiles overlap for seconds; it leaves first, the other 0.2 s later
        compiling.append(threading.get_ident())
        first = len(compiling) == 1
        if first:
            both.wait(timeout=1.0)
        else:
            both.set()

        def compiled(*args):
            if not first:
                time.sleep(0.2)
            return fn(*args)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    fresh = lstm_step_module._Compiled(lambda x: (x + 1,))
    before = list(warnings.filters)
    results: dict[int, torch.Tensor] = {}
    start = threading.Barrier(2)

    def call(number: int) -> None:
        start.wait()
        results[number] = fresh(torch.full((2, 3), float(number)))[0]

    threads = [threading.Thread(target=call, args=(number,)) for number in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings.filters == before
    assert [results[number].tolist() for number in (1, 2)] == [[[2.0] * 3] * 2, [[3.0] * 3] * 2]
    assert not fresh.failed


_FORKED_WHILE_COMPILING = """
import os, sys, threading
import torch
from learnedopt.nn import lstm_step as s
held, release = threading.Event(), threading.Event()
def compiling():  # another thread compiles when the main thread forks
    with s._compile_lock:
        held.set()
        release.wait()
thread = threading.Thread(target=compiling)
thread.start()
held.wait()
pid = os.fork()
if pid == 0:
    torch.compile = lambda fn, **kwargs: fn
    ok = s._Compiled(lambda x: (x + 1,))(torch.zeros(2))[0].tolist() == [1.0, 1.0]
    os._exit(0 if ok else 3)
release.set()
thread.join()
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_child_forked_while_a_thread_compiles_compiles_its_own() -> None:
    """A fork while another thread of the parent holds the compile lock (a DataLoader worker
    forked while a thread's first step compiles): the child's copy of the lock would stay held
    by a thread it does not have, and its first compile wait forever; the child has a lock of
    its own."""
    run_without_hanging(_FORKED_WHILE_COMPILING, {"LEARNEDOPT_COMPILE": "1"}, "the forked child hung on the compile lock")


@pytest.mark.parametrize("kind", ["CoordinateLSTM", "MetaLSTMCell"])
def test_no_grad_step_and_meta_training_step_are_the_same_bits(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """The optimizer's no-grad step and meta-training (weights requiring grad) both go through
    lstm_step, so the optimizer applies exactly the update the rule was meta-trained with: step
    and new states equal to the bit, compiled, at a size that is not a multiple of a vector."""
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "1")
    calls = []
    original = lstm_step_module._stack_forward
    monkeypatch.setattr(lstm_step_module, "_stack_forward", lambda *a, **k: calls.append(k["save"]) or original(*a, **k))
    rule = CoordinateLSTM(momentum_decays=(0.9,), rms_decays=(0.99,)) if kind == "CoordinateLSTM" else MetaLSTMCell()
    n = 3001  # not a multiple of a vector width
    grad, param, loss = torch.randn(n), torch.randn(n), torch.tensor(0.7)
    state = rule.init_state(n, dtype=torch.float32, device="cpu")
    state["h"].normal_()
    state["c"].normal_()
    with torch.no_grad():
        step_no_grad, state_no_grad = rule(grad, param, state, loss)
    step_grad, state_grad = rule(grad, param, state, loss)
    assert calls == [False, True]  # the no-grad step saves nothing for a backward
    assert step_grad.requires_grad
    assert torch.equal(step_grad.detach(), step_no_grad)
    for key in ("h", "c"):
        assert torch.equal(state_grad[key].detach(), state_no_grad[key]), key


def test_each_dtype_and_hidden_size_has_its_own_compiled_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo keeps a bounded number of compiled variants per code object and then runs the
    function eagerly (slower, other rounding). Rules of many hidden sizes and dtypes in one
    process must each keep compiled code: here with the bound lowered to 2 and hitting it made
    an error, six kinds of input (three hidden sizes, two dtypes), each at two batch sizes."""
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "1")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    forward = lstm_step_module._Compiled(lstm_step_module.cell_forward)
    kinds = [(dtype, hidden) for dtype in (torch.float32, torch.float64) for hidden in (3, 5, 7)]
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True), warnings.catch_warnings():
        warnings.simplefilter("error")  # _Compiled warns if compiling fails
        for dtype, hidden in kinds:
            for n in (4, 9):
                gates, c = torch.randn(n, 4 * hidden, dtype=dtype), torch.randn(n, hidden, dtype=dtype)
                bias = torch.randn(4 * hidden, dtype=dtype)
                want = lstm_step_module.cell_forward(gates, bias, c)
                for got, want in zip(forward(gates, bias, c), want, strict=True):
                    torch.testing.assert_close(got, want)
        assert not forward.failed
        assert len(forward.compiled) == len(kinds)
        # the same calls through one compiled function hit the bound: the setting above would catch it
        single = real_compile(lstm_step_module.cell_forward, backend="eager")
        with pytest.raises(Exception, match="recompile_limit"):
            for dtype, hidden in kinds:
                single(torch.randn(4, 4 * hidden, dtype=dtype), torch.zeros(4 * hidden, dtype=dtype),
                       torch.randn(4, hidden, dtype=dtype))  # fmt: skip
    torch._dynamo.reset()


def test_top_is_not_a_view_of_the_new_hidden_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "0")
    lstm, x, h, c = _inputs(torch.float64, n=4)
    with torch.no_grad():
        top, h_new, _ = lstm_step(lstm, x, h, c)
        before = h_new.clone()
        assert torch.equal(top, h_new[-1])
        top.add_(1.0)
    assert torch.equal(h_new, before)


@pytest.mark.parametrize(("value", "compiled"), [("0", False), ("false", False), ("OFF", False), ("no", False),
                                                 ("1", True), ("true", True), ("", True)])  # fmt: skip
def test_compile_switch_reads_the_usual_spellings(monkeypatch: pytest.MonkeyPatch, value: str, compiled: bool) -> None:
    """``LEARNEDOPT_COMPILE=false`` compiled: only ``0`` turned it off."""
    from learnedopt.nn.lstm_step import compile_enabled

    monkeypatch.setenv("LEARNEDOPT_COMPILE", value)
    assert compile_enabled() is compiled


def test_compile_switch_refuses_an_unknown_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from learnedopt.nn.lstm_step import compile_enabled

    monkeypatch.setenv("LEARNEDOPT_COMPILE", "eager")
    with pytest.raises(ValueError, match="LEARNEDOPT_COMPILE='eager': use 1"):
        compile_enabled()


@needs_compiler  # torch.compile's C++ code; the library's own fallback warns (an error under -W error)
def test_steps_and_meta_training_run_with_warnings_as_errors() -> None:
    # a fresh process, where the first compile imports the parts of torch that warn of torch's own
    # deprecations: under `-W error` (pytest's `filterwarnings = error`) that failed every step
    import os
    import subprocess
    import sys

    script = """
import torch
from learnedopt import LSTMOptimizer, MetaLSTMOptimizer
from learnedopt.meta import generator_for, make_family, num_coordinates, unroll
from learnedopt.nn import CoordinateLSTM
model = torch.nn.Linear(4, 2)
for kind in (LSTMOptimizer, MetaLSTMOptimizer):
    optimizer = kind(model.parameters())
    for _ in range(2):
        optimizer.zero_grad()
        loss = model(torch.randn(3, 4)).square().mean()
        loss.backward()
        optimizer.step(loss=loss) if kind is MetaLSTMOptimizer else optimizer.step()
rule = CoordinateLSTM()
g = generator_for(0, 1, 1)
tasks = make_family("quadratic", split="meta_train").sample_batch(2, g)
params = tasks.init_params(g)
state = rule.init_state(num_coordinates(params), dtype=torch.float32, device="cpu")
unroll(rule, tasks, params, state, 2).meta_loss.backward()
"""
    env = {**os.environ, "LEARNEDOPT_COMPILE": "1"}
    result = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
