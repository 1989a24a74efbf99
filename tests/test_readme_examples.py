"""The README's Python examples run as printed, and do what their comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def _example(marker: str) -> str:
    """The one Python example of the README that contains ``marker``."""
    found = [code for code in _examples() if marker in code]
    assert len(found) == 1, f"{len(found)} README examples contain {marker!r}"
    return found[0]


def _run(code: str, namespace: dict | None = None) -> dict:
    namespace = {"__name__": "__readme__"} if namespace is None else namespace
    # dont_inherit: as printed, without this file's `from __future__ import annotations` (under which
    # a README dataclass's string annotations sent dataclasses looking for a "__readme__" module)
    exec(compile(code, "<README example>", "exec", dont_inherit=True), namespace)  # noqa: S102 - the README's own code
    return namespace


def test_every_example_is_run_here() -> None:
    markers = ("LSTMOptimizer(model.parameters())", 'save_weights(rule, "rule.safetensors"', "MAML(model", "dcp.save(",
               "class LogisticFamily(TaskFamily)", "class MomentumMLP(UpdateRule)", "learned_step(rule, params, grads",
               "class LineFamily:")
    assert len(_examples()) == len(markers)
    for marker in markers:
        _example(marker)


def test_usage_example_trains_and_its_state_saves_with_dcp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drop-in example fits its random targets better than the best constant does; the
    distributed-checkpoint fragment after it, run on that model and optimizer in one process,
    restores the optimizer's state exactly."""
    monkeypatch.chdir(tmp_path)
    ns = _run(_example("LSTMOptimizer(model.parameters())"))
    assert ns["loss"].item() < 0.5 * ns["y"].var().item()
    saved = {p: {k: v.clone() for k, v in state.items()} for p, state in ns["optimizer"].state.items()}
    save, load = _example("dcp.save(").split("# later")
    _run(save, ns)
    # "later, with a freshly built model and optimizer": here the same model, a new optimizer
    ns["optimizer"] = type(ns["optimizer"])(ns["model"].parameters())
    _run("# later" + load, ns)
    restored = ns["optimizer"].state
    assert saved.keys() == restored.keys()
    for param, states in saved.items():
        for name, value in states.items():
            assert torch.equal(torch.as_tensor(restored[param][name]), torch.as_tensor(value)), name


def test_weights_example_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns = _run(_example('save_weights(rule, "rule.safetensors"'))
    assert ns["rule"].config.hidden_size == 32
    assert ns["header"]["trained_on"] == "my tasks"


def test_maml_example_adapts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """After its 2,000 meta-steps, the example's 10 adaptation steps lower the new task's query
    MSE below that of the meta-learned initialisation itself."""
    monkeypatch.chdir(tmp_path)
    ns = _run(_example("MAML(model"))
    maml, x_s, y_s, x_q, y_q = (ns[k] for k in ("maml", "x_s", "y_s", "x_q", "y_q"))
    mse = torch.nn.functional.mse_loss
    adapted = mse(maml.predict(ns["fast"], x_q[0]), y_q[0])
    unadapted = mse(maml.predict(maml.adapt(x_s[0], y_s[0], steps=0), x_q[0]), y_q[0])
    assert adapted < unadapted


def test_learned_step_example_gives_the_rule_and_the_initialisation_meta_gradients() -> None:
    """The inner-loop example's query loss backward reaches every weight of the rule and every
    initial parameter (finite, not all zero); its inner loop lowered the support loss, left the
    model's own parameters as they were, and its state has the shapes its comment says."""
    ns = _run(_example("learned_step(rule, params, grads"))
    rule, model = ns["rule"], ns["model"]
    for name, p in [*rule.named_parameters(), *model.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    assert {k: tuple(v.shape) for k, v in ns["state"].items()} == {"h": (2, 5, 20), "c": (2, 5, 20)}
    mse = torch.nn.functional.mse_loss
    with torch.no_grad():
        start = mse(model(ns["x_s"]), ns["y_s"])
        adapted = mse(torch.func.functional_call(model, ns["params"], (ns["x_s"],)), ns["y_s"])
    assert adapted < start
    torch.manual_seed(0)
    fresh = torch.nn.Linear(4, 1)  # as the example built the model: the steps did not change it
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters(), strict=True))
    assert not any(torch.equal(ns["params"][k], p) for k, p in model.named_parameters())


def test_own_task_family_example_meta_trains_a_rule_that_beats_its_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's rule, meta-trained on its logistic-regression family, ends 50 steps on 32
    new tasks far below the untrained rule it started as, as the README says; the optimizer built
    from the file it saved steps as that rule does."""
    import warnings

    from learnedopt import CoordinateLSTM
    from learnedopt.meta import num_coordinates, truncated_unroll

    monkeypatch.chdir(tmp_path)
    ns = _run(_example("class LogisticFamily(TaskFamily)"))
    generator = torch.Generator().manual_seed(123)
    tasks = ns["LogisticFamily"]().sample_batch(32, generator)
    params = tasks.init_params(generator)
    torch.manual_seed(0)
    final = {}
    for name, rule in (("trained", ns["rule"]), ("untrained", CoordinateLSTM())):
        state = rule.init_state(num_coordinates(params), dtype=torch.float32, device="cpu")
        final[name] = float(truncated_unroll(rule, tasks, params, state, horizon=50, truncation=50)[-1].mean())
    assert final["trained"] < 1e-4 and final["untrained"] > 0.1, final
    # the optimizer from the saved file on the first of those tasks, as an nn.Module
    task, model, optimizer = tasks.tasks[0], ns["model"], ns["optimizer"]
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    for step in range(50):
        optimizer.zero_grad()
        loss = task.loss({"w": model.weight[0], "b": model.bias[0]}, step)
        loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a trained file: no untrained-weights warning
            optimizer.step()
    with torch.no_grad():
        assert float(task.loss({"w": model.weight[0], "b": model.bias[0]}, 50)) < 1e-3


def test_own_rule_example_meta_trains_it_and_its_file_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's own rule, meta-trained on quadratics, ends 40 steps on 32 new quadratics
    below its untrained start (the same seed's construction), as the README says; its file loads
    as that class, and the optimizer built from it steps as the rule does."""
    from learnedopt import load_weights
    from learnedopt.meta import QuadraticFamily, num_coordinates, truncated_unroll
    from learnedopt.nn import RULES

    monkeypatch.chdir(tmp_path)
    saved = dict(RULES)
    try:
        ns = _run(_example("class MomentumMLP(UpdateRule)"))
        loaded, header = load_weights("momentum_mlp.safetensors")
        assert type(loaded) is ns["MomentumMLP"] and header["trained_on"].startswith("quadratic")
    finally:
        RULES.clear()
        RULES.update(saved)
    generator = torch.Generator().manual_seed(123)
    tasks = QuadraticFamily(dim=10).sample_batch(32, generator)
    params = tasks.init_params(generator)
    torch.manual_seed(0)
    final = {}
    for name, rule in (("trained", ns["rule"]), ("untrained", ns["MomentumMLP"]())):
        state = rule.init_state(num_coordinates(params), dtype=torch.float32, device="cpu")
        final[name] = float(truncated_unroll(rule, tasks, params, state, horizon=40, truncation=40)[-1].mean())
    assert final["trained"] < 0.8 * final["untrained"], final
    # the optimizer takes the rule's step: one step from the model's parameters, by hand
    model, optimizer = ns["model"], ns["optimizer"]
    x = torch.randn(8, 10)
    model(x).square().mean().backward()
    grad = torch.cat([model.weight.grad.reshape(-1), model.bias.grad])
    before = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    rule = optimizer.rule
    with torch.no_grad():
        expected, _ = rule(grad, before, rule.init_state(11, dtype=torch.float32, device="cpu"))
    optimizer.step()
    after = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    torch.testing.assert_close(after - before, expected)


def test_own_fewshot_family_example_meta_trains_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's lines.py, run by the README's command (3 meta-steps): the card names the
    family and describes its tasks, and the model file's learner, rebuilt by the family's
    model(), adapts to a line and predicts (N, 1)."""
    import sys

    from learnedopt.cli import main
    from learnedopt.meta.fewshot import load_learner

    (tmp_path / "lines.py").write_text(_example("class LineFamily:"))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "runs" / "lines"
    args = ["meta-train", "--algo", "maml", "--task", "lines:LineFamily", "--meta-steps", "3", "--meta-batch", "4",
            "--val-tasks", "4", "--out", str(out), "--quiet"]
    try:
        assert main(args) == 0
        card = (out / "MODEL_CARD.md").read_text()
        assert "The family is your own `lines:LineFamily`" in card
        assert "lines y = a x + b, a, b ~ N(0, 1), x ~ U[-5, 5]; 5 support, 10 query points" in card
        learner, head = load_learner(out / "model.safetensors")
        assert head["architecture"] == {"kind": "own", "family": "lines:LineFamily"}
        x = torch.linspace(-5, 5, 5).unsqueeze(1)
        assert learner.predict(learner.adapt(x, 2 * x + 1), x).shape == (5, 1)
    finally:
        sys.modules.pop("lines", None)
