import json
import math

import pytest
import torch

from learnedopt.nn import MetaLSTMCell, preprocess


def paper_step(rule, grad, theta, loss, h, c, f_prev, i_prev):
    """Ravi & Larochelle (2017), eqs. 2-4, transcribed coordinate by coordinate."""
    x_in = torch.cat([preprocess(grad, 10.0), preprocess(loss.reshape(1), 10.0).expand(len(grad), 2)], 1)
    gates = x_in @ rule.lstm.weight_ih_l0.t() + rule.lstm.bias_ih_l0 + h @ rule.lstm.weight_hh_l0.t() + rule.lstm.bias_hh_l0
    i, f, g, o = gates.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    theta_new, f_all, i_all = [], [], []
    wf, wi = rule.weight_fi[0], rule.weight_fi[1]
    for k in range(len(grad)):
        f_t = 1 / (1 + math.exp(-(float(wf[:20] @ h_new[k]) + wf[20] * theta[k] + wf[21] * f_prev[k] + rule.bias_fi[0])))
        i_t = 1 / (1 + math.exp(-(float(wi[:20] @ h_new[k]) + wi[20] * theta[k] + wi[21] * i_prev[k] + rule.bias_fi[1])))
        theta_new.append(f_t * theta[k] - i_t * grad[k])
        f_all.append(f_t)
        i_all.append(i_t)
    return torch.tensor(theta_new, dtype=torch.float64), h_new, c_new, torch.tensor(f_all), torch.tensor(i_all)


def test_matches_paper_equations_float64() -> None:
    rule = MetaLSTMCell().double()
    with torch.no_grad():
        rule.weight_fi.normal_(0, 0.3)  # make every term matter
    n = 9
    grad, theta = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    h, c = torch.randn(n, 20, dtype=torch.float64), torch.randn(n, 20, dtype=torch.float64)
    fi = torch.rand(2, n, dtype=torch.float64)
    loss = torch.tensor(0.73, dtype=torch.float64)
    with torch.no_grad():
        step, new = rule(grad, theta, {"h": h[None], "c": c[None], "fi": fi}, loss)
        theta_ref, h_ref, c_ref, f_ref, i_ref = paper_step(rule, grad, theta, loss, h, c, fi[0], fi[1])
    torch.testing.assert_close(theta + step, theta_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new["h"][0], h_ref)
    torch.testing.assert_close(new["c"][0], c_ref)
    torch.testing.assert_close(new["fi"], torch.stack([f_ref, i_ref]).double())


def test_the_loss_is_read_in_the_gradient_dtype_and_required() -> None:
    """A loss of another dtype than the rule's (a float64 optimizee's loss, a float32 loss for a
    float64 rule) gives the step of that loss converted to the rule's dtype; no loss is a clear
    error."""
    n = 7
    for dtype, loss_dtype in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        rule = MetaLSTMCell().to(dtype)
        grad, theta = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
        state = rule.init_state(n, dtype=dtype, device="cpu")
        loss = torch.tensor(0.37, dtype=loss_dtype)
        with torch.no_grad():
            step, _ = rule(grad, theta, state, loss)
            want, _ = rule(grad, theta, state, loss.to(dtype))
        assert step.dtype == dtype and torch.equal(step, want)
    with pytest.raises(ValueError, match="MetaLSTMCell needs the optimizee's loss"):
        rule(grad, theta, state)


def test_initialisation_is_gradient_descent() -> None:
    rule = MetaLSTMCell()
    assert 4.0 <= rule.bias_fi[0] <= 6.0 and -5.0 <= rule.bias_fi[1] <= -4.0
    assert rule.weight_fi.abs().max() <= 0.01
    n = 100
    grad, theta = torch.randn(n), torch.randn(n) * 0.1
    with torch.no_grad():
        step, new = rule(grad, theta, rule.init_state(n, dtype=torch.float32, device="cpu"), torch.tensor(1.0))
    forget, step_size = torch.sigmoid(rule.bias_fi)
    # step = (f - 1) theta - i g with f ~ sigmoid(b_f), i ~ sigmoid(b_i)
    torch.testing.assert_close(step, (forget - 1) * theta - step_size * grad, rtol=0.1, atol=1e-4)
    assert 0.006 < step_size < 0.02 and forget > 0.98
    # the input LSTM: PyTorch's usual U(-1/sqrt(H), 1/sqrt(H)), spanning the range
    lstm = torch.cat([p.flatten() for p in rule.lstm.parameters()])
    assert 0.9 / math.sqrt(20) < lstm.abs().max() <= 1 / math.sqrt(20)


def _as_adam(rule: MetaLSTMCell, step_size: float) -> MetaLSTMCell:
    """Gates that ignore their inputs: f = sigmoid(40) = 1 in float64, and
    i = ``step_size`` / ``step_scale``."""
    with torch.no_grad():
        rule.weight_fi.zero_()
        logit = math.log(step_size / (rule.config.step_scale - step_size))
        rule.bias_fi.copy_(torch.tensor([40.0, logit], dtype=rule.bias_fi.dtype))
    return rule


def test_adam_direction_with_constant_gates_is_adam() -> None:
    """With momentum and rms decays the cell writes Adam's direction: gates pinned to f = 1 and
    i * step_scale = lr make MetaLSTMOptimizer torch.optim.Adam (eps 1e-8, no weight decay), in
    float64 to rounding, including Adam's bias correction over the first steps."""
    from learnedopt import MetaLSTMOptimizer

    rule = _as_adam(MetaLSTMCell(momentum_decay=0.9, rms_decay=0.999, step_scale=2.0).double(), 0.05)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1)).double()
    twin = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1)).double()
    twin.load_state_dict(model.state_dict())
    ours = MetaLSTMOptimizer(model.parameters(), weights=rule, state_dtype=torch.float64)
    adam = torch.optim.Adam(twin.parameters(), lr=0.05, eps=1e-8)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    for _ in range(20):
        for net, opt in ((model, ours), (twin, adam)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step(loss=loss) if opt is ours else opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(next(model.parameters()), next(iter(torch.nn.Linear(5, 7).double().parameters())))


def test_direction_options_and_their_states() -> None:
    grad = torch.tensor([0.3, -2.0, 0.0], dtype=torch.float64)
    rule = MetaLSTMCell(momentum_decay=0.5, rms_decay=0.75, step_scale=3.0).double()
    assert set(rule.state_spec()) == {"h", "c", "fi", "m", "v"}
    state = rule.init_state(3, dtype=torch.float64, device="cpu")
    d1, s1 = rule.direction(grad, state)
    # first step: the bias-corrected averages are the gradient and its square: 3 * sign(g)
    torch.testing.assert_close(d1, 3.0 * grad / (grad.abs() + 1e-8))
    torch.testing.assert_close(s1["m"], torch.stack((0.5 * grad, torch.full_like(grad, 0.5))))
    d2, _ = rule.direction(-grad, {**state, **s1})
    m = (0.25 * grad - 0.5 * grad) / 0.75
    v = (0.75 * 0.25 * grad**2 + 0.25 * grad**2) / (1 - 0.75**2)
    torch.testing.assert_close(d2, 3.0 * m / (v.sqrt() + 1e-8))
    # the paper's configuration: no extra state, the gradient itself
    paper = MetaLSTMCell()
    assert set(paper.state_spec()) == {"h", "c", "fi"}
    d, extra = paper.direction(grad, {})
    assert d is grad and extra == {}


def test_configurable_gate_initialisation_and_bad_configs() -> None:
    rule = MetaLSTMCell(forget_bias_init=(9.0, 11.0), input_bias_init=(-4.0, -3.5))
    assert 9.0 <= rule.bias_fi[0] <= 11.0 and -4.0 <= rule.bias_fi[1] <= -3.5
    for bad, match in [
        ({"step_scale": 0.0}, "step_scale must be positive"),
        ({"momentum_decay": 1.0}, r"momentum_decay must be None or in \(0, 1\)"),
        ({"rms_decay": -0.1}, r"rms_decay must be None or in \(0, 1\)"),
        ({"momentum_decay": 0.0}, r"momentum_decay must be None or in \(0, 1\)"),  # the open interval
        ({"rms_decay": 0.0}, r"rms_decay must be None or in \(0, 1\)"),
        ({"input_bias_init": (1.0, 0.0)}, "input_bias_init must be a range"),
        ({"forget_bias_init": (4.0, 5.0, 6.0)}, "forget_bias_init must be a range"),
        ({"hidden_size": 0}, "hidden_size must be an integer >= 1"),
        ({"step_scale": math.inf}, "step_scale must be positive and finite"),
        ({"preprocess_p": math.inf}, "preprocess_p must be in \\(0, 87.34\\]"),
        # the wrong types (a hand-edited header): a ValueError naming the field, not a TypeError
        ({"forget_bias_init": 5.0}, "forget_bias_init must be a range"),
        ({"input_bias_init": ("a", "b")}, "input_bias_init must be a range"),
        ({"forget_bias_init": (0.0, math.inf)}, "forget_bias_init must be a range"),
        ({"momentum_decay": "0.9"}, r"momentum_decay must be None or in \(0, 1\), got '0.9'"),
        # 1.0 in float32: the bias correction's weight stayed 0, and every step turned the parameters NaN
        ({"momentum_decay": 1 - 1e-9}, r"momentum_decay must be None or in \(0, 1\) in float32, got 0.999999999$"),
        ({"rms_decay": 1 - 1e-9}, r"rms_decay must be None or in \(0, 1\) in float32, got 0.999999999$"),
        ({"step_scale": None}, "step_scale must be positive and finite in float32, got None"),
    ]:
        with pytest.raises(ValueError, match=match):
            MetaLSTMCell(**bad)
    # the config round-trips through the weight-file form
    again = MetaLSTMCell.from_config_dict(rule.config_dict())
    assert again.config == rule.config
    assert json.loads(json.dumps(rule.config_dict())) == rule.config_dict()  # plain JSON values


def test_a_gate_bias_range_of_one_value_is_that_value() -> None:
    rule = MetaLSTMCell(forget_bias_init=(5.0, 5.0))
    assert rule.bias_fi[0].item() == 5.0


def _numpy_preprocess(x, p: float = 10.0):
    """Andrychowicz et al. (2016), appendix A: ``(log|x| / p, sign x)`` where ``|x| >= e^-p``,
    else ``(-1, e^p x)``; in NumPy, apart from the library's :func:`preprocess`."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    big = np.abs(x) >= math.exp(-p)
    return np.where(big, np.log(np.where(big, np.abs(x), 1.0)) / p, -1.0), np.where(big, np.sign(x), math.exp(p) * x)


@pytest.mark.parametrize(("preset", "lr", "maximize"), [("meta-lstm-mnist", 1.0, False), ("meta-lstm-mnist", 0.5, False),
                                                        ("meta-lstm-adam-mnist", 0.7, False), ("meta-lstm-adam", 1.0, True)])  # fmt: skip
def test_the_optimizer_follows_a_numpy_transcription_of_the_paper_over_steps(preset, lr, maximize) -> None:
    """MetaLSTMOptimizer (float64 parameters and states) against Ravi & Larochelle's equations
    written out in NumPy, the preprocessing of Andrychowicz et al. included, each run on its own
    trajectory of a small non-convex problem for 20 steps: the input LSTM on (preprocessed
    gradient, preprocessed loss), ``f_t = sigmoid(W_f [h_t, theta, f_{t-1}] + b_f)``, ``i_t``
    likewise, ``theta_t = theta + lr * (f_t theta - i_t d_t - theta)``, with ``d_t`` the gradient or
    Adam's bias-corrected direction, and ``-grad``, ``-loss`` under ``maximize``. One coordinate's
    gradient stays below e^-10, in the preprocessing's linear branch."""
    import numpy as np

    from learnedopt import MetaLSTMOptimizer
    from learnedopt.weights import load_weights

    rule, _ = load_weights(preset)
    w = {k: v.double().numpy() for k, v in rule.state_dict().items()}
    hidden, cfg = rule.config.hidden_size, rule.config
    generator = torch.Generator().manual_seed(5)
    a, b = torch.randn(8, 6, generator=generator, dtype=torch.float64), torch.randn(8, generator=generator, dtype=torch.float64)

    def loss_and_grad(theta):
        t = torch.tensor(theta, requires_grad=True)
        loss = (torch.tanh(a @ t[:6]) - b).square().sum() * 0.5 + (t[6:11] ** 2).sum() * 1e-3 + t[11] * 1e-6
        loss.backward()
        return loss.item() * (-1e-2 if maximize else 1.0), t.grad.numpy() * (-1e-2 if maximize else 1.0)

    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    theta0 = torch.randn(12, generator=generator, dtype=torch.float64).numpy() * 0.7
    n = theta0.size
    theta, h, c, f, i, m, v = theta0.copy(), np.zeros((n, hidden)), np.zeros((n, hidden)), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    param = torch.nn.Parameter(torch.tensor(theta0))
    optimizer = MetaLSTMOptimizer([param], weights=preset, lr=lr, maximize=maximize, state_dtype=torch.float64)
    for t in range(1, 21):
        loss, grad = loss_and_grad(theta)
        if maximize:
            loss, grad = -loss, -grad
        (gm, gd), (lm, ld) = _numpy_preprocess(grad), _numpy_preprocess(loss)
        x = np.stack([gm, gd, np.full(n, lm), np.full(n, ld)], 1)
        z = x @ w["lstm.weight_ih_l0"].T + h @ w["lstm.weight_hh_l0"].T + w["lstm.bias_ih_l0"] + w["lstm.bias_hh_l0"]
        gi, gf, gg, go = sigmoid(z[:, :hidden]), sigmoid(z[:, hidden:2 * hidden]), np.tanh(z[:, 2 * hidden:3 * hidden]), sigmoid(z[:, 3 * hidden:])
        c = gf * c + gi * gg
        h = go * np.tanh(c)
        wf, wi = w["weight_fi"]
        f = sigmoid(h @ wf[:hidden] + theta * wf[hidden] + f * wf[hidden + 1] + w["bias_fi"][0])
        i = sigmoid(h @ wi[:hidden] + theta * wi[hidden] + i * wi[hidden + 1] + w["bias_fi"][1])
        d = grad
        if cfg.momentum_decay is not None:
            b1, b2 = cfg.momentum_decay, cfg.rms_decay
            m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad**2
            d = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + 1e-8)
        theta = theta + lr * (f * theta - i * d - theta)

        loss, grad = loss_and_grad(param.detach().numpy())
        param.grad = torch.tensor(grad)
        optimizer.step(loss=loss)
        np.testing.assert_allclose(param.detach().numpy(), theta, rtol=1e-10, atol=1e-11)
    assert abs(float(theta[11] - theta0[11])) > 0
    np.testing.assert_allclose(optimizer.state[param]["fi"].numpy(), np.stack([f, i]), rtol=1e-10, atol=1e-12)
