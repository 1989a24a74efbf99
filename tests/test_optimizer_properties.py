"""Property-based checks of the optimizers' semantics (hypothesis, a few small derandomized
examples each): a coordinatewise rule steps a parameter's elements alike however they are
permuted, reshaped, laid out, split into parameters or spread over param groups of equal options;
a state dict saved mid-run under random group structures and per-group options resumes bit for
bit; a ``None`` gradient is the parameter left out of that step (no state made or advanced), as
in ``torch.optim``; ``lr=0`` changes no parameter but advances the states as any ``lr`` does;
``weight_decay`` is the multiplication the README documents, after the learned step; and an
update rule's rows are independent coordinates."""

from __future__ import annotations

import copy
import io

import torch
from helpers import OPTIMIZERS, assert_same_params_and_states, make_mixed_params, param_specs, set_grads, step
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FEW = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

KINDS = st.sampled_from(["lstm", "meta"])
FOREACH = st.sampled_from([None, True, False])


def coordinates(opt, p: torch.Tensor, name: str) -> torch.Tensor:
    """State ``name`` of ``p`` as ``(*lead, p.numel(), *trail)`` in the parameter's logical
    (row-major) element order, read through ``state_dict()``'s parameter-shaped view."""
    spec = opt.rule.state_spec()[name]
    params = [q for group in opt.param_groups for q in group["params"]]
    saved = opt.state_dict()["state"][next(i for i, q in enumerate(params) if q is p)][name]
    return saved.reshape(*spec.lead, p.numel(), *spec.trail)


@FEW
@given(
    kind=KINDS,
    n=st.integers(1, 30),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    state_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    foreach=FOREACH,
    chunk=st.integers(1, 40),
    limit=st.sampled_from([0, 2048]),
    options=st.fixed_dictionaries(
        {"lr": st.sampled_from([0.3, 1.0]), "maximize": st.booleans(), "weight_decay": st.sampled_from([0.0, 0.1])}
    ),
    data=st.data(),
)
def test_property_permuted_reshaped_or_split_coordinates_step_alike(
    kind, n, dtype, state_dtype, foreach, chunk, limit, options, data
) -> None:
    """One ``n``-element parameter against its elements permuted, cut into pieces, each piece
    reshaped (some transposed views), the pieces listed in any order over up to three param groups
    of equal options: every element takes the same step and holds the same states, bit for bit
    on the batched path with any chunking, shared rule calls or not, to rounding on the per-tensor
    reference."""
    perm = data.draw(st.permutations(range(n)))
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=3))) if n > 1 else []
    bounds = list(zip([0, *cuts], [*cuts, n], strict=True))
    shapes, transposed = [], []
    for a, b in bounds:
        size = b - a
        rows = data.draw(st.sampled_from([r for r in range(1, size + 1) if size % r == 0]))
        shapes.append((rows, size // rows) if data.draw(st.booleans()) else (size,))
        transposed.append(len(shapes[-1]) == 2 and min(shapes[-1]) > 1 and data.draw(st.booleans()))
    group_of = data.draw(st.lists(st.integers(0, 2), min_size=len(bounds), max_size=len(bounds)))
    order = data.draw(st.permutations(range(len(bounds))))

    g = torch.Generator().manual_seed(n)
    start = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    grads = [(torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** (t - 1)).to(dtype) for t in range(3)]
    index = torch.tensor(perm)

    def piece(values: torch.Tensor, number: int) -> torch.Tensor:
        a, b = bounds[number]
        out = values[index][a:b].reshape(shapes[number])
        return out.t().contiguous().t() if transposed[number] else out.clone()

    whole = start.clone().requires_grad_(True)
    pieces = [piece(start, i).requires_grad_(True) for i in range(len(bounds))]
    assert all(p.is_contiguous() != t for p, t in zip(pieces, transposed, strict=True))
    groups = [{"params": [pieces[i] for i in order if group_of[i] == k]} for k in range(3)]
    runs = []
    for params, param_groups in (([whole], [{"params": [whole]}]), (pieces, [grp for grp in groups if grp["params"]])):
        opt = OPTIMIZERS[kind](param_groups, foreach=foreach, state_dtype=state_dtype, **options)
        opt.chunk, opt.group_batch_limit = chunk, limit
        for t, grad in enumerate(grads):
            for i, p in enumerate(params):
                p.grad = grad.clone() if p is whole else piece(grad, i)
            step(opt, 0.5 + t)
        runs.append(opt)
    opt, split = runs
    # the per-tensor reference runs each tensor's rows as they come, through PyTorch's kernels
    # whose rounding of a row may depend on the number of rows and its place among them (README:
    # it agrees only to rounding); the batched path pads its chunks so that it does not
    same = torch.equal if foreach is not False else lambda a, b: torch.testing.assert_close(a, b) is None
    for i, p in enumerate(pieces):
        assert same(p, piece(whole.detach(), i)), i
        for name, spec in opt.rule.state_spec().items():
            a, b = bounds[i]
            want = coordinates(opt, whole, name).index_select(len(spec.lead), index).narrow(len(spec.lead), a, b - a)
            assert same(coordinates(split, p, name), want), (i, name)
        assert int(split.state[p]["step"]) == int(opt.state[whole]["step"]) == 3


#: per-group options of the resume, None-gradient and weight-decay properties
GROUP_OPTIONS = st.fixed_dictionaries(
    {
        "lr": st.sampled_from([0.0, 0.3, 1.0]),
        "maximize": st.booleans(),
        "weight_decay": st.sampled_from([0.0, 0.05]),
        "state_dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.float16]),
        "foreach": FOREACH,
    }
)


def random_groups(data, n: int, *, max_groups: int = 4, options=GROUP_OPTIONS) -> list[tuple[list[int], dict]]:
    """Up to ``max_groups`` param groups over parameters ``0..n-1`` (each in one group, in a
    drawn order), each with drawn options: ``(indices, options)``."""
    count = data.draw(st.integers(1, min(max_groups, n)))
    group_of = data.draw(st.lists(st.integers(0, count - 1), min_size=n, max_size=n))
    order = data.draw(st.permutations(range(n)))
    groups = [([i for i in order if group_of[i] == k], data.draw(options)) for k in range(count)]
    return [(indices, opts) for indices, opts in groups if indices]


def build(kind, params, groups, *, chunk, limit, with_options=True):
    opt = OPTIMIZERS[kind]([{"params": [params[i] for i in indices], **(opts if with_options else {})} for indices, opts in groups])
    opt.chunk, opt.group_batch_limit = chunk, limit
    return opt


def grouped_cases(**more: st.SearchStrategy):
    """Run the test on drawn ``kind``, ``specs`` (up to 5 parameters), ``chunk``, ``limit`` (the
    group batch limit), ``data`` (for further draws) and the strategies ``more``, under
    :data:`FEW`'s settings."""
    strategies = dict(kind=KINDS, specs=param_specs(5), chunk=st.integers(1, 24), limit=st.sampled_from([0, 2048]))
    return lambda test: FEW(given(**strategies, **more, data=st.data())(test))


@grouped_cases()
def test_property_resume_under_random_groups_and_options_is_bit_identical(kind, specs, chunk, limit, data) -> None:
    """Saved with ``torch.save`` after any step, under up to four param groups of drawn options
    (``lr`` 0 included, ``maximize``, ``weight_decay``, every ``state_dtype``, every ``foreach``),
    parameters of every dtype and layout, some gradients None: an optimizer built on fresh
    parameters (laid out as saved, or made contiguous) with default options, and its own chunk
    size and group batch limit, takes the groups' options from the state dict, and goes on to end
    equal to the uninterrupted run, parameters, states and saved options."""
    n, steps = len(specs), 4
    groups = random_groups(data, n)
    saved_at = data.draw(st.integers(0, steps))
    contiguous = data.draw(st.booleans())
    # chunking and shared rule calls change no bit of a step: the resumed run may use others
    chunk2, limit2 = data.draw(st.integers(1, 24)), data.draw(st.sampled_from([0, 2048]))
    skips = data.draw(st.lists(st.sets(st.integers(0, n - 1)), min_size=steps, max_size=steps))
    params = make_mixed_params(specs)
    opt = build(kind, params, groups, chunk=chunk, limit=limit)
    resumed = resumed_opt = None
    for t in range(steps + 1):
        if t == saved_at:
            buffer = io.BytesIO()
            torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            # the resumed model may lay its parameters out otherwise (built without channels_last)
            resumed = [(p.contiguous() if contiguous else p).requires_grad_(True) for p in saved["params"]]
            resumed_opt = build(kind, resumed, groups, chunk=chunk2, limit=limit2, with_options=False)
            resumed_opt.load_state_dict(saved["opt"])
        if t == steps:
            break
        for ps, o in ((params, opt), (resumed, resumed_opt)):
            if o is not None:
                set_grads(ps, seed=t, skip=skips[t])
                step(o, 0.5 + t)
    assert_same_params_and_states(params, opt, resumed, resumed_opt)
    for group, other in zip(opt.param_groups, resumed_opt.param_groups, strict=True):
        assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in other.items() if k != "params"}


@grouped_cases()
def test_property_a_none_gradient_is_the_parameter_left_out_of_the_step(kind, specs, chunk, limit, data) -> None:
    """As in ``torch.optim``: under drawn groups, options and paths, with each parameter's
    gradient drawn per step as None, zero or random, every parameter ends as if it alone were
    stepped by an optimizer of its own (its group's options) at exactly the steps where its
    gradient was not None, bit for bit: a None gradient changes neither the parameter nor its
    states, a zero one is a step. A parameter never given a gradient has no state, in
    ``optimizer.state`` or the state dict, as Adam's."""
    n, steps = len(specs), 3
    options = GROUP_OPTIONS.map(lambda o: {**o, "lr": 0.5 if o["lr"] == 0 else o["lr"]})  # lr 0 with zero grads: init_state
    groups = random_groups(data, n, options=options)
    kinds = data.draw(st.lists(st.lists(st.sampled_from(["none", "zero", "random"]), min_size=n, max_size=n), min_size=steps, max_size=steps))
    params = make_mixed_params(specs)
    opt = build(kind, params, groups, chunk=chunk, limit=limit)
    alone = make_mixed_params(specs)
    opts = {}
    for indices, opts_of_group in groups:
        for i in indices:
            opts[i] = build(kind, alone, [([i], opts_of_group)], chunk=chunk, limit=limit)
    for t in range(steps):
        set_grads(params, seed=t, skip={i for i in range(n) if kinds[t][i] == "none"})
        for i, p in enumerate(params):
            if kinds[t][i] == "zero":
                p.grad.zero_()
            alone[i].grad = None if p.grad is None else p.grad.clone()
        step(opt, 0.5 + t)
        for i in range(n):
            if alone[i].grad is not None:
                step(opts[i], 0.5 + t)
    saved = opt.state_dict()["state"]
    listed = [p for group in opt.param_groups for p in group["params"]]
    for i, (p, q) in enumerate(zip(params, alone, strict=True)):
        assert_same_params_and_states([p], opt, [q], opts[i])
        stepped = sum(kinds[t][i] != "none" for t in range(steps))
        number = next(k for k, r in enumerate(listed) if r is p)  # the state dict's index of p
        assert (number in saved) == (p in opt.state and bool(opt.state[p])) == (stepped > 0), i
        if stepped:
            assert int(opt.state[p]["step"]) == stepped


@grouped_cases(lr=st.sampled_from([0.3, 1.0, 2.5]))
def test_property_lr_zero_changes_no_parameter_and_advances_the_states_as_any_lr(kind, specs, chunk, limit, lr, data) -> None:
    """After drawn steps, under drawn groups and options, one step with ``lr`` 0 in some groups
    (weight decay or not): those groups' parameters do not change, not even by their weight
    decay, while their states (and step counts) become what a copy of the optimizer stepped with
    the same gradients at ``lr`` > 0 made them; the other groups step as in that copy."""
    n = len(specs)
    options = GROUP_OPTIONS.map(lambda o: {**o, "lr": 0.5})
    groups = random_groups(data, n, options=options)
    zero = data.draw(st.lists(st.booleans(), min_size=len(groups), max_size=len(groups)))
    skip = data.draw(st.sets(st.integers(0, n - 1)))
    params = make_mixed_params(specs)
    opt = build(kind, params, groups, chunk=chunk, limit=limit)
    before_steps = data.draw(st.integers(0, 2))
    for t in range(before_steps):
        set_grads(params, seed=t)
        step(opt, 0.5 + t)
    # the documented exception: a first step at lr 0 everywhere whose gradients are all zero (here:
    # empty), one for each parameter, is torch's checkpoint helpers' and runs init_state()
    initialisation = before_steps == 0 and all(zero) and not skip and all(p.numel() == 0 for p in params)
    other = copy.deepcopy(opt)
    others = [p for group in other.param_groups for p in group["params"]]
    listed = [p for group in opt.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in listed]
    for group, other_group, at_zero in zip(opt.param_groups, other.param_groups, zero, strict=True):
        group["lr"], other_group["lr"] = (0.0, lr) if at_zero else (lr, lr)
    set_grads(params, seed=7, skip=skip)
    for p, q in zip(listed, others, strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    step(opt, 3.0)
    step(other, 3.0)
    at = 0
    for group, at_zero in zip(opt.param_groups, zero, strict=True):
        for p in group["params"]:
            q, old = others[at], before[at]
            at += 1
            assert opt.state[p].keys() == other.state[q].keys()
            assert all(torch.equal(v, other.state[q][k]) for k, v in opt.state[p].items() if not (initialisation and k == "step"))
            assert torch.equal(p, old if at_zero else q)
            if initialisation:
                assert int(opt.state[p]["step"]) == 0 and int(other.state[q]["step"]) == 1


@grouped_cases()
def test_property_weight_decay_multiplies_each_stepped_parameter_after_its_step(kind, specs, chunk, limit, data) -> None:
    """The README's decoupled weight decay under drawn groups, options and paths: bit for bit the
    same optimizer without it, each parameter that took a step (a gradient not None) then
    multiplied by ``1 - lr * weight_decay`` of its group, in its own dtype; the states equal too,
    and the rule reads the decayed values at the next step."""
    n, steps = len(specs), 3
    options = GROUP_OPTIONS.map(lambda o: {**o, "weight_decay": 0.0 if o["weight_decay"] == 0 else 0.2})
    groups = random_groups(data, n, options=options)
    skips = data.draw(st.lists(st.sets(st.integers(0, n - 1)), min_size=steps, max_size=steps))
    params, others = make_mixed_params(specs), make_mixed_params(specs)
    opt = build(kind, params, groups, chunk=chunk, limit=limit)
    other = build(kind, others, [(indices, {**opts, "weight_decay": 0.0}) for indices, opts in groups], chunk=chunk, limit=limit)
    for t in range(steps):
        set_grads(params, seed=t, skip=skips[t])
        set_grads(others, seed=t, skip=skips[t])
        step(opt, 0.5 + t)
        step(other, 0.5 + t)
        with torch.no_grad():
            for indices, opts in groups:
                for i in indices:
                    if i not in skips[t] and opts["lr"] * opts["weight_decay"]:
                        others[i].mul_(1.0 - opts["lr"] * opts["weight_decay"])
    assert_same_params_and_states(params, opt, others, other)


#: the update rules of the rule-level property: tiny random float64 ones of each feature set, and
#: the default presets of both optimizers in float32
RULES = {
    "lstm": {},
    "lstm-moments": {"momentum_decays": (0.5, 0.9), "rms_decays": (0.99,)},
    "lstm-param": {"param_input": True, "momentum_decays": (0.9,)},
    "meta": {},
    "meta-adam": {"momentum_decay": 0.9, "rms_decay": 0.99},
}


def rule_of(name: str):
    from helpers import random_rule

    from learnedopt.weights import build_preset

    if name in ("l2l-blend", "meta-lstm-adam-mnist"):
        return build_preset(name)[0]
    return random_rule("meta" if name.startswith("meta") else "lstm", seed=1, **RULES[name])


@FEW
@given(
    name=st.sampled_from([*RULES, "l2l-blend", "meta-lstm-adam-mnist"]),
    m=st.integers(1, 70),
    data=st.data(),
)
def test_property_a_rules_rows_are_independent_coordinates(name, m, data) -> None:
    """The contract of :class:`~learnedopt.nn.UpdateRule` that the batched path and group sharing
    rest on: row ``i`` of the step and of the new states depends on row ``i`` of the gradient,
    parameter and states (and the loss) alone. The rule called on the rows permuted, or on two
    parts of them separately, gives the rows of the call on all of them, permuted or cut (to
    rounding: a PyTorch kernel may round a row by the number of rows), and modifies no input."""
    rule = rule_of(name)
    dtype = next(rule.parameters()).dtype
    perm = torch.tensor(data.draw(st.permutations(range(m))))
    cut = data.draw(st.integers(0, m))
    g = torch.Generator().manual_seed(m)
    grad = torch.randn(m, generator=g, dtype=dtype) * torch.logspace(-3, 1, m, dtype=dtype)
    param = torch.randn(m, generator=g, dtype=dtype)
    loss = torch.tensor(0.7, dtype=dtype) if rule.needs_loss else None
    state = rule.init_state(m, dtype=dtype, device="cpu")
    with torch.no_grad():
        for _ in range(2):  # states that are not all zero
            _, state = rule(grad.flip(0), param, state, loss)
        dims = {k: len(spec.lead) for k, spec in rule.state_spec().items()}
        inputs = (grad.clone(), param.clone(), {k: v.clone() for k, v in state.items()})
        step_all, state_all = rule(grad, param, state, loss)
        assert torch.equal(grad, inputs[0]) and torch.equal(param, inputs[1])
        assert all(torch.equal(state[k], inputs[2][k]) for k in state)
        step_perm, state_perm = rule(grad[perm], param[perm], {k: v.index_select(dims[k], perm) for k, v in state.items()}, loss)
        torch.testing.assert_close(step_perm, step_all[perm])
        for k in dims:
            torch.testing.assert_close(state_perm[k], state_all[k].index_select(dims[k], perm))
        parts = [
            rule(grad[a:b], param[a:b], {k: v.narrow(dims[k], a, b - a) for k, v in state.items()}, loss) for a, b in ((0, cut), (cut, m))
        ]
        torch.testing.assert_close(torch.cat([s for s, _ in parts]), step_all)
        for k in dims:
            torch.testing.assert_close(torch.cat([new[k] for _, new in parts], dim=dims[k]), state_all[k])
