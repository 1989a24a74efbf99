import json

import pytest
import torch

from learnedopt.nn import CoordinateLSTM, CoordinateLSTMConfig, preprocess


def lstm_equations(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """Hochreiter & Schmidhuber's LSTM with torch's gate order (i, f, g, o), written out."""
    i, f, g, o = (x @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh).chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def test_matches_the_paper_architecture_written_out() -> None:
    rule = CoordinateLSTM().double()
    with torch.no_grad():
        for param in rule.parameters():
            param.add_(torch.randn_like(param) * 0.3)  # make every weight matter
    n = 37
    state = {name: torch.randn(spec.shape(n), dtype=torch.float64) for name, spec in rule.state_spec().items()}
    grad = torch.randn(n, dtype=torch.float64) * torch.logspace(-6, 1, n, dtype=torch.float64)
    with torch.no_grad():
        step, new = rule(grad, torch.randn(n, dtype=torch.float64), state)
        x = preprocess(grad, 10.0)
        for layer in range(2):
            weights = [getattr(rule.lstm, f"{w}_l{layer}") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            x, c = lstm_equations(x, state["h"][layer], state["c"][layer], *weights)
            torch.testing.assert_close(new["h"][layer], x, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(new["c"][layer], c, rtol=1e-12, atol=1e-12)
        expected = 0.1 * (x @ rule.head.weight.t() + rule.head.bias).squeeze(1)
    torch.testing.assert_close(step, expected, rtol=1e-12, atol=1e-12)


def test_every_optional_input_feature_written_out() -> None:
    """Layer 0's inputs with every feature set on, two decays each, from non-zero states: the
    preprocessed gradient, each preprocessed momentum, each RMS-normalised gradient, the
    parameter, in that order, each moment at its own decay."""
    rule = CoordinateLSTM(momentum_decays=(0.5, 0.9), rms_decays=(0.99, 0.9), param_input=True).double()
    n = 13
    g = torch.Generator().manual_seed(3)
    grad, param = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    m, v = torch.randn(2, n, generator=g, dtype=torch.float64), torch.rand(2, n, generator=g, dtype=torch.float64)
    x, new = rule.features(grad, param, {"m": m, "v": v})
    m_want = torch.stack([0.5 * m[0] + 0.5 * grad, 0.9 * m[1] + 0.1 * grad])
    v_want = torch.stack([0.99 * v[0] + 0.01 * grad**2, 0.9 * v[1] + 0.1 * grad**2])
    columns = [preprocess(grad, 10.0), preprocess(m_want[0], 10.0), preprocess(m_want[1], 10.0),
               (grad / (v_want[0].sqrt() + 1e-8))[:, None], (grad / (v_want[1].sqrt() + 1e-8))[:, None], param[:, None]]  # fmt: skip
    torch.testing.assert_close(x, torch.cat(columns, dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new["m"], m_want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new["v"], v_want, rtol=1e-12, atol=1e-12)


def test_does_not_modify_inputs_and_shapes() -> None:
    rule = CoordinateLSTM(momentum_decays=(0.5, 0.9), rms_decays=(0.99,), param_input=True)
    assert rule.config.num_inputs == 2 + 4 + 1 + 1
    n = 11
    state = rule.init_state(n, dtype=torch.float32, device="cpu")
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "h": (2, n, 20), "c": (2, n, 20), "m": (2, n), "v": (1, n)
    }
    before = {k: v.clone() for k, v in state.items()}
    grad = torch.randn(n)
    step, new = rule(grad, torch.randn(n), state)
    assert step.shape == (n,)
    for k in state:
        assert torch.equal(state[k], before[k])
        assert new[k].shape == state[k].shape
    torch.testing.assert_close(new["m"][1], 0.1 * grad)
    torch.testing.assert_close(new["v"][0], 0.01 * grad**2)


def test_untrained_init_is_sign_descent_with_momentum() -> None:
    rule = CoordinateLSTM()
    rule.reset_parameters(torch.Generator().manual_seed(0), lr=0.01)
    n = 6
    grad = torch.tensor([1e-4, 1e-3, 1.0, -1e-4, -1e-3, -1.0])  # all above e^-10
    state = rule.init_state(n, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for _ in range(60):
            step, state = rule(grad, torch.zeros(n), state)
    torch.testing.assert_close(step, -0.01 * grad.sign(), rtol=0.02, atol=0)
    # and a zero gradient (a weight on an always-zero input) gets no step, however long
    state = rule.init_state(2, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for _ in range(50):
            step, state = rule(torch.zeros(2), torch.zeros(2), state)
            assert step.abs().max() < 1e-6


@pytest.mark.parametrize(("layers", "lr", "output_scale"), [(1, 0.01, 0.1), (2, 0.03, 0.1), (3, 0.01, 0.5)])
def test_untrained_steady_step_is_exactly_lr_times_sign(layers: int, lr: float, output_scale: float) -> None:
    """The head is calibrated on the steady state of the initialised stack under a gradient of
    constant sign: there the step is ``-lr sign(g)`` to float64 rounding, for any depth."""
    rule = CoordinateLSTM(num_layers=layers, output_scale=output_scale).double()
    rule.reset_parameters(torch.Generator().manual_seed(0), lr=lr)
    grad = torch.tensor([1e-4, 1.0, -1e-3, -1.0], dtype=torch.float64)
    state = rule.init_state(4, dtype=torch.float64, device="cpu")
    with torch.no_grad():
        for _ in range(300):
            step, state = rule(grad, torch.zeros(4, dtype=torch.float64), state)
    torch.testing.assert_close(step, -lr * grad.sign(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["CoordinateLSTM", "MetaLSTMCell"])
def test_init_state_keeps_moving_averages_in_at_least_float32(kind: str) -> None:
    """``init_state`` in a narrow dtype: the LSTM states in it, the moving averages (whose
    bfloat16 updates stall) in float32; in float64 all float64."""
    from learnedopt.nn import MetaLSTMCell

    rule = CoordinateLSTM(momentum_decays=(0.9,), rms_decays=(0.99,)) if kind == "CoordinateLSTM" else MetaLSTMCell(
        momentum_decay=0.9, rms_decay=0.99
    )
    for dtype, averages in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)):
        state = rule.init_state(3, dtype=dtype, device="cpu")
        assert {k: v.dtype for k, v in state.items()} == {
            k: averages if k in ("m", "v") else dtype for k in rule.state_spec()
        }, dtype


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        CoordinateLSTMConfig(hidden_size=0)
    with pytest.raises(ValueError):
        CoordinateLSTMConfig(momentum_decays=(1.0,))
    with pytest.raises(TypeError):
        CoordinateLSTM(CoordinateLSTMConfig(), hidden_size=3)


@pytest.mark.parametrize(("change", "message"), [
    ({"hidden_size": True}, "hidden_size must be an integer >= 1"),  # JSON true, though Python counts it as 1
    ({"hidden_size": 2.5}, "hidden_size must be an integer >= 1"),
    ({"num_layers": 0}, "num_layers must be an integer >= 1"),
    ({"param_input": 1}, "param_input must be true or false"),
    ({"preprocess_p": 0.0}, r"preprocess_p must be in \(0, 87.34\]"),
    ({"preprocess_p": 88.0}, r"preprocess_p must be in \(0, 87.34\] \(e\^p finite in float32\), got 88.0"),
    ({"output_scale": 1e39}, "output_scale must be finite in float32, got 1e"),
    ({"rms_decays": (0.9, 1.0)}, r"rms_decays: decays must be in \[0, 1\)"),
    # 1 in float32: v stayed 0 and the RMS feature g / 1e-8 overflowed for a finite gradient of
    # 1e31 (the parameters NaN); m stayed 0
    ({"rms_decays": (0.9, 0.99999999)}, r"rms_decays: decays must be below 1 in float32, got 0.99999999"),
    ({"momentum_decays": (1 - 2**-26,)}, r"momentum_decays: decays must be below 1 in float32, got 0.99999998"),
    # values of the wrong type, as a hand-edited weight-file header has them: a ValueError naming
    # the field, not a TypeError from inside the checks ("Value after * must be an iterable")
    ({"momentum_decays": 0.9}, "momentum_decays must be a list of decays, got 0.9"),
    ({"rms_decays": ("0.9",)}, r"rms_decays: decays must be in \[0, 1\), got '0.9'"),
    ({"preprocess_p": "10"}, r"preprocess_p must be in \(0, 87.34\] \(e\^p finite in float32\), got '10'"),
    ({"preprocess_p": True}, r"preprocess_p must be in \(0, 87.34\] \(e\^p finite in float32\), got True"),
    ({"output_scale": None}, "output_scale must be finite in float32, got None"),
])  # fmt: skip
def test_config_rejects_each_bad_value_naming_it(change: dict, message: str) -> None:
    """Each field is checked where the config is made (a weight file's header included), not
    later by torch.nn.LSTM or at the first step, with a ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        CoordinateLSTMConfig(**change)


def test_the_largest_preprocessing_constant_keeps_every_step_finite() -> None:
    """At p = MAX_PREPROCESS_P the features of a zero, a subnormal, a tiny and a large gradient are
    finite, and so is a step (p = 100, accepted before, gave a zero gradient the feature
    0 * e^100 = 0 * Inf = NaN; p = 1e6 raised OverflowError at the first step)."""
    from learnedopt.nn.functional import MAX_PREPROCESS_P

    grad = torch.tensor([0.0, -1e-45, 1e-30, -3.0, 1e30])
    features = preprocess(grad, MAX_PREPROCESS_P)
    assert torch.isfinite(features).all(), features
    assert features[0].tolist() == [-1.0, 0.0]
    rule = CoordinateLSTM(preprocess_p=MAX_PREPROCESS_P)
    state = {name: torch.zeros(spec.shape(5)) for name, spec in rule.state_spec().items()}
    with torch.no_grad():
        step, _ = rule(grad, torch.ones(5), state)
    assert torch.isfinite(step).all(), step


def test_config_round_trip() -> None:
    rule = CoordinateLSTM(hidden_size=8, num_layers=1, momentum_decays=(0.9,))
    again = CoordinateLSTM.from_config_dict(rule.config_dict())
    assert again.config == rule.config
    # plain JSON values: equal to the config a weight-file or report header gives back
    assert json.loads(json.dumps(rule.config_dict())) == rule.config_dict()
    with pytest.raises(ValueError, match="unknown"):
        CoordinateLSTM.from_config_dict({"hidden": 3})


def test_a_zero_momentum_decay_is_allowed() -> None:
    # the documented range of the decays is [0, 1): 0 is a momentum that is the gradient itself
    assert CoordinateLSTMConfig(momentum_decays=(0.0,), rms_decays=(0.0,)).momentum_decays == (0.0,)
    rule = CoordinateLSTM(momentum_decays=(0.0,))
    assert rule.config.momentum_decays == (0.0,)
    with pytest.raises(ValueError, match=r"decays must be in \[0, 1\)"):
        CoordinateLSTMConfig(momentum_decays=(-0.1,))
