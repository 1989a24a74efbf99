"""backend="triton": the optimizer's fused path (Triton interpreter on CPU) against the torch path."""

import copy
import os

import pytest
import torch

from helpers import make_params, set_grads
from learnedopt import LSTMOptimizer, kernels
from learnedopt.nn import CoordinateLSTM

pytestmark = pytest.mark.skipif(
    not kernels.FUSED_UPDATES_AVAILABLE or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton, run in interpreter mode (tests/conftest.py sets TRITON_INTERPRET=1)",
)

# Same fp32 math as the torch path; only the order of fp32 reductions differs (see
# tests/test_kernel_coordinate_lstm.py), so parameters agree to ~1e-6 relative.
TOL = dict(rtol=2e-5, atol=2e-6)
# the paper's architecture (2 inputs), and the default preset (weights=None: l2l-blend, which also
# reads momenta and rms-normalised gradients)
PAPER = "l2l-2016"
DEFAULT = None


def _param_input_rule() -> CoordinateLSTM:
    """A rule that reads the parameter value, with every weight perturbed so that the parameter
    feature reaches the step (the default init routes only unit 0, which does not read it)."""
    g = torch.Generator().manual_seed(0)
    rule = CoordinateLSTM(momentum_decays=(0.9,), rms_decays=(0.999,), param_input=True)
    rule.reset_parameters(generator=g)
    with torch.no_grad():
        for q in rule.parameters():
            q.add_(torch.randn(q.shape, generator=g) * 0.1)
    return rule


WEIGHTS = pytest.mark.parametrize(
    "weights", [PAPER, DEFAULT, _param_input_rule()], ids=["l2l-2016", "default", "param-input"]
)


def run(
    backend, shapes, dtype=torch.float32, state_dtype=torch.float32, steps=3, *, weights=PAPER,
    **options,
):
    params = make_params(shapes, dtype=dtype, noncontiguous=options.pop("noncontiguous", ()))
    opt = LSTMOptimizer(params, weights, backend=backend, state_dtype=state_dtype, **options)
    for t in range(steps):
        set_grads(params, seed=t, skip=options.get("skip", ()))
        opt.step()
    return params, opt


@WEIGHTS
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_torch_across_tensors(state_dtype, weights) -> None:
    shapes = [(30, 20), (1,), (0,), (257,), (8, 9)]
    options = dict(state_dtype=state_dtype, weights=weights, noncontiguous=(4,))
    fused, fopt = run("triton", shapes, **options)
    ref, ropt = run("torch", shapes, **options)
    tol = TOL if state_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-4)  # bf16 states round each step
    for p, q in zip(fused, ref):
        torch.testing.assert_close(p, q, **tol)
    # where the two paths' float32 math rounds a bf16 state to neighbouring values (1 ulp, up to
    # 2^-8 relative), that coordinate's later states differ by more than their own ulp: after 3
    # steps up to 4e-4 at a state of 0.004 (seen when the PyTorch path's LSTM became the fused
    # CPU kernel; as many states differed as before, 21 of 74,400)
    tol = TOL if state_dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    spec = fopt.rule.state_spec()
    assert set(spec) == ({"h", "c"} if weights == PAPER else {"h", "c", "m", "v"})
    for p, q in zip(fused, ref):
        for name in spec:
            got, want = fopt.state[p][name], ropt.state[q][name]
            # the moving averages m and v stay float32 under bfloat16 states
            assert got.dtype == want.dtype == (torch.float32 if name in ("m", "v") else state_dtype)
            torch.testing.assert_close(got.float(), want.float(), **tol)


def test_default_weights_on_a_model() -> None:
    # LSTMOptimizer's default (l2l-blend: momentum and rms inputs) training a small MLP, with
    # gradients from real losses, so each step's parameters shape the next gradients; beside the
    # two float32 paths, the PyTorch path in float64 (parameters and states) as the reference
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    models = {backend: copy.deepcopy(model) for backend in ("triton", "torch")}
    models["float64"] = copy.deepcopy(model).double()
    opts = {b: LSTMOptimizer(m.parameters(), backend=b) for b, m in models.items() if b != "float64"}
    opts["float64"] = LSTMOptimizer(models["float64"].parameters(), backend="torch", state_dtype=torch.float64)
    cfg = opts["triton"].rule.config
    assert cfg.momentum_decays and cfg.rms_decays and not cfg.param_input
    losses = {backend: [] for backend in models}
    for _ in range(5):
        for backend, m in models.items():
            opts[backend].zero_grad()
            dtype = next(m.parameters()).dtype
            loss = torch.nn.functional.mse_loss(m(x.to(dtype)), y.to(dtype))
            loss.backward()
            opts[backend].step()
            losses[backend].append(loss.item())
    torch.testing.assert_close(losses["triton"], losses["torch"], **TOL)
    triton_, torch_ = list(models["triton"].parameters()), list(models["torch"].parameters())
    for p, q, start in zip(triton_, torch_, model.parameters()):
        torch.testing.assert_close(p, q, **TOL)
        assert not torch.equal(p, start)
        for name in ("m", "v"):
            torch.testing.assert_close(opts["triton"].state[p][name], opts["torch"].state[q][name], **TOL)
    # The trained rule's h and c are ill-conditioned: along the trajectory each float32 path drifts
    # from the float64 run by up to ~5e-4 (measured), and which of the two ends nearer depends on
    # the weights (the kernel 3x further on h with l2l-blend, 1.2x nearer with l2l-random). So the
    # kernel is held to the PyTorch path's own accuracy: no more than 4x its distance from float64.
    for name in ("h", "c"):
        def distance(path: str, params: list) -> float:
            return max(
                (opts[path].state[a][name].double() - opts["float64"].state[b][name]).abs().max().item()
                for a, b in zip(params, models["float64"].parameters())
            )

        kernel, reference = distance("triton", triton_), distance("torch", torch_)
        assert 0 < reference < 1e-3, (name, reference)
        assert kernel <= 4 * reference, f"{name}: the kernel is {kernel:.2e} from float64, the PyTorch path {reference:.2e}"


def test_fused_weight_decay_matches_torch() -> None:
    shapes = [(30, 20), (1,), (257,)]
    fused, _ = run("triton", shapes, weights=DEFAULT, weight_decay=0.05, lr=0.5)
    ref, _ = run("torch", shapes, weights=DEFAULT, weight_decay=0.05, lr=0.5)
    plain, _ = run("torch", shapes, weights=DEFAULT, lr=0.5)
    for p, q, r in zip(fused, ref, plain, strict=True):
        torch.testing.assert_close(p, q, **TOL)
        assert not torch.allclose(q, r, **TOL)


def test_fused_with_low_precision_parameters_and_maximize() -> None:
    fused, _ = run("triton", [(40,), (3, 5)], dtype=torch.bfloat16, maximize=True)
    ref, _ = run("torch", [(40,), (3, 5)], dtype=torch.bfloat16, maximize=True)
    for p, q in zip(fused, ref):
        torch.testing.assert_close(p.float(), q.float(), rtol=1e-2, atol=1e-3)  # one bf16 ulp


def test_fused_run_of_mixed_parameter_dtypes_keeps_each_dtype_s_precision() -> None:
    """float32 and bfloat16 parameters side by side in one run are gathered into one float32
    vector: the float32 parameter must not be rounded through bfloat16 on the way."""
    results = {}
    for backend in ("triton", "torch"):
        wide, narrow = make_params([(40,), (3, 5)], dtype=torch.float32)
        narrow = narrow.detach().to(torch.bfloat16).requires_grad_(True)
        opt = LSTMOptimizer([wide, narrow], PAPER, backend=backend)
        for t in range(3):
            set_grads([wide, narrow], seed=t)
            opt.step()
        results[backend] = (wide, narrow)
    (fw, fn), (rw, rn) = results["triton"], results["torch"]
    torch.testing.assert_close(fw, rw, **TOL)
    torch.testing.assert_close(fn.float(), rn.float(), rtol=1e-2, atol=1e-3)  # one bf16 ulp


@WEIGHTS
def test_fused_resume_is_bit_identical(weights) -> None:
    params = make_params([(50,), (7, 3)], dtype=torch.float32)
    opt = LSTMOptimizer(params, weights, backend="triton")
    for t in range(2):
        set_grads(params, seed=t)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    snapshot = [p.detach().clone() for p in params]
    for t in range(2, 4):
        set_grads(params, seed=t)
        opt.step()
    resumed = [s.clone().requires_grad_(True) for s in snapshot]
    fresh = LSTMOptimizer(resumed, weights, backend="triton")
    fresh.load_state_dict(saved)
    for t in range(2, 4):
        set_grads(resumed, seed=t)
        fresh.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_explicit_triton_refuses_what_the_kernel_cannot_do() -> None:
    params = make_params([(4,)], dtype=torch.float64)
    opt = LSTMOptimizer(params, PAPER, backend="triton")
    set_grads(params, 0)
    with pytest.raises(RuntimeError, match="float64 parameters"):
        opt.step()


def test_auto_never_uses_the_interpreter() -> None:
    auto, _ = run("auto", [(6,)])
    torch_, _ = run("torch", [(6,)])
    assert torch.equal(auto[0], torch_[0])


def test_a_strided_1d_parameter_alone_in_its_run() -> None:
    results = []
    for backend in ("triton", "torch"):
        param = torch.linspace(-1, 1, 20)[::2].requires_grad_(True)  # a 1-D view with stride 2
        assert not param.is_contiguous()
        opt = LSTMOptimizer([param], PAPER, backend=backend)
        for t in range(2):
            param.grad = torch.linspace(-0.5, 0.5, 10) * (t + 1)
            opt.step()
        results.append(param.detach().clone())
    torch.testing.assert_close(results[0], results[1], **TOL)


def test_weights_replaced_through_data_reach_the_kernel() -> None:
    rule = CoordinateLSTM()
    params = make_params([(6,)], dtype=torch.float32)
    fused = LSTMOptimizer(params, rule, backend="triton")
    set_grads(params, 0)
    fused.step()
    new = [q.detach() + 0.05 for q in rule.parameters()]
    torch.nn.utils.vector_to_parameters(torch.cat([q.reshape(-1) for q in new]), rule.parameters())  # sets .data
    reference_params = [p.detach().clone().requires_grad_(True) for p in params]
    reference = LSTMOptimizer(reference_params, copy.deepcopy(rule), backend="torch")
    reference.load_state_dict(fused.state_dict())
    set_grads(params, 1)
    set_grads(reference_params, 1)
    fused.step()
    reference.step()
    torch.testing.assert_close(params[0], reference_params[0], **TOL)


def test_an_explicit_triton_backend_raises_when_the_kernel_fails(monkeypatch) -> None:
    """Only ``backend="auto"`` falls back to the PyTorch path; ``"triton"`` asked for the kernel."""
    import learnedopt.optim.learned_optimizer as lo

    def failing_fused_update(*args, **kwargs):
        raise RuntimeError("kernel failed to compile")

    monkeypatch.setattr(lo, "fused_update_", failing_fused_update)
    params = make_params([(3,), (2, 2)], dtype=torch.float32)
    before = [p.detach().clone() for p in params]
    opt = LSTMOptimizer(params, backend="triton")
    set_grads(params, 0)
    with pytest.raises(RuntimeError, match=r"^backend='triton': the fused kernel failed .*kernel failed to compile.*; no parameter or state was changed$"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(float(opt.state[p]["step"]) == 0 for p in params if p in opt.state)  # the step was not counted


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("saved_under, loaded_under", [("triton", "torch"), ("torch", "triton")])
def test_a_state_resumes_on_the_loading_optimizer_s_backend(kind, saved_under, loaded_under, monkeypatch) -> None:
    """A state saved under one backend continues on the loading optimizer's backend (the saved
    group's ``backend`` used to replace it), equal to rounding to a run on the saved one; a
    ``state_dict`` has the same keys, shapes and dtypes under both."""
    import learnedopt.optim.learned_optimizer as lo
    from learnedopt import MetaLSTMOptimizer

    cls = {"lstm": LSTMOptimizer, "meta": MetaLSTMOptimizer}[kind]
    weights = DEFAULT if kind == "lstm" else None
    calls = []
    real = lo.fused_update_
    monkeypatch.setattr(lo, "fused_update_", lambda *a, **kw: (calls.append(1), real(*a, **kw)))

    def train(opt, params, first):
        for t in range(first, first + 2):
            set_grads(params, seed=t)
            opt.step(loss=1.0 / (t + 1)) if kind == "meta" else opt.step()

    params = make_params([(6, 5), (7,)], dtype=torch.float32, noncontiguous=(0,))
    opt = cls(params, weights, backend=saved_under, state_dtype=torch.bfloat16)
    train(opt, params, 0)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_(True) for p in params]
    train(opt, params, 2)
    fresh = cls(resumed, weights, backend=loaded_under, state_dtype=torch.bfloat16)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["backend"] == loaded_under
    calls.clear()
    train(fresh, resumed, 2)
    assert len(calls) == (2 if loaded_under == "triton" else 0)
    for p, q in zip(params, resumed):
        torch.testing.assert_close(p, q, **TOL)
    ours, theirs = fresh.state_dict()["state"], opt.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for index, state in ours.items():
        for name, value in state.items():
            assert value.shape == theirs[index][name].shape and value.dtype == theirs[index][name].dtype, name
            torch.testing.assert_close(value.float(), theirs[index][name].float(), rtol=2e-2, atol=2e-3)


def test_meta_lstm_fused_under_maximize_matches_torch() -> None:
    """Under ``maximize`` the MetaLSTMCell rule sees ``-grad`` and ``-loss``; the kernel negates
    the loss itself, so it must get the loss as given (negated beforehand too, it read ``+loss``)."""
    from learnedopt import MetaLSTMOptimizer

    results = {}
    for backend in ("triton", "torch"):
        params = make_params([(6, 5), (7,)], dtype=torch.float32)
        opt = MetaLSTMOptimizer(params, backend=backend, maximize=True)
        for t in range(3):
            set_grads(params, seed=t)
            opt.step(loss=2.0 / (t + 1))
        results[backend] = params
    for p, q in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_graph_that_saved_a_parameter_refuses_the_stepped_one_as_on_the_torch_path(kind) -> None:
    """The kernel updates a contiguous parameter (and its states) where it lies, through its
    pointer, which autograd does not see: the version counters stayed put, so a graph that had
    saved the parameter before the step (``backward(retain_graph=True)``, step, backward again)
    back-propagated silently with the stepped values, where the PyTorch path's in-place update
    raises PyTorch's error. Every tensor the kernel writes now counts as modified in place."""
    from helpers import OPTIMIZERS

    for backend in ("torch", "triton"):
        w = torch.randn(3, 4, requires_grad=True)
        loss = (w * w).sum()  # saves w
        loss.backward(retain_graph=True)
        opt = OPTIMIZERS[kind]([w], backend=backend)
        opt.step(**({"loss": loss.detach()} if kind == "meta" else {}))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    versions = {name: state._version for name, state in opt.state[w].items() if name != "step"}
    opt.step(**({"loss": loss.detach()} if kind == "meta" else {}))
    assert all(opt.state[w][name]._version > version for name, version in versions.items()), versions
