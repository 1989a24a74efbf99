"""Small builders shared by the optimizer tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import importlib.util
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

from learnedopt import CoordinateLSTM, LSTMOptimizer, MetaLSTMCell, MetaLSTMOptimizer
from learnedopt.kernels import lstm_layer_cpu
from learnedopt.nn.lstm_step import compile_enabled

OPTIMIZERS = {"lstm": LSTMOptimizer, "meta": MetaLSTMOptimizer}

#: For a test (or a parameter: ``pytest.param("triton", marks=needs_triton)``) that runs the fused
#: kernels: Triton is a dependency only where it has wheels (Linux x86-64 and aarch64), so elsewhere
#: (macOS, Windows) the test is skipped, not failed with "Triton is not installed".
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs Triton (wheels for Linux x86-64/aarch64 only)"
)

#: For a test that builds the CPU kernel (``learnedopt.kernels.lstm_layer_cpu``) or runs
#: ``torch.compile``'s C++ code: the library falls back without a C++ compiler (``$CXX``, ``c++``,
#: ``g++``, ``clang++``), with one warning, so on such a machine the test is skipped.
needs_compiler = pytest.mark.skipif(
    lstm_layer_cpu._compiler() is None, reason="no C++ compiler ($CXX, c++, g++, clang++): the kernel cannot be built here"
)


#: For a test of bit-for-bit invariance to how coordinates are batched: only the compiled step
#: promises it (README); eager CPU ``torch.sigmoid`` rounds a row differently with the batch's
#: length (its vector loop and scalar tail), which ``LEARNEDOPT_COMPILE=0`` or a machine without a
#: C++ compiler runs.
needs_compiled_step = pytest.mark.skipif(
    not compile_enabled() or lstm_layer_cpu._compiler() is None,
    reason="the LSTM step runs eagerly here (LEARNEDOPT_COMPILE=0 or no C++ compiler), which is batch-invariant only to rounding",
)


def make_params(shapes, dtype=torch.float64, *, noncontiguous=(), seed=0) -> list[torch.Tensor]:
    """Leaf tensors of the given shapes; indices in ``noncontiguous`` become transposed views."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        if i in noncontiguous:
            assert len(shape) == 2, "non-contiguous parameters are made by transposing a matrix"
            base = torch.randn(tuple(reversed(shape)), generator=g, dtype=torch.float64).to(dtype)
            p = base.t().detach().requires_grad_(True)
            assert not p.is_contiguous()
        else:
            p = torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
        params.append(p)
    return params


def make_mixed_params(specs, seed=0) -> list[torch.Tensor]:
    """Leaf tensors from ``(shape, dtype, layout)`` specs: layout ``"t"`` is a transposed matrix,
    ``"cl"`` a channels_last 4-d tensor, anything else contiguous."""
    params = []
    for i, (shape, dtype, layout) in enumerate(specs):
        (p,) = make_params([shape], dtype=dtype, noncontiguous=(0,) if layout == "t" else (), seed=seed + i)
        if layout == "cl":
            p = p.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        params.append(p)
    return params


def param_specs(max_size: int = 4):
    """Hypothesis strategy: lists of ``make_mixed_params`` specs, with 0-dim, empty and
    one-element tensors, non-contiguous layouts and every parameter dtype."""
    from hypothesis import strategies as st

    dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
    spec = st.one_of(
        st.tuples(st.sampled_from([(), (0,), (1,), (4, 0), *[(n,) for n in range(2, 21)]]), dtypes, st.just("c")),
        st.tuples(st.tuples(st.integers(2, 5), st.integers(2, 5)), dtypes, st.just("t")),
        st.tuples(st.just((2, 3, 2, 2)), dtypes, st.just("cl")),
    )
    return st.lists(spec, min_size=1, max_size=max_size)


def set_grads(params, seed: int, scale: float = 1.0, skip=()) -> None:
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        if i in skip:
            p.grad = None
            continue
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale * torch.exp(
            torch.randn((), generator=g, dtype=torch.float64) * 2
        )
        p.grad = noise.to(p.dtype)


def step(optimizer, seed_loss: float = 0.5):
    """One step; MetaLSTMOptimizer gets a loss."""
    if isinstance(optimizer, MetaLSTMOptimizer):
        return optimizer.step(loss=torch.tensor(seed_loss))
    return optimizer.step()


def assert_same_params_and_states(params, optimizer, others, other) -> None:
    """``params`` equal ``others`` and ``optimizer``'s states equal ``other``'s, bit for bit."""
    for p, q in zip(params, others, strict=True):
        assert torch.equal(p, q)
        assert optimizer.state[p].keys() == other.state[q].keys()
        assert all(torch.equal(value, other.state[q][name]) for name, value in optimizer.state[p].items())


def step_alike(params, optimizer, others, other, seeds) -> None:
    """Step ``optimizer`` on ``params`` and ``other`` on ``others`` with the same gradients, one
    step per seed, then check both bit for bit (:func:`assert_same_params_and_states`)."""
    for seed in seeds:
        set_grads(params, seed=seed)
        set_grads(others, seed=seed)
        step(optimizer)
        step(other)
    assert_same_params_and_states(params, optimizer, others, other)


def to_device_keeping_strides(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` with its strides: ``Tensor.to`` makes a non-contiguous view contiguous
    when it copies, which would hide the very layout a test passes on purpose."""
    if t.device == device:
        return t
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    return out.copy_(t)


@contextlib.contextmanager
def folder_locked_by_another_run(out: Path) -> Iterator[None]:
    """Hold the lock a running meta-train holds on its ``--out`` folder ``out``, taken as the run
    takes it (POSIX only: callers skip without ``fcntl``); released on exit, as a run's end or
    kill releases it."""
    from learnedopt.meta.loop import OutputLock

    with OutputLock() as lock:
        lock.acquire(out)
        yield


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Within the block, the OS refuses to write any file of this process past ``size`` bytes
    (``RLIMIT_FSIZE``, SIGXFSZ ignored, so that the write fails with EFBIG "File too large"):
    a real full disk for every writer, torch's and safetensors' native ones included. POSIX
    only: callers skip without ``resource``."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


class Killed(BaseException):
    """A simulated SIGKILL of a run: nothing in the library catches it or cleans up after it."""


@contextlib.contextmanager
def killed_at_write(n: int, cut: bool) -> Iterator[list[int]]:
    """Within the block, kill (raise :class:`Killed`) a meta-train run at its ``n``-th file write
    (the configuration it began with, checkpoints, the log's truncation on resume, weights or model file, model card): with
    ``cut`` half-way through writing the temporary file, which is left behind as a kill leaves
    it; else just after the rename. Yields a list whose item counts the writes."""
    from learnedopt import files, weights
    from learnedopt.meta import loop

    count = [0]

    def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
        count[0] += 1
        if count[0] != n:
            return files.write_atomically(path, write)
        if cut:
            tmp = Path(path).with_name(Path(path).name + ".tmp")
            write(tmp)
            tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
        else:
            files.write_atomically(path, write)
        raise Killed(f"write {n}, {'during' if cut else 'after'} {Path(path).name}")

    with pytest.MonkeyPatch.context() as patch:
        for module in (loop, weights):
            patch.setattr(module, "write_atomically", write_atomically)
        yield count


def assert_killed_at_any_write_resumes(out: Path, run: Callable[..., int], args: Sequence[str], writes: int) -> dict[str, object]:
    """Run ``run(out, *args)`` (a meta-train entry point returning its exit status) once whole,
    checking it makes ``writes`` file writes; then, for each write, killed during and after it
    and resumed with ``--resume``: the resumed run leaves the whole run's files (:func:`run_files`),
    which are returned."""
    import shutil

    with killed_at_write(0, cut=False) as count:  # none killed: counted
        assert run(out, *args) == 0
    assert count == [writes]
    whole = run_files(out)
    for n in range(1, writes + 1):
        for cut in (True, False):
            shutil.rmtree(out)
            with killed_at_write(n, cut), pytest.raises(Killed):
                run(out, *args)
            assert run(out, *args, "--resume") == 0
            assert run_files(out) == whole, (n, cut)
    return whole


def run_files(out: Path) -> dict[str, object]:
    """What a meta-train run leaves in ``out`` and a resumed run must repeat: every file's bytes,
    but the log's records without their machine fields, and no checkpoint."""
    import json

    from learnedopt.meta.loop import CHECKPOINT_NAME, LOG_NAME, MACHINE_FIELDS

    found: dict[str, object] = {}
    for path in sorted(out.iterdir()):
        if path.name == LOG_NAME:
            found[path.name] = [{k: v for k, v in json.loads(line).items() if k not in MACHINE_FIELDS}
                                for line in path.read_text().splitlines()]  # fmt: skip
        elif path.name != CHECKPOINT_NAME:
            found[path.name] = path.read_bytes()
    return found


def strided_like(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with the same values and no contiguous layout: its last two dimensions
    stored transposed, or, for 1-D ``t``, every other element of a buffer twice its length."""
    if t.dim() == 1:
        return torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)[::2].copy_(t)
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def record_options(monkeypatch, module, names) -> list:
    """Wrap ``module``'s functions ``names`` to record the ``options=`` each call is given."""
    seen = []
    for name in names:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, **kw: seen.append(kw["options"]) or real(*a, **kw))
    return seen


def importable_module(
    tmp_path: Path, monkeypatch, prefix: str, source: str, siblings: dict[str, str] | None = None  # noqa: ANN001 - pytest's fixture
) -> Iterator[str]:
    """A module of ``source`` that ``import`` finds (a file in ``tmp_path`` on ``sys.path``), for
    a fixture to yield: its name, unique to ``tmp_path``; ``siblings`` maps suffixes to the
    sources of more modules, named ``<name>_<suffix>``. All are forgotten by ``sys.modules`` after."""
    import sys

    name = f"{prefix}_{abs(hash(str(tmp_path)))}"
    modules = {name: source, **{f"{name}_{suffix}": text for suffix, text in (siblings or {}).items()}}
    (tmp_path / "modules").mkdir()
    for module, text in modules.items():
        (tmp_path / "modules" / f"{module}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    yield name
    for module in modules:
        sys.modules.pop(module, None)


def own_rule_module(
    tmp_path: Path, monkeypatch, source: str, siblings: dict[str, str] | None = None  # noqa: ANN001 - pytest's fixture
) -> Iterator[str]:
    """:func:`importable_module` of ``source`` (e.g. :data:`OWN_RULE`) and its ``siblings``, for a
    fixture to yield: the rule kinds registered while it is in use (:data:`learnedopt.nn.RULES`)
    are forgotten after."""
    from learnedopt.nn import RULES

    saved = dict(RULES)
    yield from importable_module(tmp_path, monkeypatch, "own_rule", source, siblings)
    RULES.clear()
    RULES.update(saved)


def central_difference(f: Callable[[], float], tensor: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``d f / d tensor`` by central differences, element by element: ``tensor`` (a leaf, e.g. a
    weight) is moved in place and put back; ``f`` runs with grad enabled."""
    numeric = torch.zeros_like(tensor)
    with torch.no_grad():
        flat = tensor.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            values = []
            for value in (old + eps, old - eps):
                flat[i] = value
                with torch.enable_grad():
                    values.append(f())
            flat[i] = old
            numeric.view(-1)[i] = (values[0] - values[1]) / (2 * eps)
    return numeric


def assert_refuses_transforms(step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, name: str) -> None:
    """``step(x)`` (a Triton step named ``name`` in its errors, e.g. "coordinate-LSTM") raises its
    one-line ``RuntimeError`` under ``torch.func.grad`` and ``vmap`` and for a forward-mode dual
    ``x``, and runs outside them."""
    import torch.autograd.forward_ad as fwAD

    message = rf"^the Triton {name} step does not run under torch.func transforms"
    with pytest.raises(RuntimeError, match=message):
        torch.func.grad(lambda t: step(t).sum())(x)
    with pytest.raises(RuntimeError, match=message):
        torch.func.vmap(step)(x.expand(2, *x.shape))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=rf"^the Triton {name} step has no forward-mode"):
        step(fwAD.make_dual(x, torch.ones_like(x)))
    assert torch.isfinite(step(x)).all()


def random_rule(kind: str, seed: int = 0, **config) -> CoordinateLSTM | MetaLSTMCell:
    """A tiny float64 rule (``kind`` "lstm" or "meta") with every weight random, so its step
    depends on the gradient's size (the default inits read only sign(g) or are near-constant,
    hiding second-order terms)."""
    rule = CoordinateLSTM(hidden_size=3, num_layers=1, **config) if kind == "lstm" else MetaLSTMCell(hidden_size=2, **config)
    rule = rule.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rule.parameters():
            p.uniform_(-0.6, 0.6, generator=g)
    return rule


#: the source of a module of the user's own update rules (``--rule module:MomentumMLP`` of
#: ``meta-train``, ``--rules`` of ``evaluate optimizers``): ``MomentumMLP``, a tiny rule of its own
#: kind, not registered on import; ``Halved``, which keeps CoordinateLSTM's kind; ``NotARule``.
OWN_RULE = '''
from dataclasses import dataclass

import torch
from learnedopt import CoordinateLSTM, UpdateRule
from learnedopt.nn import StateSpec


@dataclass(frozen=True)
class MomentumMLPConfig:
    hidden: int = 4
    beta: float = 0.9


class MomentumMLP(UpdateRule):
    kind = "CliMomentumMLP"
    config_class = MomentumMLPConfig

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2, self.config.hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(self.config.hidden, 1))

    def state_spec(self):
        return {"m": StateSpec((1,), moving_average=True)}

    def forward(self, grad, param, state, loss=None):
        m = torch.lerp(grad, state["m"], self.config.beta)
        return 0.01 * (self.mlp(torch.stack([grad, m[0]], dim=1))[:, 0] - m[0]), {"m": m}


class Halved(CoordinateLSTM):  # keeps CoordinateLSTM's kind
    def forward(self, grad, param, state, loss=None):
        step, new_state = super().forward(grad, param, state, loss)
        return 0.5 * step, new_state


class NotARule:
    pass


class IntegerStep(MomentumMLP):  # rounded every update to zero: a run that trained nothing
    kind = "CliIntegerStep"

    def forward(self, grad, param, state, loss=None):
        step, new_state = super().forward(grad, param, state, loss)
        return step.long(), new_state


class ShortStep(MomentumMLP):
    kind = "CliShortStep"

    def forward(self, grad, param, state, loss=None):
        step, new_state = super().forward(grad, param, state, loss)
        return step[:-1], new_state


class StateOfOtherShape(MomentumMLP):  # broadcasting hid it
    kind = "CliStateOfOtherShape"

    def forward(self, grad, param, state, loss=None):
        step, new_state = super().forward(grad, param, state, loss)
        return step, {"m": new_state["m"][:, :1]}


class StepOnly(MomentumMLP):
    kind = "CliStepOnly"

    def forward(self, grad, param, state, loss=None):
        return super().forward(grad, param, state, loss)[0]


class NaNStep(MomentumMLP):
    kind = "CliNaNStep"

    def forward(self, grad, param, state, loss=None):
        step, new_state = super().forward(grad, param, state, loss)
        return step * float("nan"), new_state


class NoMetaParameters(UpdateRule):
    kind = "CliNoMetaParameters"
    config_class = MomentumMLPConfig

    def state_spec(self):
        return {}

    def forward(self, grad, param, state, loss=None):
        return -0.01 * grad, {}


class SpecOfTuples(MomentumMLP):
    kind = "CliSpecOfTuples"

    def state_spec(self):
        return {"m": (1,)}


class ConstructorRaises(MomentumMLP):
    kind = "CliConstructorRaises"

    def __init__(self, config=None, **overrides):
        raise RuntimeError("no such\\nlayer")
'''


def run_without_hanging(code: str, env: dict[str, str], hung: str) -> None:
    """Run ``code`` in a Python process of its own session (with ``env`` added and the repository
    importable); fail with ``hung`` if it (or a child it forked) is still running after 60 s, else
    unless it exits 0."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **env}
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # the hung child too
        process.communicate()
        pytest.fail(hung)
    assert process.returncode == 0, output[-2000:]
