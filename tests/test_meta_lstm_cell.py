import math

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
