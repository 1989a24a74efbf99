"""The batched (flat, chunked) path against the per-tensor reference."""

import copy
import os
import warnings

import pytest
import torch
from helpers import OPTIMIZERS, assert_same_params_and_states, make_mixed_params, make_params, param_specs, set_grads, step, step_alike
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learnedopt import LSTMOptimizer


def run(kind, shapes, foreach, *, steps=4, chunk=None, noncontiguous=(), skip_schedule=None, **options):
    params = make_params(shapes, noncontiguous=noncontiguous)
    opt = OPTIMIZERS[kind](params, foreach=foreach, state_dtype=torch.float64, **options)
    if chunk is not None:
        opt.chunk = chunk
    for t in range(steps):
        skip = skip_schedule(t) if skip_schedule else ()
        set_grads(params, seed=100 + t, skip=skip)
        step(opt, 0.5 + t)
    return params, opt


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("chunk", [7, 2048])
def test_batched_matches_reference_float64(kind, chunk) -> None:
    shapes = [(5, 3), (0,), (1,), (17,), (4, 0, 2), (33, 2), (2, 2, 2)]
    opts = dict(steps=5, noncontiguous=(5,))
    ref_params, ref = run(kind, shapes, False, **opts)
    params, opt = run(kind, shapes, True, chunk=chunk, **opts)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    for p, q in zip(params, ref_params):
        for name in opt.rule.state_spec():
            torch.testing.assert_close(opt.state[p][name], ref.state[q][name], rtol=1e-12, atol=1e-12)
        assert opt.state[p]["step"] == ref.state[q]["step"] == 5


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_batched_matches_reference_when_some_grads_are_none(kind) -> None:
    # parameter 1 only gets a gradient from step 2 on, parameter 3 only on even steps
    schedule = lambda t: ({1} if t < 2 else set()) | ({3} if t % 2 else set())
    shapes = [(6,), (4, 4), (9,), (3,), (10,)]
    ref_params, ref = run(kind, shapes, False, steps=6, skip_schedule=schedule)
    params, opt = run(kind, shapes, True, steps=6, chunk=5, skip_schedule=schedule)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert opt.state[params[1]]["step"] == 4 and opt.state[params[3]]["step"] == 3


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_batched_path_leaves_a_skipped_one_element_tensor_between_two_others(kind) -> None:
    """The tensors on either side of a one-coordinate gap in the flat buffers are two runs, each
    updating only its own coordinates."""
    schedule = lambda t: {1} if t % 2 else set()
    shapes = [(4,), (1,), (5,)]
    ref_params, ref = run(kind, shapes, False, steps=4, skip_schedule=schedule)
    params, opt = run(kind, shapes, True, steps=4, skip_schedule=schedule)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        for name in opt.rule.state_spec():
            torch.testing.assert_close(opt.state[p][name], ref.state[q][name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("chunk", 0, r"^LSTMOptimizer.chunk must be an integer >= 1, got 0$"),
        ("chunk", 2.5, r"^LSTMOptimizer.chunk must be an integer >= 1, got 2.5$"),
        ("group_batch_limit", -1, r"^LSTMOptimizer.group_batch_limit must be an integer >= 0 \(0: no sharing\), got -1$"),
        ("group_batch_limit", "8", r"^LSTMOptimizer.group_batch_limit must be an integer >= 0 \(0: no sharing\), got '8'$"),
    ],
)
def test_a_bad_chunk_or_group_batch_limit_is_refused_before_anything_changes(name, value, message) -> None:
    """The plain attributes ``chunk`` and ``group_batch_limit`` were checked only inside the
    update (a chunk below one), after the groups before it (a fused one) had stepped; a float
    chunk or a negative limit failed in torch or ran as no sharing. Both are checked first now."""
    params = make_params([(3,), (2,)], dtype=torch.float32)
    opt = LSTMOptimizer([{"params": params[:1]}, {"params": params[1:]}])
    set_grads(params, seed=0)
    opt.step()
    before = [p.detach().clone() for p in params]
    states = {k: v.clone() for k, v in opt.state[params[0]].items()}
    setattr(opt, name, value)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in states.items())


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_states_swapped_between_parameters_are_the_ones_stepped(kind) -> None:
    """The flat buffers are rebuilt when a parameter's state entry no longer views its own slice
    (here: two parameters' states exchanged), not stepped from the slices they held before."""
    params = make_params([(3,), (3,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params)
    set_grads(params, seed=0)
    step(opt)
    a, b = params
    saved = opt.state_dict()
    saved["state"][0], saved["state"][1] = saved["state"][1], saved["state"][0]
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    ref = OPTIMIZERS[kind](ref_params)
    ref.load_state_dict(saved)
    opt.state[a], opt.state[b] = opt.state[b], opt.state[a]
    for ps in (params, ref_params):
        set_grads(ps, seed=1)
    step(opt)
    step(ref)
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["h"], ref.state[q]["h"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple), min_size=1, max_size=5),
    chunk=st.integers(1, 40),
    maximize=st.booleans(),
    lr=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_property_batched_equals_reference(shapes, chunk, maximize, lr) -> None:
    ref_params, _ = run("lstm", shapes, False, steps=2, maximize=maximize, lr=lr)
    params, _ = run("lstm", shapes, True, steps=2, chunk=chunk, maximize=maximize, lr=lr)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_mixed_dtypes_in_one_group_match_reference() -> None:
    shapes = [(8,), (5, 2), (7,)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    results = []
    for foreach in (False, True):
        params = [p.to(d).detach().requires_grad_(True) for p, d in zip(make_params(shapes), dtypes)]
        opt = OPTIMIZERS["lstm"](params, foreach=foreach)
        for t in range(3):
            set_grads(params, seed=t)
            opt.step()
        results.append(params)
    for p, q in zip(*results):
        assert p.dtype == q.dtype
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_float64_copy_of_the_rule_follows_in_place_weight_changes() -> None:
    params = make_params([(5,)])
    opt = OPTIMIZERS["lstm"](params, state_dtype=torch.float64)
    set_grads(params, 0)
    opt.step()
    with torch.no_grad():
        # the head now ignores the LSTM: every step moves each coordinate by output_scale * 1
        opt.rule.head.weight.zero_()
        opt.rule.head.bias.fill_(1.0)
    before = params[0].detach().clone()
    set_grads(params, 1)
    opt.step()
    step = opt.rule.config.output_scale * opt.param_groups[0]["lr"]
    torch.testing.assert_close(params[0] - before, torch.full_like(before, step))


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_float32_step_of_a_coordinate_does_not_depend_on_the_chunking(kind) -> None:
    """Bit for bit, in float32 with the default (compiled) LSTM step: the promise that lets a
    sharded (FSDP) step equal the unsharded one. Chunks of 1 to 4,096 coordinates, so the
    compiled pointwise code runs with constant and with symbolic batch sizes, and the gate
    products with 64 rows (padded) to thousands."""
    shapes = [(1,), (7,), (64,), (30, 40), (1928,)]
    results = []
    for chunk in (4096, 1, 64, 100, 777):
        params = make_params(shapes, dtype=torch.float32)
        opt = OPTIMIZERS[kind](params, state_dtype=torch.float32)
        opt.chunk = chunk
        for t in range(3):
            set_grads(params, seed=100 + t)
            step(opt, 0.5 + t)
        results.append([p.detach().clone() for p in params])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_flat_update_rejects_overlapping_offsets() -> None:
    from learnedopt.optim.update import flat_update_

    params = make_params([(3,), (2,)], dtype=torch.float32)
    opt = OPTIMIZERS["lstm"](params)
    buffers = opt.rule.init_state(5, dtype=torch.float32, device="cpu")
    before = [p.detach().clone() for p in params]
    grads = [torch.ones_like(p) for p in params]
    with pytest.raises(ValueError, match="increasing, non-overlapping offset order"), torch.no_grad():
        # the second tensor would start inside the first one's coordinates [0, 3)
        flat_update_(opt.rule, params, grads, buffers, [0, 2], lr=1.0, loss=None, maximize=False, compute_dtype=torch.float32)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_auto_backend_falls_back_to_torch_once_the_fused_update_fails(monkeypatch) -> None:
    """``backend="auto"`` never fails where the torch path works: a fused update that raises
    (a kernel that fails to compile) gives a warning and the PyTorch step, and later steps
    do not try the fused path again. Forced on CPU: the fused path is made to look usable (as
    on a validated CUDA device) and its update to raise."""
    import learnedopt.optim.learned_optimizer as lo
    from learnedopt import kernels

    monkeypatch.setattr(kernels, "FUSED_UPDATES_AVAILABLE", True)
    monkeypatch.setattr(kernels, "GPU_VALIDATED", True)
    original = lo.LearnedOptimizer._use_fused
    monkeypatch.setattr(
        lo.LearnedOptimizer, "_use_fused", lambda self, backend, device, *a: original(self, backend, torch.device("cuda"), *a)
    )
    monkeypatch.setattr(lo.LearnedOptimizer, "_fused_weights", lambda self, device: None)
    # the kernel's block size, read from the kernel module, would import Triton, absent on macOS
    monkeypatch.setattr(lo, "_fused_block", lambda: 64)
    calls = []

    def failing_fused_update(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("kernel failed to compile")

    monkeypatch.setattr(lo, "fused_update_", failing_fused_update)
    params = make_params([(3,), (2, 2)], dtype=torch.float32)
    reference = [p.detach().clone().requires_grad_(True) for p in params]
    opt = OPTIMIZERS["lstm"](params, backend="auto")
    ref = OPTIMIZERS["lstm"](reference, backend="torch")
    for t in range(2):
        set_grads(params, t)
        set_grads(reference, t)
        if t == 0:
            with pytest.warns(UserWarning, match="fused Triton update failed .*kernel failed to compile.*using the PyTorch path"):
                opt.step()
        else:
            opt.step()
        ref.step()
        assert all(torch.equal(p, r) for p, r in zip(params, reference, strict=True))
    assert len(calls) == 1, "after one failure the fused path is not tried again"


def validated_kernel_on_cpu(monkeypatch):
    """backend='auto' as on CUDA with a validated kernel, forced on CPU through Triton's
    interpreter: returns the kernel module, whose launcher a test may wrap."""
    import learnedopt.optim.learned_optimizer as lo
    from learnedopt import kernels

    if not kernels.FUSED_UPDATES_AVAILABLE or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton in interpreter mode")
    import learnedopt.kernels.coordinate_lstm_step as kernel

    monkeypatch.setattr(kernels, "GPU_VALIDATED", True)
    original = lo.LearnedOptimizer._use_fused
    monkeypatch.setattr(
        lo.LearnedOptimizer, "_use_fused", lambda self, backend, device, *a: original(self, backend, torch.device("cuda"), *a)
    )
    return kernel


def kernel_launch_fails(monkeypatch, failing: int, error: Exception | None = None) -> list[int]:  # noqa: ANN001 - pytest's fixture
    """The real kernel in the interpreter (as :func:`validated_kernel_on_cpu`), whose launch
    number ``failing`` raises ``error`` (by default as a variant that fails to compile); returns
    the list that counts the launches."""
    kernel = validated_kernel_on_cpu(monkeypatch)
    real, launches = kernel.coordinate_lstm_step_, []

    def one_launch_fails(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the kernel's
        launches.append(1)
        if len(launches) == failing:
            raise RuntimeError("this variant failed to compile") if error is None else error
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "coordinate_lstm_step_", one_launch_fails)
    return launches


def test_auto_fallback_after_a_part_way_kernel_failure_does_not_step_a_tensor_twice(monkeypatch) -> None:
    """A kernel variant that fails to compile for a later run of the group (Triton compiles one
    per dtype and alignment) leaves the runs before it updated: the fallback must update only the
    rest (it re-ran the whole group, so the first run's parameters and states moved twice). Forced
    on CPU as above, with the real kernel in the interpreter failing on its second launch."""
    launches = kernel_launch_fails(monkeypatch, 3)
    results = {}
    for backend in ("auto", "torch"):
        params = make_params([(5,), (3,), (4,)], dtype=torch.float32)
        opt = OPTIMIZERS["lstm"](params, "l2l-2016", backend=backend)
        for t in range(2):  # step 2 skips the middle tensor: two runs, the kernel fails on the second
            set_grads(params, t, skip=(1,) if t == 1 else ())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
        results[backend] = params, opt
    assert len(launches) == 3
    (fused, fopt), (ref, ropt) = results["auto"], results["torch"]
    for p, q in zip(fused, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
        if q in ropt.state:
            torch.testing.assert_close(fopt.state[p]["h"], ropt.state[q]["h"], rtol=2e-5, atol=2e-6)


def test_explicit_triton_finishes_a_step_whose_kernel_failed_part_way_then_raises(monkeypatch) -> None:
    """``backend="triton"`` raised from inside the group, leaving the runs before the failing one
    stepped and the rest (and any later group) not, with no step counted. It now finishes the step
    on the PyTorch path, so the optimizer stays a consistent one-step-later state, then raises."""
    launches = kernel_launch_fails(monkeypatch, 4)  # step 1 launches 2: one per group
    results = {}
    for backend in ("triton", "torch"):
        params = make_params([(5,), (3,), (4,), (2,)], dtype=torch.float32)
        groups = [{"params": params[:3]}, {"params": params[3:]}]
        opt = OPTIMIZERS["lstm"](groups, "l2l-2016", backend=backend)
        for t in range(2):  # step 2 skips the middle tensor of group 0: the kernel fails on its second run
            set_grads(params, t, skip=(1,) if t == 1 else ())
            if backend == "triton" and t == 1:
                with pytest.raises(RuntimeError, match=r"^backend='triton': the fused kernel failed .*variant failed to compile.* after this step had begun; it was finished on the PyTorch path"):
                    opt.step()
            else:
                opt.step()
        results[backend] = params, opt
    assert len(launches) == 5  # the later group still ran its kernel
    (fused, fopt), (ref, ropt) = results["triton"], results["torch"]
    for p, q in zip(fused, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
        assert float(fopt.state[p]["step"]) == float(ropt.state[q]["step"])
        torch.testing.assert_close(fopt.state[p]["h"], ropt.state[q]["h"], rtol=2e-5, atol=2e-6)


def test_explicit_triton_names_the_first_kernel_failure_of_a_step(monkeypatch) -> None:
    """Three groups, the kernels of the last two failing after the first group's ran: the step
    finishes, and the error is the first failure, chained as its cause."""
    kernel = validated_kernel_on_cpu(monkeypatch)
    real, launches = kernel.coordinate_lstm_step_, []

    def later_launches_fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the kernel's
        launches.append(1)
        if len(launches) > 1:
            raise RuntimeError(f"launch {len(launches)} failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "coordinate_lstm_step_", later_launches_fail)
    params = make_params([(5,), (2,), (3,)], dtype=torch.float32)
    opt = OPTIMIZERS["lstm"]([{"params": [p]} for p in params], "l2l-2016", backend="triton")
    set_grads(params, 0)
    with pytest.raises(RuntimeError, match=r"^backend='triton': the fused kernel failed \(RuntimeError\('launch 2 failed'\)\) after") as raised:
        opt.step()
    assert len(launches) == 3 and str(raised.value.__cause__) == "launch 2 failed"
    assert all(float(opt.state[p]["step"]) == 1.0 for p in params)


def test_an_explicit_triton_failure_leaves_auto_groups_on_the_kernel(monkeypatch) -> None:
    """A failure under backend='triton' raises rather than falling back for good: a group of the
    same optimizer on backend='auto' keeps its kernel, this step and the next, and so does the
    'triton' group on the next step."""
    launches = kernel_launch_fails(monkeypatch, 2)
    params = make_params([(5,), (2,)], dtype=torch.float32)
    opt = OPTIMIZERS["lstm"]([{"params": params[:1], "backend": "auto"}, {"params": params[1:], "backend": "triton"}],
                             "l2l-2016")  # fmt: skip
    for t in range(2):
        set_grads(params, t)
        if t == 0:
            with pytest.raises(RuntimeError, match=r"^backend='triton': the fused kernel failed"):
                opt.step()
        else:
            opt.step()
    assert len(launches) == 4


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("simulated out of memory"), MemoryError("simulated out of memory")])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_running_out_of_memory_in_the_kernel_before_anything_changed_raises_it_as_it_is(monkeypatch, backend, error) -> None:
    """An out-of-memory error at the kernel's first launch is the step's error, not the
    kernel's: ``backend="triton"`` raised a plain RuntimeError ("the fused kernel failed") in its
    place, so ``except torch.OutOfMemoryError`` missed it, and ``"auto"`` warned that the kernel
    had failed and left it off for good. Nothing was changed, so the step can be retried, on the kernel."""
    launches = kernel_launch_fails(monkeypatch, 1, error)
    params = make_params([(5,), (3,)], dtype=torch.float32)
    reference = [p.detach().clone().requires_grad_(True) for p in params]
    opt = OPTIMIZERS["lstm"](params, "l2l-2016", backend=backend)
    ref = OPTIMIZERS["lstm"](reference, "l2l-2016", backend="torch")
    set_grads(params, 0)
    set_grads(reference, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error)) as raised:
            opt.step()
        assert raised.value is error
        assert all(float(opt.state[p]["step"]) == 0 for p in params if p in opt.state)
        opt.step()  # the retry
    ref.step()
    assert len(launches) == 2 and not opt._fused_failed
    for p, q in zip(params, reference, strict=True):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_running_out_of_memory_in_the_kernel_after_it_updated_a_run_raises_it_and_blocks_the_next_step(monkeypatch, backend) -> None:
    """An out-of-memory error at a later launch (another group's run) leaves the runs before it
    stepped: raised as it is, not as a kernel failure finished on the PyTorch path (whose
    RuntimeError hid it, and which allocates more than the kernel); the next step raises, as after
    an out-of-memory error on the PyTorch path."""
    launches = kernel_launch_fails(monkeypatch, 2, torch.OutOfMemoryError("simulated out of memory"))
    params = make_params([(5,), (3,)], dtype=torch.float32)
    opt = OPTIMIZERS["lstm"]([{"params": [p]} for p in params], "l2l-2016", backend=backend)
    set_grads(params, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(torch.OutOfMemoryError, match="simulated out of memory"):
            opt.step()
    assert len(launches) == 2 and not opt._fused_failed
    with pytest.raises(RuntimeError, match=r"failed part-way through \(OutOfMemoryError\('simulated out of memory'\)\)"):
        opt.step()


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("old_size", [1, 3])
def test_a_resized_parameter_is_rejected_not_given_broadcast_states(foreach, old_size) -> None:
    """``p.data = bigger`` after a step: Adam fails on its state's shape; the batched path used
    to broadcast a one-element state to every new element (or fail in ``copy_``)."""
    p, q = torch.nn.Parameter(torch.randn(old_size)), torch.nn.Parameter(torch.randn(3))
    opt = LSTMOptimizer([p, q], foreach=foreach)
    p.grad, q.grad = torch.ones(old_size), torch.ones(3)
    opt.step()
    p.data = torch.randn(5)
    p.grad = torch.ones(5)
    with pytest.raises(ValueError, match=rf"has shape \(2, {old_size}, 20\), but its 5 element\(s\) need \(2, 5, 20\)"):
        opt.step()
    del opt.state[p]  # what the message advises: a fresh state
    opt.step()
    assert opt.state[p]["h"].shape == (2, 5, 20)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_grown_parameter_last_in_its_flat_buffer_is_rejected(kind) -> None:
    """The buffer's slice for the last member is cut short at the buffer's end, so a grown last
    member looked current: a RuntimeError from inside the rule, after the states of the chunks
    before it had advanced."""
    p, q = make_params([(70,), (3,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind]([p, q])
    opt.chunk = 64
    set_grads([p, q], seed=0)
    step(opt)
    q.data = torch.randn(5)
    set_grads([p, q], seed=1)
    h = opt.state[p]["h"].clone()
    with pytest.raises(ValueError, match=r"has shape \(\d, 3, 20\), but its 5 element\(s\)"):
        step(opt)
    assert torch.equal(opt.state[p]["h"], h)


@pytest.mark.parametrize("foreach", [None, False])
def test_a_resized_parameter_fails_the_step_before_any_group_is_updated(foreach) -> None:
    """The first group stepped before the second's resized parameter raised; stepping again after
    ``del optimizer.state[param]`` (what the message advises) applied its gradient twice."""
    p, q = make_params([(4,), (3,)], dtype=torch.float32)
    opt = LSTMOptimizer([{"params": [p]}, {"params": [q]}], foreach=foreach)
    set_grads([p, q], seed=0)
    opt.step()
    q.data = torch.randn(5)
    set_grads([p, q], seed=1)
    before, h = p.detach().clone(), opt.state[p]["h"].clone()
    with pytest.raises(ValueError, match="changed size since its state was created"):
        opt.step()
    assert torch.equal(p, before) and torch.equal(opt.state[p]["h"], h) and opt.state[p]["step"] == 1



def test_a_resized_parameter_without_a_gradient_fails_the_step_before_any_group_is_updated() -> None:
    """The batched path rebuilds a group's flat buffers from the states of all its parameters, one
    without a gradient this step too: a resized one of those raised only there, after the
    earlier groups had stepped."""
    p, q, r = make_params([(4,), (3,), (1,)], dtype=torch.float32)
    opt = LSTMOptimizer([{"params": [p]}, {"params": [q, r]}])
    set_grads([p, q, r], seed=0)
    opt.step()
    r.data, r.grad = torch.randn(5), None
    set_grads([p, q], seed=1)
    before, h = p.detach().clone(), opt.state[p]["h"].clone()
    with pytest.raises(ValueError, match="changed size since its state was created"):
        opt.step()
    assert torch.equal(p, before) and torch.equal(opt.state[p]["h"], h) and opt.state[p]["step"] == 1

def test_moving_parameters_to_another_dtype_drops_the_old_flat_buffers() -> None:
    """After ``model.double()`` (or a move to another device) the group's states live in a new
    flat buffer; the old one must not stay referenced (a second copy of every state)."""
    model = torch.nn.Linear(8, 4)
    opt = LSTMOptimizer(model.parameters())

    def train_step():
        opt.zero_grad()
        model(torch.randn(2, 8, dtype=model.weight.dtype)).pow(2).mean().backward()
        opt.step()

    train_step()
    assert [key[2] for key in opt._flat_states] == [torch.float32]
    model.double()
    train_step()
    assert [key[2] for key in opt._flat_states] == [torch.float64]
    model.float()
    train_step()
    assert [key[2] for key in opt._flat_states] == [torch.float32]
    buffers = next(iter(opt._flat_states.values())).buffers
    for p in model.parameters():
        assert opt.state[p]["h"].untyped_storage().data_ptr() == buffers["h"].untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_removing_a_param_group_drops_the_flat_buffers_of_the_groups_after_it(kind) -> None:
    """After ``param_groups.pop(0)`` the former group 1 is group 0 and its states move to that
    index's new buffer; its old buffer, under index 1, stayed referenced (a second copy of
    every state of the group)."""
    params = make_params([(4, 3), (5,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind]([{"params": params[:1]}, {"params": params[1:]}])
    set_grads(params, seed=0)
    step(opt)
    opt.param_groups.pop(0)
    set_grads(params, seed=1)
    step(opt)
    assert [key[0] for key in opt._flat_states] == [0]
    buffers = opt._flat_states[0, torch.device("cpu"), torch.float32].buffers
    assert opt.state[params[1]]["h"].untyped_storage().data_ptr() == buffers["h"].untyped_storage().data_ptr()


def test_a_group_with_two_dtypes_keeps_both_flat_buffers() -> None:
    """Both buffers back live states: neither is dropped as stale when the other is rebuilt."""
    single, double = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    extra = torch.nn.Parameter(torch.ones(4))
    opt = LSTMOptimizer([single, double, extra])
    single.grad, double.grad = torch.ones(3), torch.ones(2, dtype=torch.float64)
    opt.step()
    extra.grad = torch.ones(4)  # a new member of the float32 buffer: it is rebuilt
    opt.step()
    assert sorted(str(key[2]) for key in opt._flat_states) == ["torch.float32", "torch.float64"]


def test_auto_keeps_foreach_false_to_the_per_tensor_reference(monkeypatch) -> None:
    """Once the kernel is validated, backend='auto' runs it on CUDA; foreach=False asks for the
    per-tensor reference and must get it (forced on CPU as above), where an explicit
    backend='triton' runs the kernel."""
    kernel = validated_kernel_on_cpu(monkeypatch)
    real, launches = kernel.coordinate_lstm_step_, []
    monkeypatch.setattr(kernel, "coordinate_lstm_step_", lambda *a, **k: launches.append(1) or real(*a, **k))
    for backend, foreach, launched in (("auto", False, False), ("auto", None, True), ("triton", False, True)):
        launches.clear()
        params = make_params([(5,), (3,)], dtype=torch.float32)
        opt = OPTIMIZERS["lstm"](params, "l2l-2016", backend=backend, foreach=foreach)
        set_grads(params, 0)
        opt.step()
        assert bool(launches) == launched, (backend, foreach)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["lstm", "meta"]),
    specs=param_specs(5),
    chunks=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    state_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    data=st.data(),
)
def test_property_grouping_order_and_chunking_do_not_change_a_step(kind, specs, chunks, state_dtype, data) -> None:
    """Bit for bit on the batched path: the parameters split into other param groups, listed in
    another order and chunked otherwise (0-dim, empty, transposed, channels_last, mixed dtypes,
    some gradients None) step exactly as in one group."""
    n = len(specs)
    group_of = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    order = data.draw(st.permutations(range(n)))
    skips = data.draw(st.lists(st.sets(st.integers(0, n - 1)), min_size=3, max_size=3))
    runs = []
    for groups, chunk, foreach in (([list(range(n))], chunks[0], None), ([[i for i in order if group_of[i] == k] for k in range(3)], chunks[1], True)):
        params = make_mixed_params(specs)
        opt = OPTIMIZERS[kind]([{"params": [params[i] for i in g]} for g in groups if g], foreach=foreach, state_dtype=state_dtype)
        opt.chunk = chunk
        for t, skip in enumerate(skips):
            set_grads(params, seed=t, skip=skip)
            step(opt, 0.5 + t)
        runs.append((params, opt))
    (params, opt), (others, other) = runs
    assert_same_params_and_states(params, opt, others, other)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [None, False])
def test_a_reshaped_parameter_of_the_same_size_is_rejected_before_any_group_is_updated(kind, foreach) -> None:
    """``p.data = p.data.t().contiguous()`` after a step: Adam fails on its states' shape, and
    ``load_state_dict`` refuses a (3, 2) parameter's states for a (2, 3) one; the step went on
    with each element's states given to another element, and ``state_dict()`` saved them so."""
    p, q = make_params([(4,), (3, 2)], dtype=torch.float32)
    opt = OPTIMIZERS[kind]([{"params": [p]}, {"params": [q]}], foreach=foreach)
    set_grads([p, q], seed=0)
    step(opt)
    q.data = q.data.t().contiguous()
    set_grads([p, q], seed=1)
    before, h = p.detach().clone(), opt.state[p]["h"].clone()
    message = r"reshaped from \(3, 2\) to \(2, 3\) since its state was created"
    with pytest.raises(ValueError, match=message):
        step(opt)
    assert torch.equal(p, before) and torch.equal(opt.state[p]["h"], h) and opt.state[p]["step"] == 1
    with pytest.raises(ValueError, match=message):
        opt.state_dict()
    del opt.state[q]  # what the message advises: a fresh state
    step(opt)
    assert opt.state[q]["step"] == 1 and opt.state_dict()["state"][1]["h"].shape[1:3] == (2, 3)


@pytest.mark.parametrize("made", ["load_state_dict", "init_state", "deepcopy", "pickle"])
@pytest.mark.parametrize("foreach", [None, False])
def test_a_parameter_reshaped_after_its_state_was_loaded_or_made_without_a_step_is_rejected(made, foreach) -> None:
    """A state loaded (``load_state_dict``), made by ``init_state()`` or copied with the optimizer
    records its parameter's shape then: the shape was taken only at the next step, so a parameter
    reshaped in between (same size) had its elements' states given to other elements in silence."""
    import pickle

    p, q = make_params([(4,), (3, 2)], dtype=torch.float32)
    opt = OPTIMIZERS["lstm"]([p, q], foreach=foreach)
    if made == "init_state":
        opt.init_state()
    else:
        set_grads([p, q], seed=0)
        step(opt)
    if made == "load_state_dict":
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    elif made in ("deepcopy", "pickle"):
        opt = copy.deepcopy(opt) if made == "deepcopy" else pickle.loads(pickle.dumps(opt))
        p, q = opt.param_groups[0]["params"]
    q.data = q.data.t().contiguous()
    set_grads([p, q], seed=1)
    message = r"reshaped from \(3, 2\) to \(2, 3\) since its state was created"
    with pytest.raises(ValueError, match=message):
        opt.state_dict()
    with pytest.raises(ValueError, match=message):
        step(opt)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("how", ["data", "set_"])
def test_a_state_tensor_moved_in_place_is_read_at_the_next_step(kind, how) -> None:
    """A state tensor left in its place in ``optimizer.state`` but pointed elsewhere (``.data =``,
    ``set_``) no longer backs the flat buffers: the next step reads its values, as it reads a
    state tensor replaced by another."""
    params, others = make_params([(5,), (4,), (3,)]), make_params([(5,), (4,), (3,)])
    opt, other = OPTIMIZERS[kind](params), OPTIMIZERS[kind](others)
    step_alike(params, opt, others, other, seeds=[0])
    g = torch.Generator().manual_seed(7)
    for name, value in list(opt.state[params[1]].items()):
        if name == "step":
            continue
        new = torch.rand(value.shape, generator=g, dtype=value.dtype)  # v, a mean square, is >= 0
        if how == "data":
            value.data = new.clone()
        else:
            value.set_(new.clone())
        other.state[others[1]][name] = new.clone()
    step_alike(params, opt, others, other, seeds=[1, 2])
