"""End to end: each optimizer lowers the loss of a small MLP on generated data."""

import pytest
import torch

from learnedopt import LSTMOptimizer, MetaLSTMOptimizer
from learnedopt.demo import make_problem, train


@pytest.mark.parametrize(
    "make",
    [
        lambda p: LSTMOptimizer(p),
        lambda p: LSTMOptimizer(p, foreach=False),
        lambda p: LSTMOptimizer(p, state_dtype=torch.bfloat16),
        lambda p: MetaLSTMOptimizer(p),
    ],
    ids=["lstm", "lstm-reference", "lstm-bf16-state", "meta-lstm"],
)
def test_small_mlp_loss_goes_down_in_200_steps(make) -> None:
    x, y = make_problem(seed=0, n=256)
    losses = train(make, x, y, steps=200)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_initial_meta_lstm_acts_as_gradient_descent() -> None:
    """With its initial weights the meta-learner is SGD with step sigmoid(b_i) and decay sigmoid(b_f)."""
    x, y = make_problem(seed=0, n=256)
    meta = MetaLSTMOptimizer(torch.nn.Linear(1, 1).parameters(), weights="meta-lstm-2017")
    forget, step_size = torch.sigmoid(meta.rule.bias_fi).tolist()
    learned = train(lambda p: MetaLSTMOptimizer(p, weights="meta-lstm-2017"), x, y, steps=200)
    sgd = train(lambda p: torch.optim.SGD(p, lr=step_size, weight_decay=(1 - forget) / step_size), x, y, steps=200)
    assert learned[-1] < 0.9 * learned[0]
    assert abs(learned[-1] - sgd[-1]) < 0.05 * sgd[0]


def test_meta_lstm_adam_preset_acts_as_adamw() -> None:
    """``meta-lstm-adam`` untrained: Adam's direction with step sigmoid(b_i) and decoupled decay
    1 - sigmoid(b_f), i.e. AdamW, up to its small random LSTM's modulation of the gates."""
    x, y = make_problem(seed=0, n=256)
    meta = MetaLSTMOptimizer(torch.nn.Linear(1, 1).parameters(), weights="meta-lstm-adam")
    forget, step_size = torch.sigmoid(meta.rule.bias_fi).tolist()
    learned = train(lambda p: MetaLSTMOptimizer(p, weights="meta-lstm-adam"), x, y, steps=200)
    adamw = train(lambda p: torch.optim.AdamW(p, lr=step_size, weight_decay=(1 - forget) / step_size), x, y, steps=200)
    sgd = train(lambda p: torch.optim.SGD(p, lr=step_size), x, y, steps=200)
    # the curves agree to 2% of the current loss over the first 50 steps (measured: 0.5% at step
    # 20, 1.7% at 50), and both end near zero, far below gradient descent with the same step
    for t in (5, 20, 50):
        assert abs(learned[t] - adamw[t]) < 0.02 * adamw[t], t
    assert max(learned[-1], adamw[-1]) < 1e-3 * learned[0]
    assert sgd[-1] > 0.5 * sgd[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("maximize", [False, True])
def test_meta_lstm_adam_without_its_lstm_is_adamw_per_param_group(dtype, maximize) -> None:
    """``meta-lstm-adam`` with the gates' weights zeroed (gates ``sigmoid(bias)``, not modulated by
    its random LSTM) is AdamW, step for step: lr ``sigmoid(b_i)``, decoupled weight decay
    ``(1 - sigmoid(b_f)) / sigmoid(b_i)``, betas (0.9, 0.999), eps 1e-8, over 120 steps on a small
    MLP, with two param groups of different ``lr`` (which scales the learned decay with the step,
    as AdamW's ``lr`` scales both), ``maximize`` and the optimizer's own ``weight_decay`` (applied
    after the step: AdamW's step, then ``p *= 1 - lr * weight_decay``). Float64 to rounding; in
    float32 the gates are float32 values (``1 - f`` is 6.020e-5 there, not 6.014e-5: ``f`` near 1
    rounds to a multiple of 2^-24), as are the betas, so the reference takes those."""
    from learnedopt.weights import load_weights

    rule, _ = load_weights("meta-lstm-adam")
    with torch.no_grad():
        rule.weight_fi.zero_()
    bias = rule.bias_fi.to(dtype)
    forget, step_size = torch.sigmoid(bias).tolist()
    betas = (0.9, 0.999) if dtype == torch.float64 else tuple(float(torch.tensor(b, dtype=dtype)) for b in (0.9, 0.999))
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=generator, dtype=torch.float64), torch.randn(64, 3, generator=generator, dtype=torch.float64)

    def model() -> torch.nn.Module:
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()

    lrs, decays = (1.0, 0.3), (0.0, 0.02)
    learned, reference = model().to(dtype), model()
    ps, qs = list(learned.parameters()), list(reference.parameters())
    meta = MetaLSTMOptimizer(
        [{"params": ps[:2], "lr": lrs[0], "weight_decay": decays[0]}, {"params": ps[2:], "lr": lrs[1], "weight_decay": decays[1]}],
        weights=rule, maximize=maximize, state_dtype=dtype,
    )  # fmt: skip
    adamw = torch.optim.AdamW(
        [{"params": qs[:2], "lr": lrs[0] * step_size}, {"params": qs[2:], "lr": lrs[1] * step_size}],
        betas=betas, eps=1e-8, weight_decay=(1 - forget) / step_size, maximize=maximize,
    )  # fmt: skip
    sign = -1e-3 if maximize else 1.0  # ascend a bounded objective
    for _ in range(120):
        for net, opt in ((learned, meta), (reference, adamw)):
            opt.zero_grad()
            in_dtype = next(net.parameters()).dtype
            loss = sign * (net(x.to(in_dtype)) - y.to(in_dtype)).square().mean()
            loss.backward()
            opt.step(loss=loss) if opt is meta else opt.step()
        with torch.no_grad():
            for q in qs:
                q.mul_(1 - (lrs[0] * decays[0] if any(q is p for p in qs[:2]) else lrs[1] * decays[1]))
    got = torch.cat([p.detach().double().flatten() for p in ps])
    want = torch.cat([q.detach().flatten() for q in qs])
    assert not torch.equal(want, torch.cat([p.detach().flatten() for p in model().parameters()]))
    tolerance = 1e-13 if dtype == torch.float64 else 1e-5
    assert (got - want).abs().max() <= tolerance * want.abs().max()
