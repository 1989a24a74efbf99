import pytest
import torch

from learnedopt.nn import CoordinateLSTM, CoordinateLSTMConfig, preprocess


def to_torch_gate_order(w: torch.Tensor, hidden: int) -> torch.Tensor:
    """(i, f, o, g) rows -> torch.nn.LSTM's (i, f, g, o)."""
    i, f, o, g = w.split(hidden)
    return torch.cat([i, f, g, o])


def test_matches_torch_nn_lstm() -> None:
    rule = CoordinateLSTM().double()
    hidden, layers = 20, 2
    reference = torch.nn.LSTM(2, hidden, num_layers=layers).double()
    with torch.no_grad():
        for k in range(layers):
            getattr(reference, f"weight_ih_l{k}").copy_(to_torch_gate_order(rule.weight_ih[k], hidden))
            getattr(reference, f"weight_hh_l{k}").copy_(to_torch_gate_order(rule.weight_hh[k], hidden))
            getattr(reference, f"bias_ih_l{k}").copy_(to_torch_gate_order(rule.bias[k], hidden))
            getattr(reference, f"bias_hh_l{k}").zero_()
    n = 37
    state = {name: torch.randn(spec.shape(n), dtype=torch.float64) for name, spec in rule.state_spec().items()}
    grad = torch.randn(n, dtype=torch.float64)
    step, new = rule(grad, torch.randn(n, dtype=torch.float64), state)
    out, (h, c) = reference(preprocess(grad, 10.0).unsqueeze(0), (state["h"], state["c"]))
    torch.testing.assert_close(new["h"], h)
    torch.testing.assert_close(new["c"], c)
    expected = (out[0] @ rule.weight_out.t() + rule.bias_out).squeeze(1) * 0.1
    torch.testing.assert_close(step, expected)


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


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        CoordinateLSTMConfig(hidden_size=0)
    with pytest.raises(ValueError):
        CoordinateLSTMConfig(momentum_decays=(1.0,))
    with pytest.raises(TypeError):
        CoordinateLSTM(CoordinateLSTMConfig(), hidden_size=3)


def test_config_round_trip() -> None:
    rule = CoordinateLSTM(hidden_size=8, num_layers=1, momentum_decays=(0.9,))
    again = CoordinateLSTM.from_config_dict(rule.config_dict())
    assert again.config == rule.config
    with pytest.raises(ValueError, match="unknown"):
        CoordinateLSTM.from_config_dict({"hidden": 3})
