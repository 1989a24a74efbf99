"""``learnedopt evaluate omniglot-runs`` on generated one-shot runs with a tiny meta-trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data_omniglot_runs import write_png
from test_meta_train_fewshot import make_omniglot_zip

from learnedopt.cli import main
from learnedopt.data import load_runs, score_runs
from learnedopt.meta.fewshot import MODEL_NAME, load_learner, predict_runs

TINY = ["--task", "omniglot", "--shots", "1", "--queries", "1", "--hidden", "4", "--meta-steps", "2",
        "--meta-batch", "1", "--val-tasks", "1", "--inner-steps", "1", "--test-inner-steps", "2", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 20 characters per alphabet, so that the held-out validation alphabet allows 20-way episodes
    return make_omniglot_zip(tmp_path_factory.mktemp("omniglot"), characters=20, drawers=2)


def make_runs(root: Path, runs: int) -> None:
    """20-way runs in the official layout: in run r, class j's image has ink on rows 5j+r and
    5j+r+1 (test items: one row only); test item k is class perm[k]."""
    g = torch.Generator().manual_seed(0)
    for r in range(1, runs + 1):
        run = root / f"run{r:02d}"
        perm = torch.randperm(20, generator=g).tolist()
        lines = []
        for j in range(20):
            write_png(run / "training" / f"class{j + 1:02d}.png", [5 * j + r, 5 * j + r + 1])
        for k, j in enumerate(perm):
            write_png(run / "test" / f"item{k + 1:02d}.png", [5 * j + r])
            lines.append(f"run{r:02d}/test/item{k + 1:02d}.png run{r:02d}/training/class{j + 1:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")


def meta_train(out: Path, data: Path, ways: int, algo: str = "maml") -> Path:
    argv = ["meta-train", "--algo", algo, "--ways", str(ways), *TINY, "--data", str(data), "--out", str(out)]
    assert main(argv) == 0
    return out / MODEL_NAME


def test_errors_match_score_runs_of_the_models_predictions(tmp_path: Path, data_dir: Path, capsys) -> None:
    checkpoint = meta_train(tmp_path / "model", data_dir, ways=20)
    make_runs(tmp_path / "runs", runs=2)
    capsys.readouterr()
    assert main(["evaluate", "omniglot-runs", "--runs", str(tmp_path / "runs"), "--checkpoint", str(checkpoint)]) == 0
    lines = capsys.readouterr().out.splitlines()

    runs = load_runs(tmp_path / "runs", image_size=28)
    learner, head = load_learner(checkpoint)
    assert head["test_inner_steps"] == 2
    errors, mean = score_runs(runs, predict_runs(learner, runs))
    assert lines == [f"run01  error {errors[0]:.1f}%", f"run02  error {errors[1]:.1f}%", f"mean error {mean:.2f}% over 2 runs"]

    # --steps overrides the model's test-time steps
    assert main(["evaluate", "omniglot-runs", "--runs", str(tmp_path / "runs"), "--checkpoint", str(checkpoint), "--steps", "1"]) == 0
    _, mean1 = score_runs(runs, predict_runs(learner, runs, steps=1))
    assert capsys.readouterr().out.splitlines()[-1] == f"mean error {mean1:.2f}% over 2 runs"

    # --support-copies adapts on distorted copies too, drawn from --seed
    argv = ["evaluate", "omniglot-runs", "--runs", str(tmp_path / "runs"), "--checkpoint", str(checkpoint)]
    assert main([*argv, "--support-copies", "3", "--seed", "7"]) == 0
    _, mean3 = score_runs(runs, predict_runs(learner, runs, support_copies=3, seed=7))
    assert capsys.readouterr().out.splitlines()[-1] == f"mean error {mean3:.2f}% over 2 runs"
    assert main([*argv, "--support-copies", "-1"]) == 2
    assert "--support-copies must be >= 0, got -1" in capsys.readouterr().err


def test_predict_runs_adapts_on_the_augmented_support_set(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    from learnedopt.data import augment_support

    learner, _ = load_learner(meta_train(tmp_path / "model", data_dir, ways=20))
    make_runs(tmp_path / "runs", runs=1)
    runs = load_runs(tmp_path / "runs", image_size=28)
    seen = []
    adapt = learner.adapt
    monkeypatch.setattr(learner, "adapt", lambda x, y, steps=None: seen.append((x, y)) or adapt(x, y, steps))
    predict_runs(learner, runs, support_copies=2, seed=3)
    x, y = augment_support(runs[0].train_images, torch.arange(20), 2, torch.Generator().manual_seed(3))
    assert torch.equal(seen[0][0], x) and torch.equal(seen[0][1], y) and x.shape[0] == 60


def test_refuses_a_model_that_is_not_20_way(tmp_path: Path, data_dir: Path, capsys) -> None:
    checkpoint = meta_train(tmp_path / "model", data_dir, ways=5)
    make_runs(tmp_path / "runs", runs=1)
    capsys.readouterr()
    assert main(["evaluate", "omniglot-runs", "--runs", str(tmp_path / "runs"), "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a 5-way model; the one-shot runs are 20-way" in err
    assert main(["evaluate", "omniglot-runs", "--runs", str(tmp_path / "runs"), "--checkpoint", str(tmp_path / "none")]) == 2
    assert "model file not found" in capsys.readouterr().err
