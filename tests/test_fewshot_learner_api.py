"""A trained few-shot learner's user API: classify_task, adapt, predict, save and load."""

from __future__ import annotations

import pytest
import torch

from learnedopt.meta.fewshot import FewShotLearner, classify_task
from learnedopt.meta.fewshot.learner import LearnerSpec


def conv4_learner(ways: int = 3) -> FewShotLearner:
    architecture = {"kind": "conv4", "in_channels": 1, "ways": ways, "hidden": 4, "image_size": 28}
    spec = LearnerSpec(algo="maml", architecture=architecture, loss="cross_entropy", inner_steps=1,
                       test_inner_steps=1, inner_lr=0.4)  # fmt: skip
    return FewShotLearner(spec, seed=0)


def test_classify_task_refuses_labels_other_than_0_to_n_minus_1() -> None:
    learner = conv4_learner(3)
    x, xq = torch.rand(6, 1, 28, 28), torch.rand(4, 1, 28, 28)
    assert classify_task(learner, x, torch.tensor([0, 0, 1, 1, 2, 2]), xq).shape == (4, 3)
    # three classes labelled 1..3 (not "a task of 4 classes"), a class missing (its unit is not
    # adapted, and the argmax may pick it), negative labels (cross-entropy's IndexError)
    for labels in ([1, 1, 2, 2, 3, 3], [0, 0, 2, 2, 2, 2], [-1, 0, 1, 1, 2, 2]):
        with pytest.raises(ValueError, match=r"support labels 0\.\.N-1, each class at least once"):
            classify_task(learner, x, torch.tensor(labels), xq)
    with pytest.raises(ValueError, match=r"a 3-way learner cannot classify a task of 2 classes"):
        classify_task(learner, x[:4], torch.tensor([0, 0, 1, 1]), xq)
    # no support examples: "a task of 0 classes ... --ways 0" said nothing useful
    with pytest.raises(ValueError, match=r"classify_task needs at least one support example, got x_support of shape \(0, 1, 28, 28\)"):
        classify_task(learner, x[:0], torch.zeros(0, dtype=torch.long), xq)


def mlp_learner(algo: str) -> FewShotLearner:
    spec = LearnerSpec(algo=algo, architecture={"kind": "mlp", "sizes": [1, 8, 1], "activation": "relu"}, loss="mse",
                       inner_steps=1, test_inner_steps=2, inner_lr=None if algo == "meta-lstm" else 0.01,
                       inner_optimizer="sgd" if algo == "reptile" else None,
                       rule={"kind": "MetaLSTMCell", "config": {}} if algo == "meta-lstm" else None)  # fmt: skip
    return FewShotLearner(spec, seed=0)


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "meta-lstm"])
def test_adapt_and_predict_refuse_inputs_of_another_dtype_or_device(algo: str) -> None:
    learner = mlp_learner(algo)
    x, y = torch.rand(5, 1), torch.rand(5, 1)
    params = learner.adapt(x, y)
    # "mat1 and mat2 must have the same dtype, but got Double and Float" from deep inside the model
    with pytest.raises(TypeError, match=r"x is torch.float64; this learner's model is torch.float32"):
        learner.predict(params, x.double())
    with pytest.raises(TypeError, match=r"x_support is torch.float64; this learner's model is torch.float32"):
        learner.adapt(x.double(), y.double())
    with pytest.raises(ValueError, match=r"x is on meta; this learner's model is on cpu"):
        learner.predict(params, x.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the inputs itself
        assert learner.predict(params, x.bfloat16()).shape == (5, 1)


def test_predict_on_the_meta_device_refuses_another_dtype_as_elsewhere() -> None:
    """A shape-only run (learner and inputs on ``meta``) with inputs of another dtype than the
    model's gets the same one-line TypeError as on the CPU, not torch's "unknown device type for
    autocast" (``torch.is_autocast_enabled("meta")`` raises; ``over_tasks.autocast_enabled`` is the
    library's one reading of it)."""
    learner = mlp_learner("maml").to("meta")
    params = {k: p.detach() for k, p in learner.model.named_parameters()}
    with pytest.raises(TypeError, match=r"x is torch.float64; this learner's model is torch.float32"):
        learner.predict(params, torch.zeros(5, 1, dtype=torch.float64, device="meta"))
    assert learner.predict(params, torch.zeros(5, 1, device="meta")).shape == (5, 1)


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "meta-lstm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_saved_learner_loads_in_its_own_dtype_whatever_the_default(tmp_path, algo: str, dtype: torch.dtype) -> None:
    """A float64 learner (converted as README says: the MAML module, or the model and the rule)
    loaded as float32, rounded, and a float32 file loaded under a float64 default dtype as
    float64: neither predicted as the saved learner did. Each loads in the file's dtype now, as
    load_weights does, and predicts bit for bit as the saved learner."""
    from learnedopt.meta.fewshot import load_learner, save_learner

    learner = mlp_learner(algo)
    for module in (learner.maml if learner.maml is not None else learner.model, learner.rule):
        if module is not None:
            module.to(dtype)
    x, y, xq = (torch.rand(5, 1, dtype=dtype) for _ in range(3))
    expected = learner.predict(learner.adapt(x, y), xq)
    path = tmp_path / "model.safetensors"
    save_learner(learner, path)
    for default in (torch.float32, torch.float64):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            loaded = load_learner(path)[0]
        finally:
            torch.set_default_dtype(previous)
        assert {v.dtype for v in loaded.tensors().values()} == {dtype}, (default, loaded.tensors())
        assert torch.equal(loaded.predict(loaded.adapt(x, y), xq), expected), default


def test_classify_task_refuses_a_regression_learner() -> None:
    """A sinusoid (mse) learner failed in augment_support's "needs images (N, C, H, W)"."""
    with pytest.raises(ValueError, match=r"classify_task classifies; learner 0 is a regression learner \(loss 'mse'\)"):
        classify_task(mlp_learner("maml"), torch.rand(6, 1), torch.tensor([0, 0, 1, 1, 2, 2]), torch.rand(4, 1))


@pytest.mark.parametrize("algo", ["maml", "reptile", "meta-lstm"])
def test_load_learner_loads_on_the_cpu_whatever_the_default_device(tmp_path, algo: str) -> None:
    """Under ``with torch.device("meta")`` the learner was built on the meta device and its
    tensors' values dropped without a word (load_weights loads on the CPU, as documented)."""
    from learnedopt.meta.fewshot import load_learner, save_learner

    learner = mlp_learner(algo)
    path = tmp_path / "model.safetensors"
    save_learner(learner, path)
    with torch.device("meta"):
        loaded = load_learner(path)[0]
    for name, value in learner.tensors().items():
        assert loaded.tensors()[name].device.type == "cpu" and torch.equal(loaded.tensors()[name], value), name
    x = torch.rand(5, 1)
    assert torch.equal(loaded.predict(loaded.adapt(x, x), x), learner.predict(learner.adapt(x, x), x))


def test_save_learner_extra_cannot_rewrite_the_learners_spec(tmp_path) -> None:
    """``extra`` was merged over the header: ``save_learner(learner, path, header)`` with another
    learner's header (say a CLI run's, kept for its metadata) wrote that learner's algorithm and
    test-time steps over this one's, and the file adapted otherwise than the learner it holds."""
    from learnedopt.meta.fewshot import load_learner, save_learner
    from learnedopt.version import __version__

    learner = mlp_learner("maml")
    path = tmp_path / "model.safetensors"
    for extra in ({"test_inner_steps": 99}, {"algo": "fomaml"}):
        with pytest.raises(ValueError, match=rf"extra's {next(iter(extra))!r} .* differs from the learner's"):
            save_learner(learner, path, extra)
        assert not path.exists()
    save_learner(learner, path, {"note": "kept"})
    header = load_learner(path)[1]
    # its own header, as load_learner returns it (the run's metadata kept), saves again; the
    # format and version are the writer's
    save_learner(learner, path, {**header, "library_version": "0.0.1", "format": 7})
    loaded, again = load_learner(path)
    assert again["note"] == "kept" and again["library_version"] == __version__ and again["format"] == 1
    assert loaded.spec == learner.spec


def test_save_learner_writes_the_spec_first_and_extra_after_it(tmp_path) -> None:
    """The header reads as before extra's check (aa56143): ``format``, the spec's fields, the
    library version, then ``extra``'s other keys (a run's task, command, validation); that change
    had put extra's keys first, so a meta-train run's model file was no longer the same bytes as
    before for the same run."""
    from learnedopt.meta.fewshot import load_learner, save_learner

    learner = mlp_learner("maml")
    path = tmp_path / "model.safetensors"
    save_learner(learner, path, {"task": "sinusoid", "format": 1, "algo": "maml", "command": "c"})
    keys = list(load_learner(path)[1])
    spec = list(learner.spec.to_dict())
    assert keys == ["format", *spec, "library_version", "task", "command"]


@pytest.mark.parametrize("algo", ["maml", "reptile", "meta-lstm"])
def test_predict_takes_inputs_of_the_dtype_of_the_params_given(algo: str) -> None:
    """``predict(params, x)`` runs the model at ``params``: adapted parameters converted to
    float64 with float64 inputs predicted before (as the float32 ones, to rounding); the dtype
    check (7990a1e) compared ``x`` with the model's own weights and refused them. Inputs of
    another dtype than the params given are still refused in one line."""
    learner = mlp_learner(algo)
    x, y = torch.rand(5, 1), torch.rand(5, 1)
    params = learner.adapt(x, y)
    as_double = {k: v.double() for k, v in params.items()}
    out = learner.predict(as_double, x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), learner.predict(params, x))
    with pytest.raises(TypeError, match=r"x is torch.float32; .* torch.float64"):
        learner.predict(as_double, x)


def test_classify_task_runs_a_float64_learner_on_float32_images(tmp_path) -> None:
    """A float64 model file loads as float64 now (cfe3428; it loaded as float32 under the default
    dtype before), while images come as float32 (``load_omniglot``, ``load_runs``): classify_task
    (and ``evaluate omniglot-runs`` through it) then failed with the inputs' dtype TypeError. It
    gives each learner the images in its model's dtype, after drawing the distortions from them."""
    from learnedopt.meta.fewshot import load_learner, save_learner

    with torch.device("cpu"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            learner = conv4_learner(3)
        finally:
            torch.set_default_dtype(previous)
    save_learner(learner, tmp_path / "model.safetensors")
    loaded = load_learner(tmp_path / "model.safetensors")[0]
    assert next(loaded.model.parameters()).dtype == torch.float64
    x, xq, y = torch.rand(6, 1, 28, 28), torch.rand(4, 1, 28, 28), torch.tensor([0, 0, 1, 1, 2, 2])
    got = classify_task([loaded, conv4_learner(3)], x, y, xq, support_copies=1, query_copies=1)
    assert got.shape == (4, 3) and torch.isfinite(got).all()
    one = classify_task([loaded], x, y, xq)
    assert torch.equal(one, classify_task([loaded], x.double(), y, xq.double()))
