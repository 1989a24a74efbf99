"""``meta-train --algo maml|fomaml|reptile|meta-lstm --task module:attribute``: a few-shot task
family of your own (:class:`learnedopt.meta.fewshot.FewShotFamily`) through the command line, its
model file and card, exact resume, and the one-line refusals of a family that does not fit."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from helpers import assert_killed_at_any_write_resumes, importable_module
from test_meta_train_fewshot import header, tensors, train

from learnedopt.cli import main
from learnedopt.meta.fewshot import MODEL_NAME, FewShotFamily, load_learner

FAMILIES = '''
from pathlib import Path

import torch
from torch import nn
from learnedopt.meta import TaskFamily


class LineFamily:
    """y = a x + b per task, a ~ U[-2, 2], b ~ U[-1, 1], x ~ U[-3, 3]."""

    loss = "mse"

    def __init__(self, split="meta_train", shots=4, queries=3):
        self.split, self.shots, self.queries = split, shots, queries

    def sample(self, size, generator):
        a = torch.rand(size, 1, 1, generator=generator) * 4 - 2
        b = torch.rand(size, 1, 1, generator=generator) * 2 - 1
        x = torch.rand(size, self.shots + self.queries, 1, generator=generator) * 6 - 3
        y = a * x + b
        return x[:, :self.shots], y[:, :self.shots], x[:, self.shots:], y[:, self.shots:]

    def model(self):
        return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))

    def describe(self):
        return f"lines y = a x + b ({self.split}, {self.shots} support, {self.queries} query points)"


class OwnLossLine(LineFamily):
    def loss(self, outputs, targets):
        return (outputs - targets).abs().mean()


class SteeperLine(LineFamily):
    pass


class SharedLine(LineFamily):
    """LineFamily on a network that uses one layer twice (its tensors under two names)."""

    def model(self):
        shared = nn.Linear(1, 1)
        return nn.Sequential(shared, nn.Tanh(), shared)


class Counter(nn.Module):
    """A layer of one's own with an int64 buffer (a count, as BatchNorm's num_batches_tracked)
    and a bool one (a mask); it passes its input through."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([True, False]))

    def forward(self, x):
        return x


class Float64Line(LineFamily):
    """LineFamily on a float64 network whose last layer is a Counter."""

    def sample(self, size, generator):
        return tuple(t.double() for t in super().sample(size, generator))

    def model(self):
        return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1), Counter()).double()


def line_without_split():
    family = LineFamily()
    del family.split
    family.describe = lambda: "lines"
    return family


class NoShots(LineFamily):
    def __init__(self):
        super().__init__()


class NoSample:
    loss = "mse"

    def model(self):
        return nn.Linear(1, 1)

    def describe(self):
        return "nothing"


class UnknownLoss(LineFamily):
    loss = "l1"


class NotAModule(LineFamily):
    def model(self):
        return [nn.Linear(1, 1)]


class TooFewTasks(LineFamily):
    def sample(self, size, generator):
        return tuple(t[:1] for t in super().sample(size, generator))


class GlobalRandom(LineFamily):
    def sample(self, size, generator):
        return super().sample(size, torch.Generator().manual_seed(int(torch.randint(1000, ()))))


class NanTargets(LineFamily):
    def sample(self, size, generator):
        x_s, y_s, x_q, y_q = super().sample(size, generator)
        return x_s, y_s.index_fill(1, torch.tensor([0]), float("nan")), x_q, y_q


class PerExampleLoss(LineFamily):
    def loss(self, outputs, targets):
        return (outputs - targets) ** 2


class FlatTargets(LineFamily):
    """Targets (size, N) for a network of (N, 1) outputs: mse_loss broadcast them to (N, N)."""

    def sample(self, size, generator):
        x_s, y_s, x_q, y_q = super().sample(size, generator)
        return x_s, y_s[..., 0], x_q, y_q[..., 0]


class WrongInputs(LineFamily):
    def model(self):
        return nn.Linear(3, 1)


class EmptyDescription(LineFamily):
    def describe(self):
        return ""


class NeedsPath:
    def __init__(self, path):
        pass


class FromFolder(LineFamily):
    """Needs its data folder, which sets its network's width: a model file must rebuild it with
    the run's folder, or one given in its place."""

    def __init__(self, data, split="meta_train", shots=4, queries=3):
        super().__init__(split, shots, queries)
        self.width = int((Path(data) / "width.txt").read_text())

    def model(self):
        return nn.Sequential(nn.Linear(1, self.width), nn.ReLU(), nn.Linear(self.width, 1))


class DropoutLine(LineFamily):
    """A network with dropout, drawn at every forward pass in meta-training and validation."""

    def model(self):
        return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))


class RuleTasks(TaskFamily):
    def sample(self, generator):
        raise NotImplementedError

    def describe(self):
        return "update-rule tasks"
'''


@pytest.fixture
def families(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    yield from importable_module(tmp_path, monkeypatch, "own_fewshot", FAMILIES)


TINY = ["--meta-steps", "3", "--meta-batch", "2", "--val-tasks", "3", "--checkpoint-every", "2"]


@pytest.mark.parametrize(
    "algo_args",
    [["--algo", "maml"], ["--algo", "fomaml"], ["--algo", "reptile"], ["--algo", "maml", "--learn-inner-lr"],
     ["--algo", "meta-lstm", "--inner-steps", "2", "--test-inner-steps", "2"]],
    ids=["maml", "fomaml", "reptile", "maml-metasgd", "meta-lstm"],
)  # fmt: skip
def test_own_family_meta_trains_writes_its_files_and_reloads(tmp_path: Path, families: str, algo_args: list[str], capsys) -> None:
    out, task = tmp_path / "run", f"{families}:LineFamily"
    assert train(out, "--task", task, *TINY, *algo_args) == 0
    assert "validation loss" in capsys.readouterr().out
    head = header(out / MODEL_NAME)
    assert head["task"] == task and head["architecture"] == {"kind": "own", "family": task} and head["loss"] == "mse"
    assert head["meta_train_config"]["task"] == task and f"--task {task}" in head["command"]
    card = (out / "MODEL_CARD.md").read_text()
    assert f"on {task}\n" in card and f"The family is your own `{task}`, built with split='meta_train'" in card
    assert "lines y = a x + b (meta_train, 4 support, 3 query points)" in card  # its describe(), of each split
    assert "lines y = a x + b (meta_valid, 4 support, 3 query points)" in card
    learner, _ = load_learner(out / MODEL_NAME)  # the family's model(), rebuilt
    saved = tensors(out / MODEL_NAME)
    assert learner.tensors().keys() == saved.keys() and all(torch.equal(v, saved[k]) for k, v in learner.tensors().items())
    x = torch.linspace(-3, 3, 4).unsqueeze(1)
    assert learner.predict(learner.adapt(x, 2 * x), x).shape == (4, 1)


def test_a_callable_loss_is_the_learners_and_shots_and_queries_reach_the_family(tmp_path: Path, families: str) -> None:
    out, task = tmp_path / "run", f"{families}:OwnLossLine"
    args = ["--algo", "maml", "--task", task, *TINY, "--shots", "2", "--train-shots", "5", "--queries", "6"]
    assert train(out, *args) == 0
    head = header(out / MODEL_NAME)
    assert head["loss"] == "own"
    card = (out / "MODEL_CARD.md").read_text()
    # meta-training reads --train-shots, validation --shots
    assert "(meta_train, 5 support, 6 query points)" in card and "(meta_valid, 2 support, 6 query points)" in card
    learner, _ = load_learner(out / MODEL_NAME)
    outputs, targets = torch.zeros(3, 1), torch.full((3, 1), 2.0)
    assert float(learner.loss_fn(outputs, targets)) == 2.0  # |.|, not the MSE's 4


@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_resume_of_an_own_family_run_is_bit_identical(tmp_path: Path, families: str, algo: str) -> None:
    args = ["--algo", algo, "--task", f"{families}:LineFamily", *TINY, "--meta-steps", "4", "--seed", "3"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert train(whole, *args) == 0
    assert train(broken, *args, "--stop-after", "3") == 0  # checkpoint at 2
    assert not (broken / MODEL_NAME).exists()
    assert train(broken, *args, "--resume") == 0
    a, b = tensors(whole / MODEL_NAME), tensors(broken / MODEL_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert header(whole / MODEL_NAME)["validation"] == header(broken / MODEL_NAME)["validation"]


@pytest.mark.parametrize("algo", ["maml", "reptile", "meta-lstm"])
def test_resume_of_a_run_whose_network_has_dropout_is_bit_identical(tmp_path: Path, families: str, algo: str) -> None:
    """Dropout draws from the global RNG, which a checkpoint did not hold: a resumed run drew
    other masks from the resume on (and in its validation), and its model differed from the
    uninterrupted run's, as the few-shot package's docstring says it does not. Each meta-step
    and each validation now draws from a global RNG seeded from the run's seed."""
    args = ["--algo", algo, "--task", f"{families}:DropoutLine", *TINY, "--meta-steps", "4", "--seed", "3"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    torch.manual_seed(1)  # the global RNG's state before a run does not matter either
    assert train(whole, *args) == 0
    assert train(broken, *args, "--stop-after", "3") == 0  # checkpoint at 2
    torch.manual_seed(2)
    assert train(broken, *args, "--resume") == 0
    a, b = tensors(whole / MODEL_NAME), tensors(broken / MODEL_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert header(whole / MODEL_NAME)["validation"] == header(broken / MODEL_NAME)["validation"]


def test_an_own_family_run_killed_at_any_file_write_resumes_to_the_uninterrupted_runs_files(tmp_path: Path, families: str) -> None:
    # 5 writes: the configuration it began with, checkpoints at meta-steps 2 and 3, the model file, the card
    assert_killed_at_any_write_resumes(tmp_path / "run", train, ["--algo", "maml", "--task", f"{families}:LineFamily", *TINY], writes=5)


def test_resume_refuses_another_family(tmp_path: Path, families: str, capsys) -> None:
    out = tmp_path / "run"
    assert train(out, "--algo", "maml", "--task", f"{families}:LineFamily", *TINY, "--stop-after", "2") == 0
    capsys.readouterr()
    assert train(out, "--algo", "maml", "--task", f"{families}:SteeperLine", *TINY, "--resume") == 2
    err = capsys.readouterr().err
    assert f"--task: '{families}:LineFamily' -> '{families}:SteeperLine'" in err and len(err.strip().splitlines()) == 1


def test_a_family_without_split_draws_validation_from_the_same_distribution(tmp_path: Path, families: str) -> None:
    out = tmp_path / "run"
    assert train(out, "--algo", "reptile", "--task", f"{families}:line_without_split", *TINY) == 0
    assert "taking no split, so the validation tasks are other draws" in (out / "MODEL_CARD.md").read_text()


def test_the_line_family_is_a_few_shot_family(families: str) -> None:
    import importlib

    module = importlib.import_module(families)
    assert isinstance(module.LineFamily(), FewShotFamily) and not isinstance(module.NoSample(), FewShotFamily)


BAD = [
    (["--task", "{m}:NoSample"], "{m}:NoSample() gave a NoSample without sample, which a few-shot family must have"),
    (["--task", "{m}:UnknownLoss"], "{m}:UnknownLoss: loss 'l1' is not one of 'mse', 'cross_entropy'; give a callable for another"),
    (["--task", "{m}:NotAModule"], "{m}:NotAModule: model() gave a list, not a torch.nn.Module"),
    (["--task", "{m}:TooFewTasks"], "sample() of the first meta-training tasks: x_support has shape (1, 4, 1); it must be (2, N, ...)"),
    (["--task", "{m}:GlobalRandom"], "sample() of the first meta-training tasks: two draws from the same seed differ: draw only "
     "from the generator it is given"),
    (["--task", "{m}:NanTargets"], "sample() of the first meta-training tasks: y_support holds 2 NaN or infinite values"),
    (["--task", "{m}:PerExampleLoss"], "the loss of the model on the first meta-training task's support set: it must be a scalar tensor"),
    # torch's mse_loss broadcast (4, 1) outputs against (4,) targets to a (4, 4) loss, with only a
    # warning: every prediction was pulled towards every target of its task, in silence
    (["--task", "{m}:FlatTargets"], "the loss of the model on the first meta-training task's support set: the 'mse' loss "
     "takes outputs and targets of one shape, got outputs (4, 1) and targets (4,)"),
    (["--task", "{m}:WrongInputs"], "the loss of the model on the first meta-training task's support set: RuntimeError: mat1 and mat2"),
    (["--task", "{m}:EmptyDescription"], "describe(): it must return a sentence for the model card, got ''"),
    (["--task", "{m}:NeedsPath"], "{m}:NeedsPath needs path, which it is not given"),
    (["--task", "{m}:RuleTasks"], "{m}:RuleTasks() gave a TaskFamily, whose tasks train update rules (--algo lstm)"),
    (["--task", "{m}:NoShots", "--shots", "3"], "{m}:NoShots takes no shots parameter, so --shots would be ignored"),
    (["--task", "{m}:LineFamily", "--data", "."], "{m}:LineFamily takes no data parameter, so --data would be ignored"),
    (["--task", "{m}:LineFamily", "--ways", "5"], "--ways does not apply to --task {m}:LineFamily (your own family)"),
    (["--task", "{m}:Missing"], "module '{m}' has no class or function 'Missing'"),
    (["--task", "no_such_module_here:Family"], "cannot import 'no_such_module_here'"),
    (["--task", "{m}:LineFamily", "--shots", "0"], "--shots must be a positive integer, got 0"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[e[1].split(":")[-1] if ":" in e[1] else e[1] for e, _ in BAD])
def test_a_family_that_does_not_fit_is_refused_in_one_line_before_anything_is_written(
    tmp_path: Path, families: str, capsys, extra: list[str], message: str
) -> None:
    out = tmp_path / "run"
    extra = [e.replace("{m}", families) for e in extra]
    assert main(["meta-train", "--algo", "maml", "--out", str(out), "--quiet", *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert message.replace("{m}", families) in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("learnedopt meta-train: error: ")
    assert not out.exists() or not any(out.iterdir())


def test_a_model_file_rebuilds_a_family_with_the_runs_shots_and_data_folder(tmp_path: Path, families: str) -> None:
    """A family that needs ``data=`` (here for its network's width) is rebuilt by load_learner
    with the run's --data and shots (it failed: "needs data, which it is not given"), or with a
    folder given in place of a moved one."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "width.txt").write_text("5")
    out = tmp_path / "run"
    assert train(out, "--algo", "maml", "--task", f"{families}:FromFolder", "--data", str(folder), "--shots", "3", *TINY) == 0
    saved = tensors(out / MODEL_NAME)
    learner, _ = load_learner(out / MODEL_NAME)
    assert all(torch.equal(v, saved[k]) for k, v in learner.tensors().items())
    moved = folder.rename(tmp_path / "moved")
    with pytest.raises(ValueError, match="No such file"):
        load_learner(out / MODEL_NAME)
    learner, _ = load_learner(out / MODEL_NAME, data=moved)
    assert all(torch.equal(v, saved[k]) for k, v in learner.tensors().items())


def test_a_model_file_whose_family_is_gone_is_refused_in_one_line(tmp_path: Path, families: str) -> None:
    import sys

    out = tmp_path / "run"
    assert train(out, "--algo", "maml", "--task", f"{families}:LineFamily", *TINY) == 0
    (tmp_path / "modules" / f"{families}.py").unlink()
    sys.modules.pop(families)
    with pytest.raises(ValueError, match=rf"the learner's network is built by your own few-shot family: cannot import '{families}'"):
        load_learner(out / MODEL_NAME)


def test_update_rule_training_points_a_few_shot_family_to_the_few_shot_algorithms(tmp_path: Path, families: str, capsys) -> None:
    assert main(["meta-train", "--out", str(tmp_path / "run"), "--quiet", "--task", f"{families}:LineFamily"]) == 2
    err = capsys.readouterr().err
    assert (f"{families}:LineFamily() gave a LineFamily, not a learnedopt.meta.TaskFamily (a few-shot family, with sample, "
            "model and loss, is for --algo maml, fomaml, reptile, meta-lstm)") in err and len(err.strip().splitlines()) == 1


def test_evaluate_omniglot_runs_refuses_a_learner_of_an_own_family(tmp_path: Path, families: str, capsys) -> None:
    out = tmp_path / "run"
    assert train(out, "--algo", "maml", "--task", f"{families}:LineFamily", *TINY) == 0
    capsys.readouterr()
    assert main(["evaluate", "omniglot-runs", "--runs", str(tmp_path), "--checkpoint", str(out / MODEL_NAME)]) == 2
    err = capsys.readouterr().err
    assert f"is a {families}:LineFamily (your own family's) model; the one-shot runs are 20-way" in err


def test_the_python_api_takes_an_own_family_with_sinusoids_defaults(tmp_path: Path, families: str) -> None:
    from learnedopt.meta.fewshot import FewShotConfig, fewshot_defaults, meta_train_fewshot

    task = f"{families}:LineFamily"
    defaults = fewshot_defaults("reptile", task, None)
    sinusoid = fewshot_defaults("reptile", "sinusoid", None)
    assert defaults["shots"] is None and defaults["queries"] is None and defaults["ways"] is None
    assert {k: v for k, v in defaults.items() if k not in ("shots", "queries")} == {
        k: v for k, v in sinusoid.items() if k not in ("shots", "queries")
    }
    config = FewShotConfig(algo="reptile", task=task, **{**defaults, "meta_steps": 2, "val_tasks": 2})
    result = meta_train_fewshot(config, tmp_path / "run", progress=False)
    assert result.finished and result.learner.spec.inner_optimizer == "sgd"
    assert header(tmp_path / "run" / MODEL_NAME)["architecture"] == {"kind": "own", "family": task}


class SharedLayerLine:
    """Lines through a network that runs one layer twice (one module under two names)."""

    loss = "mse"

    def model(self):
        shared = torch.nn.Linear(1, 1)
        return torch.nn.Sequential(shared, torch.nn.Tanh(), shared)


@pytest.mark.parametrize("algo", ["maml", "meta-lstm"])
def test_a_learner_whose_model_uses_a_layer_twice_is_saved_and_loads(tmp_path: Path, families: str, algo: str) -> None:
    """save_learner failed in safetensors ("Some tensors share memory") for a network that uses
    one layer under two names: its state dict holds the same tensor twice."""
    from learnedopt.meta.fewshot import FewShotLearner, save_learner
    from learnedopt.meta.fewshot.learner import LearnerSpec

    spec = LearnerSpec(algo=algo, architecture={"kind": "own", "family": f"{families}:SharedLine"}, loss="mse",
                       inner_steps=1, test_inner_steps=2, inner_lr=None if algo == "meta-lstm" else 0.1,
                       rule={"kind": "MetaLSTMCell", "config": {}} if algo == "meta-lstm" else None)  # fmt: skip
    learner = FewShotLearner(spec, seed=0, family=importlib.import_module(families).SharedLine())
    with torch.no_grad():
        learner.model[0].weight.fill_(0.75)
    save_learner(learner, tmp_path / "model.safetensors")
    loaded = load_learner(tmp_path / "model.safetensors")[0]
    assert loaded.model[0] is loaded.model[2] and loaded.model[0].weight.item() == 0.75
    for name, value in learner.tensors().items():
        assert torch.equal(loaded.tensors()[name], value), name


@pytest.mark.filterwarnings("ignore:Complex modules:UserWarning")
def test_a_learner_with_a_complex_tensor_safetensors_cannot_store_is_refused_before_writing(tmp_path: Path, families: str) -> None:
    """A network of one's own with complex128 parameters failed in safetensors' own KeyError
    (it stores no complex128): refused up front in one line naming the tensor and its dtype,
    with no file written. complex64, which safetensors stores, is saved as before."""
    from learnedopt.meta.fewshot import FewShotLearner, save_learner
    from learnedopt.meta.fewshot.learner import LearnerSpec

    spec = LearnerSpec(algo="maml", architecture={"kind": "own", "family": f"{families}:SharedLine"}, loss="mse",
                       inner_steps=1, test_inner_steps=2, inner_lr=0.1)  # fmt: skip
    learner = FewShotLearner(spec, seed=0, family=importlib.import_module(families).SharedLine())
    learner.model.to(torch.complex128)
    path = tmp_path / "out" / "model.safetensors"
    path.parent.mkdir()
    with pytest.raises(ValueError, match=r"^save_learner does not support .*model\.0\.weight.*torch\.complex128") as err:
        save_learner(learner, path)
    assert "\n" not in str(err.value) and list(path.parent.iterdir()) == []
    learner.model.to(torch.complex64)
    save_learner(learner, path)
    assert path.is_file()


@pytest.mark.parametrize("algo", ["maml", "meta-lstm"])
def test_a_model_file_keeps_each_tensors_dtype_and_reads_older_float32_files(tmp_path: Path, families: str, algo: str) -> None:
    """save_learner wrote every tensor as float32: an int64 buffer (a count, BatchNorm's
    num_batches_tracked) above 2**24 lost its exact value (2**24 + 1 read back as 2**24), and a
    float64 network of one's own was saved rounded to float32. Each tensor keeps its dtype now;
    files written as float32 still load (into the network's own dtypes)."""
    from safetensors import safe_open

    from learnedopt.meta.fewshot import FewShotLearner, save_learner
    from learnedopt.meta.fewshot.learner import LearnerSpec
    from learnedopt.weights import MODEL_HEADER_KEY, save_with_header

    family = importlib.import_module(families).Float64Line()
    spec = LearnerSpec(algo=algo, architecture={"kind": "own", "family": f"{families}:Float64Line"}, loss="mse",
                       inner_steps=1, test_inner_steps=2, inner_lr=None if algo == "meta-lstm" else 0.1,
                       rule={"kind": "MetaLSTMCell", "config": {}} if algo == "meta-lstm" else None)  # fmt: skip
    learner = FewShotLearner(spec, seed=0, family=family)
    with torch.no_grad():
        learner.model[3].seen.fill_(2**24 + 1)
        learner.model[0].weight[0, 0] = 1 + 2**-40  # not a float32 value
    expected = {k: v.detach().clone() for k, v in learner.tensors().items()}
    path = tmp_path / "model.safetensors"
    save_learner(learner, path)
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    assert {k: v.dtype for k, v in stored.items()} == {k: v.dtype for k, v in expected.items()}
    assert stored["model.3.seen"].dtype == torch.int64 and stored["model.0.weight"].dtype == torch.float64
    for name, value in expected.items():
        assert torch.equal(stored[name], value), name
    loaded = load_learner(path)[0]
    for name, value in loaded.tensors().items():
        assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), name

    # a file as save_learner wrote it before: every tensor float32
    with safe_open(str(path), framework="pt") as f:
        head = f.metadata()[MODEL_HEADER_KEY]
    older = tmp_path / "older.safetensors"
    save_with_header(older, MODEL_HEADER_KEY, json.loads(head), {k: v.float() for k, v in expected.items()})
    loaded = load_learner(older)[0]
    for name, value in loaded.tensors().items():
        assert value.dtype == expected[name].dtype, name
        assert torch.equal(value, expected[name].float().to(value.dtype)), name
    assert loaded.model[3].seen == 2**24 and loaded.model[3].mask.tolist() == [True, False]


@pytest.mark.parametrize("algo", ["maml", "reptile", "meta-lstm"])
def test_a_learner_whose_model_uses_a_layer_twice_keeps_its_parameters(algo: str) -> None:
    """torch.func.functional_call restored a layer held under two names under one only: the
    learner's predict (every algo) and meta-lstm's adapt left the model holding a task's weights."""
    from learnedopt.meta.fewshot import FewShotLearner
    from learnedopt.meta.fewshot.learner import LearnerSpec

    spec = LearnerSpec(algo=algo, architecture={"kind": "own", "family": "shared:SharedLayerLine"}, loss="own",
                       inner_steps=1, test_inner_steps=2, inner_lr=None if algo == "meta-lstm" else 0.1,
                       inner_optimizer="sgd" if algo == "reptile" else None,
                       rule={"kind": "MetaLSTMCell", "config": {}} if algo == "meta-lstm" else None)  # fmt: skip
    learner = FewShotLearner(spec, seed=0, family=SharedLayerLine())
    before = dict(learner.model.named_parameters())
    values = {name: p.detach().clone() for name, p in before.items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, generator=g), torch.rand(6, 1, generator=g)
    params = learner.adapt(x, y)
    outputs = learner.predict(params, x)
    for name, p in learner.model.named_parameters():
        assert p is before[name], f"{name} is no longer the model's Parameter"
        assert torch.equal(p, values[name])
    w, b = params["0.weight"], params["0.bias"]
    torch.testing.assert_close(outputs, torch.tanh(x @ w.T + b) @ w.T + b)
