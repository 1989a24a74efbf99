"""States a torch user puts in ``optimizer.state`` by hand (an assignment, a wrapper's own load),
and the manipulations of it ``torch.optim`` allows: checked as ``load_state_dict`` checks saved
ones, alike on the batched and the per-tensor path."""

from __future__ import annotations

import pytest
import torch
from helpers import make_params, set_grads

from learnedopt import LSTMOptimizer

PATHS = pytest.mark.parametrize("foreach", [None, False], ids=["batched", "per-tensor"])


def stepped(foreach, *, names=False):
    """Two parameters, an optimizer of them stepped once, and the parameters' values after it."""
    params = make_params([(4,), (3, 2)], dtype=torch.float32)
    if names:
        opt = LSTMOptimizer([{"params": params, "param_names": ["w", "b"]}], foreach=foreach)
    else:
        opt = LSTMOptimizer(params, foreach=foreach)
    set_grads(params, 0)
    opt.step()
    set_grads(params, 1)
    return params, opt, [p.detach().clone() for p in params]


@PATHS
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda h: torch.zeros(*h.shape[:-1], h.shape[-1] + 1), r"has shape \(2, 6, 21\), but its 6 element\(s\) need \(2, 6, 20\)"),
        # broadcastable into the right shape: copied as it is, it spread one coordinate's state over all
        (lambda h: torch.zeros(h.shape[0], 1, h.shape[2]), r"has shape \(2, 1, 20\), but its 6 element\(s\) need \(2, 6, 20\)"),
        (lambda h: h.tolist(), r"is a list, not a tensor"),
        (lambda h: h.numpy().copy(), r"is a ndarray, not a tensor"),
        # cast in silence (a complex one dropping its imaginary part), as load_state_dict refuses
        (lambda h: h.to(torch.int64), r"is a int64 tensor: rule states are floating-point"),
        (lambda h: h.to(torch.complex64), r"is a complex64 tensor: rule states are floating-point"),
        (lambda h: h.to(torch.bool), r"is a bool tensor: rule states are floating-point"),
        (lambda h: h.to("meta"), r"is on the meta device, which holds no values"),
    ],
    ids=["shape", "broadcastable", "list", "ndarray", "int64", "complex", "bool", "meta"],
)
def test_a_bad_state_put_by_hand_is_refused_naming_parameter_and_state(foreach, make, message) -> None:
    """A rule state of the wrong shape, kind or dtype assigned to ``optimizer.state[p]`` raised a
    cryptic error of torch's (``copy_()``'s, a missing ``.to``, a device mismatch inside the rule),
    blamed a resize, or was cast in silence; now both paths raise ValueError naming the state and
    the parameter, before anything changes."""
    params, opt, before = stepped(foreach)
    opt.state[params[1]]["h"] = make(opt.state[params[1]]["h"])
    with pytest.raises(ValueError, match=r"^the state 'h' of param_groups\[0\]\['params'\]\[1\] \(shape \(3, 2\)\) " + message):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


@PATHS
def test_a_bad_state_put_by_hand_is_named_by_the_parameter_name(foreach) -> None:
    params, opt, _ = stepped(foreach, names=True)
    opt.state[params[0]]["c"] = opt.state[params[0]]["c"][:, :2]
    with pytest.raises(ValueError, match=r"^the state 'c' of parameter 'w' \(shape \(4,\)\) has shape \(2, 2, 20\), but its 4 element"):
        opt.step()
    with pytest.raises(ValueError, match=r"^the state 'c' of parameter 0 \(shape \(4,\)\) has shape"):
        opt.state_dict()


@PATHS
def test_a_state_on_another_device_than_its_parameter_is_moved_to_it(foreach) -> None:
    """The batched path copies a state put on another device into its buffers, on the
    parameter's; the per-tensor path stepped it where it was (mixing devices inside the rule:
    torch's device error). It moves it to the parameter's device, as it converts its dtype.
    (Parameters on ``meta``: the CPU's only other device.)"""
    params = [torch.nn.Parameter(torch.zeros(4, device="meta"))]
    opt = LSTMOptimizer(params, foreach=foreach)
    params[0].grad = torch.zeros(4, device="meta")
    opt.step()
    opt.state[params[0]] = {name: torch.zeros(value.shape) if name != "step" else value for name, value in opt.state[params[0]].items()}
    opt.step()
    assert {value.device.type for name, value in opt.state[params[0]].items() if name != "step"} == {"meta"}
    assert float(opt.state[params[0]]["step"]) == 2


@PATHS
def test_a_step_count_put_by_hand_as_a_number_is_taken_as_load_state_dict_takes_it(foreach) -> None:
    """``optimizer.state[p]["step"] = 1`` (a number, as torch.optim's load converts one) failed in
    the step count's ``_foreach_add_`` after every parameter had been updated: a half-finished
    step, refused by every later one. It is converted as ``load_state_dict`` converts a saved one,
    before anything changes; one that is no non-negative number is refused naming the parameter,
    changing nothing, and the optimizer steps once it is put right."""
    params, opt, before = stepped(foreach)
    reference = LSTMOptimizer(make_params([(4,), (3, 2)], dtype=torch.float32), foreach=foreach)
    reference.load_state_dict(opt.state_dict())
    for bad, message in [(-1, "got -1"), ("3", "got '3'"), (torch.tensor(1.0, device="meta"), "meta device")]:
        opt.state[params[1]]["step"] = bad
        with pytest.raises(ValueError, match=r"^the state 'step' of param_groups\[0\]\['params'\]\[1\] \(shape \(3, 2\)\) .*" + message):
            opt.step()
        assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    opt.state[params[1]]["step"] = 1
    opt.step()
    expected = reference.param_groups[0]["params"]
    for p, q in zip(expected, before, strict=True):
        with torch.no_grad():
            p.copy_(q)
        p.grad = None
    for p, q in zip(expected, params, strict=True):
        p.grad = q.grad.clone()
    reference.step()
    assert all(torch.equal(p, q) for p, q in zip(params, expected, strict=True))
    assert opt.state[params[1]]["step"].dtype == torch.float32 and float(opt.state[params[1]]["step"]) == 2


@PATHS
def test_a_state_lacking_some_of_the_rule_states_is_refused(foreach) -> None:
    """A state holding some of the rule's states but not all (``del optimizer.state[p]["h"]``, or
    an assignment of too few) raised ``KeyError: 'h'`` on the per-tensor path, after the
    parameters before it had been updated (a half-finished step, refused by every later one), and
    the batched path replaced the states it did hold by fresh ones in silence. Both refuse it
    naming the parameter and the missing states, changing nothing (``torch.optim.Adam`` raises
    ``KeyError`` before changing anything)."""
    params, opt, before = stepped(foreach)
    del opt.state[params[1]]["h"]
    with pytest.raises(ValueError, match=r"^the state of param_groups\[0\]\['params'\]\[1\] \(shape \(3, 2\)\) lacks \['h'\] of this CoordinateLSTM rule's"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    del opt.state[params[1]]  # what the message advises: a fresh state
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 2 and float(opt.state[params[1]]["step"]) == 1


@PATHS
def test_a_state_lacking_only_its_step_count_keeps_its_rule_states(foreach) -> None:
    """A state put by hand with every rule state but no ``"step"``: the batched path stepped from
    those states, counting from 0, while the per-tensor path replaced them by fresh ones in
    silence. Both step from them now (the count does not enter the update)."""
    params, opt, before = stepped(foreach)
    reference = LSTMOptimizer(make_params([(4,), (3, 2)], dtype=torch.float32), foreach=foreach)
    reference.load_state_dict(opt.state_dict())
    del opt.state[params[1]]["step"]
    opt.step()
    expected = reference.param_groups[0]["params"]
    with torch.no_grad():
        for p, q, b in zip(expected, params, before, strict=True):
            p.copy_(b)
            p.grad = q.grad.clone()
    reference.step()
    assert all(torch.equal(p, q) for p, q in zip(params, expected, strict=True))
    assert float(opt.state[params[1]]["step"]) == 1


@PATHS
def test_state_dict_names_the_state_of_a_parameter_taken_out_of_the_param_groups(foreach) -> None:
    """A param group removed from ``param_groups`` (or a parameter from its group) leaves its
    parameters' states in ``optimizer.state``; ``state_dict()`` then raised torch's bare
    ``KeyError: <id>`` (``torch.optim.Adam`` raises it too), naming nothing. It raises ValueError
    saying what holds the state and how to drop it."""
    params = make_params([(4,), (3, 2)], dtype=torch.float32)
    opt = LSTMOptimizer([{"params": params[:1]}, {"params": params[1:]}], foreach=foreach)
    set_grads(params, 0)
    opt.step()
    del opt.param_groups[0]
    opt.step()
    with pytest.raises(ValueError, match=r"^optimizer.state holds the state of a parameter of shape \(4,\) that no param group lists"):
        opt.state_dict()
    del opt.state[params[0]]
    assert list(opt.state_dict()["state"]) == [0]


@PATHS
@pytest.mark.parametrize("shared", ["dict", "tensor"])
def test_a_state_put_by_hand_that_is_another_parameters_is_refused(foreach, shared) -> None:
    """``optimizer.state[q] = optimizer.state[p]`` for two parameters of one shape made both
    step (and count) the one state, once per parameter, in silence (``torch.optim.Adam`` does
    too), and a state tensor of ``p``'s given to ``q`` was stepped twice by the per-tensor path.
    The step that finds states put by hand refuses a state shared with another parameter,
    changing nothing."""
    params = make_params([(4,), (4,), (2,)], dtype=torch.float32)
    opt = LSTMOptimizer(params, foreach=foreach)
    set_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    if shared == "dict":
        opt.state[params[1]] = opt.state[params[0]]
        message = r"^the state of param_groups\[0\]\['params'\]\[1\] \(shape \(4,\)\) is the state of param_groups\[0\]\['params'\]\[0\] \(shape \(4,\)\) too"
    else:
        opt.state[params[1]]["c"] = opt.state[params[0]]["c"]
        message = r"^the state 'c' of param_groups\[0\]\['params'\]\[1\] \(shape \(4,\)\) is the state 'c' of param_groups\[0\]\['params'\]\[0\] \(shape \(4,\)\) too"
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    opt.state[params[1]] = {name: value.clone() for name, value in opt.state[params[0]].items()}  # a copy: taken
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [2, 2, 2]


@PATHS
def test_a_step_of_valid_states_names_no_parameter(foreach, monkeypatch) -> None:
    """The name of a parameter (``_name_of``: a search of its group's list) is for an error
    message: check_states built it for every state of every parameter at every step of the
    per-tensor path, whether it refused or not, a cost quadratic in a group's parameters."""
    params, opt, before = stepped(foreach)

    def no_name(*args):
        raise AssertionError("a parameter was named for an error that was not raised")

    monkeypatch.setattr(opt, "_name_of", no_name)
    opt.step()
    opt.step()
    assert not all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
