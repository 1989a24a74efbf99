"""MAML and Reptile with several model inputs: a tuple or list (positional arguments) or dict
(keyword arguments) of tensors against the same model taking them packed in one tensor."""

import re
from collections import UserDict
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from learnedopt.meta import Reptile
from learnedopt.meta.maml import MAML


class TwoInputs(nn.Module):
    """``forward(features (N, 3), mask (N,))``, as a token model takes ids and an attention mask;
    ``packed=True`` takes both in one ``(N, 4)`` tensor and splits it."""

    def __init__(self, packed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.packed = packed
        self.double()

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed:
            features, mask = features[..., :3], features[..., 3]
        return self.head(torch.tanh(self.body(features)) * mask[..., None])


class OneTupleArgument(nn.Module):
    """``forward((features, mask))``: a model taking one tuple, given as ``((features, mask),)``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TwoInputs()

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.inner(*pair)


def packed_episode(tasks=3, shots=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs, xq = (torch.cat([torch.randn(tasks, shots, 3, generator=g, dtype=torch.float64),
                         torch.rand(tasks, shots, 1, generator=g, dtype=torch.float64)], dim=-1) for _ in range(2))  # fmt: skip
    ys, yq = (torch.randint(0, 2, (tasks, shots), generator=g) for _ in range(2))
    return xs, ys, xq, yq


def split(x: torch.Tensor, kind: str):
    """A packed ``(..., 4)`` input as the two-input model's arguments."""
    features, mask = x[..., :3], x[..., 3]
    return {"tuple": (features, mask), "list": [features, mask], "dict": {"features": features, "mask": mask},
            "reordered": {"mask": mask, "features": features},  # keyword arguments by name, not by order
            "nested": ((features, mask),)}[kind]  # fmt: skip


def meta_gradients(kind: str, maml_kwargs: dict, steps: int = 2):
    """The initialisation's and the support inputs' meta-gradients, and the query losses."""
    xs, ys, xq, yq = packed_episode()
    xs.requires_grad_(True)
    model = OneTupleArgument() if kind == "nested" else TwoInputs(packed=kind == "packed")
    maml = MAML(model, inner_lr=0.5, inner_steps=steps, **maml_kwargs)
    x_s, x_q = (xs, xq) if kind == "packed" else (split(xs, kind), split(xq, kind))
    losses = maml.query_losses(x_s, ys, x_q, yq)
    losses[:, -1].mean().backward()
    return [p.grad for p in model.parameters()], xs.grad, losses.detach()


PATHS = {
    "vmap": {"vectorize": True},
    "loop": {"vectorize": False},
    "checkpointed": {"vectorize": False, "checkpoint_steps": True},
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "reordered", "nested"])
def test_meta_gradients_with_several_inputs_equal_the_packed_models(path, first_order, kind) -> None:
    options = {**PATHS[path], "first_order": first_order}
    got_grads, got_input_grad, got_losses = meta_gradients(kind, options)
    want_grads, want_input_grad, want_losses = meta_gradients("packed", options)
    assert torch.equal(got_losses, want_losses)  # the same operations on the same values: bit for bit
    assert all(torch.equal(got, want) for got, want in zip(got_grads, want_grads, strict=True))
    if first_order:  # no meta-gradient reaches the support set
        assert got_input_grad is None and want_input_grad is None
    else:  # the packed tensor's gradient sums its slices' in another order
        torch.testing.assert_close(got_input_grad, want_input_grad, rtol=1e-12, atol=1e-14)


def test_every_path_gives_the_same_meta_gradient_with_dict_inputs() -> None:
    vmapped, looped, checkpointed = (meta_gradients("dict", options)[0] for options in PATHS.values())
    for a, b, c in zip(vmapped, looped, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_targets_may_be_a_dict_for_a_loss_that_reads_it(vectorize) -> None:
    xs, ys, xq, yq = packed_episode()
    loss = nn.functional.cross_entropy
    grads = []
    for as_dict in (False, True):
        model = TwoInputs(packed=True)
        maml = MAML(model, inner_lr=0.5, inner_steps=2, vectorize=vectorize,
                    loss_fn=(lambda out, y: loss(out, y["label"])) if as_dict else loss)  # fmt: skip
        wrap = (lambda y: {"label": y}) if as_dict else (lambda y: y)
        maml(xs, wrap(ys), xq, wrap(yq)).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["tuple", "dict", "reordered"])
def test_adapt_and_predict_take_one_tasks_inputs(kind) -> None:
    xs, ys, xq, _ = packed_episode(tasks=1)
    packed, several = MAML(TwoInputs(packed=True), inner_lr=0.5), MAML(TwoInputs(), inner_lr=0.5)
    want = packed.adapt(xs[0], ys[0], steps=3)
    for context in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with context():
            x_s, x_q = split(xs[0].clone(), kind), split(xq[0].clone(), kind)  # inference tensors in inference_mode
            got = several.adapt(x_s, ys[0].clone(), steps=3)
            out = several.predict(got, x_q)
        for name, p in want.items():
            torch.testing.assert_close(got[name], p, rtol=0, atol=0)
        torch.testing.assert_close(out, packed.predict(want, xq[0]), rtol=0, atol=0)


def packed_reptile_tasks(count=3, batches=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        [(torch.cat([torch.randn(8, 3, generator=g, dtype=torch.float64), torch.rand(8, 1, generator=g, dtype=torch.float64)], -1),
          torch.randint(0, 2, (8,), generator=g)) for _ in range(batches)]
        for _ in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["tuple", "dict", "reordered"])
def test_reptile_update_with_several_inputs_equals_the_packed_models(kind) -> None:
    data = packed_reptile_tasks()
    optimizer = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    packed, several = TwoInputs(packed=True), TwoInputs()
    Reptile(packed, inner_steps=3, inner_optimizer=optimizer, outer_stepsize=0.3).meta_step(data)
    reptile = Reptile(several, inner_steps=3, inner_optimizer=optimizer, outer_stepsize=0.3)
    reptile.meta_step([[(split(x, kind), y) for x, y in batches] for batches in data])
    for got, want in zip(several.parameters(), packed.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.inference_mode():
        batches = [(split(x.clone(), kind), y.clone()) for x, y in data[0]]
        worker = reptile.adapt(batches)
    expected = Reptile(packed, inner_steps=3, inner_optimizer=optimizer).adapt(data[0])
    for got, want in zip(worker.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_a_mapping_that_is_not_a_dict_is_read_as_one(path) -> None:
    """A UserDict (as a tokenizer's BatchEncoding) is a Mapping that vmap and pytree do not map
    over: MAML, adapt and Reptile (also under inference_mode) read it as the dict it holds."""
    xs, ys, xq, yq = packed_episode()
    losses = [MAML(TwoInputs(), inner_lr=0.5, **PATHS[path]).query_losses(wrap(split(xs, "dict")), ys, wrap(split(xq, "dict")), yq)
              for wrap in (dict, UserDict)]  # fmt: skip
    assert torch.equal(losses[1], losses[0])
    maml = MAML(TwoInputs(), inner_lr=0.5)
    with torch.inference_mode():
        got = maml.adapt(UserDict(split(xs[0].clone(), "dict")), ys[0].clone())
    for name, p in maml.adapt(split(xs[0], "dict"), ys[0]).items():
        assert torch.equal(got[name], p)
    data = packed_reptile_tasks()[0]
    reptile = Reptile(TwoInputs(), inner_steps=3)
    want = reptile.adapt([(split(x, "dict"), y) for x, y in data])
    with torch.inference_mode():
        worker = reptile.adapt([(UserDict(split(x.clone(), "dict")), y.clone()) for x, y in data])
    for got, expected in zip(worker.parameters(), want.parameters(), strict=True):
        assert torch.equal(got, expected)


class ReadOnlyMapping(Mapping):
    """A Mapping with no way to write to it (no ``update``, no ``__setitem__``)."""

    def __init__(self, items: dict) -> None:
        self._items = items

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class OwnDict(dict):
    """A dict subclass of the user's own: ``torch.utils._pytree`` does not enter it."""


def test_inputs_are_copied_out_of_inference_mode_leaving_the_given_mappings_as_they_are() -> None:
    """``outside_inference`` clones the inference tensors in a mapping that pytree does not enter
    (a UserDict, a dict subclass; nested ones too) into a copy of its type, a read-only one into
    a dict, and leaves the given mappings holding their own tensors (a mutant that wrote to the
    UserDict, or one that failed on the read-only mapping's missing ``update``, went unnoticed).
    A dict subclass was left as it was, its inference tensors uncopied."""
    from learnedopt.meta.model_calls import outside_inference

    with torch.inference_mode():
        t = torch.arange(3.0)
    user, read_only, own = UserDict(a=t, b=[t, 2]), ReadOnlyMapping({"a": t}), OwnDict(a=t)
    out_user, out_read_only, out_own = outside_inference((user, read_only, own))
    assert type(out_user) is UserDict and type(out_read_only) is dict and type(out_own) is OwnDict
    for got in (out_user["a"], out_user["b"][0], out_read_only["a"], out_own["a"]):
        assert not got.is_inference() and torch.equal(got, t)
    assert out_user["b"][1] == 2
    assert user["a"] is t and user["b"][0] is t and read_only["a"] is t and own["a"] is t


@pytest.mark.parametrize("vectorize", [True, False, "auto"])
def test_maml_refuses_bad_input_structures_naming_the_tensor(vectorize) -> None:
    xs, ys, xq, yq = packed_episode(tasks=2)
    features, mask = split(xs, "tuple")
    maml = MAML(TwoInputs(), inner_lr=0.5, vectorize=vectorize)
    cases = [
        ({"features": features, "mask": True}, TypeError, "MAML takes x_support as a tuple, list or dict of tensors, "
         "got x_support['mask'] of type bool"),
        ((), ValueError, "MAML takes x_support as a tuple, list or dict of tensors, got an empty tuple"),
        ({}, ValueError, "got an empty dict"),
        ((features, mask[:, :3]), ValueError, "MAML takes the tensors of x_support with the same leading (B, N) sizes, "
         "got x_support[0] of shape (2, 5, 3) and x_support[1] of shape (2, 3)"),
        ((features, mask[0]), ValueError, "MAML takes every tensor of x_support as (B, N, ...), got x_support[1] of shape (5,)"),
        ([features[0], features[1]], ValueError, "MAML takes (B, N, ...) tensors of the same B tasks, got x_support[0] (5, 3), "
         "y_support (2, 5)"),  # a list of per-task tensors
        (xs.numpy(), TypeError, "MAML takes x_support as one (B, N, ...) tensor of B tasks, or a tuple, list or dict of them "
         "(the model's positional or keyword arguments), got x_support of type ndarray"),
    ]  # fmt: skip
    for bad, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            maml(bad, ys, split(xq, "tuple"), yq)
    with pytest.raises(ValueError, match=re.escape("got x_support[0] (2, 5, 3), y_support (2, 5), x_query[0] (1, 5, 3)")):
        maml(split(xs, "tuple"), ys, split(xq[:1], "tuple"), yq)
    with pytest.raises(ValueError, match=re.escape("at least one support and one query example per task, got x_query['features'] (2, 0, 3)")):
        maml(split(xs, "dict"), ys, split(xq[:, :0], "dict"), yq)
    assert maml.vectorize == vectorize


def test_adapt_predict_and_reptile_refuse_bad_input_structures() -> None:
    xs, ys, _, _ = packed_episode(tasks=1)
    features, mask = split(xs[0], "tuple")
    maml = MAML(TwoInputs(), inner_lr=0.5)
    with pytest.raises(ValueError, match=re.escape("MAML takes the tensors of x_support with the same leading (N,) sizes, "
                                                   "got x_support['features'] of shape (5, 3) and x_support['mask'] of shape (4,)")):
        maml.adapt({"features": features, "mask": mask[:4]}, ys[0])
    with pytest.raises(TypeError, match=re.escape("got x_support[1] of type float")):
        maml.adapt((features, 1.0), ys[0])
    with pytest.raises(ValueError, match=re.escape("MAML takes the tensors of y_support with the same leading (N,) sizes, "
                                                   "got y_support['label'] of shape (5,) and y_support['weight'] of shape (4,)")):
        maml.adapt((features, mask), {"label": ys[0], "weight": mask[:4]})
    with pytest.raises(ValueError, match=re.escape("adapt needs at least one support example, got x_support[0] of shape (0, 3)")):
        maml.adapt((features[:0], mask[:0]), ys[0][:0])
    with pytest.raises(ValueError, match=re.escape("MAML takes x as a tuple, list or dict of tensors, got an empty list")):
        maml.predict(maml.initial_params(), [])
    with pytest.raises(ValueError, match=re.escape("MAML takes every tensor of x as (N, ...), got x[1] of shape ()")):
        maml.predict(maml.initial_params(), (features, mask[0]))
    reptile = Reptile(TwoInputs(), inner_steps=1)
    with pytest.raises(ValueError, match=re.escape("Reptile (batch 1) takes the tensors of inputs with the same leading (N,) "
                                                   "sizes, got inputs[0] of shape (5, 3) and inputs[1] of shape (4,)")):
        reptile.adapt([((features, mask), ys[0]), ((features, mask[:4]), ys[0])])
    with pytest.raises(TypeError, match=re.escape("Reptile (batch 0) takes inputs as a tuple, list or dict of tensors, "
                                                  "got inputs['mask'] of type NoneType")):
        reptile.meta_step([[({"features": features, "mask": None}, ys[0])]])
    with pytest.raises(ValueError, match=re.escape("got an empty dict")):
        reptile.adapt([({}, ys[0])])


def token_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(15, 2)).double()


@pytest.mark.parametrize("vectorize", [True, False])
def test_integer_token_ids_adapt_and_predict_and_a_float_layer_fails_as_the_model_alone(vectorize) -> None:
    """Integer inputs are a model's own business: token ids into an ``nn.Embedding`` adapt in MAML
    and Reptile (also under ``inference_mode``); ids into a layer that takes floats fail with the
    model's own dtype error, as calling the model does, and no check of MAML's stands in the way."""
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 6, (8, 5), generator=g), torch.randint(0, 2, (8,), generator=g)
    maml = MAML(token_model(), inner_lr=0.5, vectorize=vectorize)
    loss = lambda params: nn.functional.cross_entropy(maml.predict(params, ids), labels)  # noqa: E731
    for context in (torch.enable_grad, torch.inference_mode):
        with context():
            assert loss(maml.adapt(ids, labels, steps=3)) < loss(maml.adapt(ids, labels, steps=0))
    maml(ids[None], labels[None], ids[None], labels[None]).backward()
    assert maml.model[0].weight.grad.abs().sum() > 0
    reptile = Reptile(token_model(), inner_steps=3, inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    with torch.inference_mode():
        worker = reptile.adapt([(ids, labels)])
        assert nn.functional.cross_entropy(worker(ids), labels) < nn.functional.cross_entropy(reptile.model(ids), labels)
    floats_only = nn.Linear(5, 2).double()
    with pytest.raises(RuntimeError) as alone:
        floats_only(ids)
    with pytest.raises(RuntimeError, match=re.escape(str(alone.value))):
        MAML(floats_only, vectorize=vectorize).adapt(ids, labels)
    with pytest.raises(RuntimeError, match=re.escape(str(alone.value))):
        Reptile(floats_only, inner_steps=1).adapt([(ids, labels)])


class CountingLinear(nn.Linear):
    """``nn.Linear(3, 2)`` in float64 that counts its forward calls."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(3, 2, dtype=torch.float64)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("first_order", [False, True])
def test_inputs_and_targets_of_different_example_counts_are_refused_naming_the_set(path, first_order) -> None:
    """Support or query inputs and targets with different numbers of examples: cross-entropy's
    "Expected input batch_size (5) to match target batch_size (4)" named neither set, and MSE
    broadcast a (1, 2) target over 5 outputs with only a warning, meta-training on a wrong loss.
    Refused before the model runs, on every path, naming the set, tensors and both sizes."""
    xs, ys, xq, yq = packed_episode(tasks=2)
    options = {**PATHS[path], "first_order": first_order}
    model = CountingLinear()
    maml = MAML(model, inner_lr=0.5, **options)
    x_s, x_q = xs[..., :3], xq[..., :3]
    cases = [
        ((x_s, ys[:, :4], x_q, yq), "MAML: the support set's inputs and targets hold different numbers of examples: "
         "5 in x_support (2, 5, 3), 4 in y_support (2, 4)"),
        ((x_s, ys, x_q, torch.zeros(2, 7, dtype=torch.long)), "MAML: the query set's inputs and targets hold different "
         "numbers of examples: 5 in x_query (2, 5, 3), 7 in y_query (2, 7)"),
        (((x_s,), {"label": ys[:, :1]}, x_q, yq), "MAML: the support set's inputs and targets hold different numbers of "
         "examples: 5 in x_support[0] (2, 5, 3), 1 in y_support['label'] (2, 1)"),
    ]  # fmt: skip
    loss = lambda out, y: nn.functional.cross_entropy(out, y["label"] if isinstance(y, dict) else y)  # noqa: E731
    maml.loss_fn = loss
    for args, message in cases:
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            maml(*args)
    mse = MAML(model, inner_lr=0.5, loss_fn=nn.functional.mse_loss, **options)
    with pytest.raises(ValueError, match=re.escape("2 in x_query (2, 2, 3), 1 in y_query (2, 1, 2)")):
        mse(x_s, torch.zeros(2, 5, 2, dtype=torch.float64), x_q[:, :2], torch.zeros(2, 1, 2, dtype=torch.float64))
    assert model.calls == 0  # refused before any compute
    assert torch.isfinite(maml(x_s, ys, x_q[:, :2], yq[:, :2]))  # support and query sets may differ in size


def test_adapt_and_reptile_refuse_inputs_and_targets_of_different_example_counts() -> None:
    """One task's inputs and targets: ``adapt`` and every Reptile batch, before the model runs
    (Reptile's MSE broadcast a (1, 2) target over the batch with a warning, and trained on it)."""
    xs, ys, _, _ = packed_episode(tasks=1)
    x, y = xs[0, :, :3], ys[0]
    model = CountingLinear()
    maml = MAML(model, inner_lr=0.5)
    message = "MAML: the support set's inputs and targets hold different numbers of examples: 5 in x_support (5, 3), 3 in y_support (3,)"
    for steps in (1, 0):  # no step reads the targets, but they are not the task's
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            maml.adapt(x, y[:3], steps=steps)
    with pytest.raises(ValueError, match=re.escape("4 in x_support['features'] (4, 3), 5 in y_support (5,)")):
        MAML(TwoInputs(), inner_lr=0.5).adapt(split(xs[0, :4], "dict"), y)
    reptile = Reptile(model, inner_steps=2, loss_fn=nn.functional.mse_loss)
    target = torch.zeros(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="^" + re.escape("Reptile (batch 1): the inputs and targets hold different numbers of "
                                                         "examples: 5 in inputs (5, 3), 1 in targets (1, 2)") + "$"):
        reptile.meta_step([[(x, target), (x, target[:1])]])
    with pytest.raises(ValueError, match=re.escape("Reptile (batch 0): the inputs and targets hold different numbers of "
                                                   "examples: 4 in inputs['features'] (4, 3), 5 in targets (5,)")):
        Reptile(TwoInputs(), inner_steps=1).adapt([(split(xs[0, :4], "dict"), y)])
    assert model.calls == 0
    # targets that are not one tensor go to loss_fn as they are, unchecked
    picky = Reptile(model, inner_steps=1, loss_fn=lambda out, y: nn.functional.mse_loss(out, y["value"].expand_as(out)))
    assert picky.adapt([(x, {"value": target[:1]})]).calls == 1  # the trained copy's


def test_reptile_checks_every_tasks_batches_before_training_any() -> None:
    """A bad batch of the meta-batch's last task was found only after the tasks before it had
    been trained (all their inner steps, for nothing)."""
    calls = []

    class Counted(nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    torch.manual_seed(0)
    reptile = Reptile(Counted(3, 2), inner_steps=2)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    for bad, error in (((x, y[:4]), "Reptile (batch 0): the inputs and targets hold different numbers of examples"),
                       ((x[:0], y[:0]), "Reptile (batch 0) needs at least one example"),
                       (x, "a task is a sequence of (inputs, targets) batches")):  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=re.escape(error)):
            reptile.meta_step([[(x, y)], [(x, y)], [bad]])
        assert calls == []
    with pytest.raises(ValueError, match="a task needs at least one"):
        reptile.meta_step([[(x, y)], []])
    assert calls == []


def test_adapt_refuses_one_target_for_the_whole_task() -> None:
    """``adapt(x, y)`` with a 0-dim target: MSE broadcast it over the task's outputs with only a
    warning and adapted on that; ``query_losses`` refuses targets without an example dimension."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    maml = MAML(nn.Linear(3, 1, dtype=torch.float64), inner_lr=0.5, loss_fn=nn.functional.mse_loss)
    message = "MAML takes (N, ...) targets, one per example, got y_support of shape () for x_support of shape (5, 3)"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        maml.adapt(x, torch.tensor(1.0, dtype=torch.float64))
    assert maml.adapt(x, torch.ones(5, 1, dtype=torch.float64)).keys() == {"weight", "bias"}
