"""``learnedopt meta-train --algo maml|fomaml|reptile|meta-lstm``: training, artefacts, exact
resume, Omniglot on a generated zip, configuration errors."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import safe_open
from helpers import assert_killed_at_any_write_resumes, file_size_limit, folder_locked_by_another_run, run_files
from test_data_omniglot import glyph_mask, png_bytes

from learnedopt.cli import main
from learnedopt.data import load_omniglot
from learnedopt.meta.fewshot import (
    MODEL_NAME,
    FewShotConfig,
    FewShotLearner,
    FewShotTrainer,
    LearnerSpec,
    OmniglotSource,
    fewshot_defaults,
    inner_minibatches,
    load_learner,
    make_sources,
    omniglot_class_splits,
    output_layer_name,
    parse_alphabets,
    save_learner,
)
from learnedopt.meta.fewshot.training import _TRAIN_STREAM
from learnedopt.meta.loop import ConfigError
from learnedopt.meta.tasks import derive_seed, generator_for
from learnedopt.nn import MetaLSTMCell


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict


def header(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["learnedopt_model"])


def train(out: Path, *args: str) -> int:
    return main(["meta-train", "--out", str(out), "--quiet", *args])


def make_omniglot_zip(folder: Path, alphabets: int = 8, characters: int = 3, drawers: int = 3) -> Path:
    """``images_background_small1.zip`` in the official layout: alphabets ``Script1..``, each with
    ``characters`` characters drawn ``drawers`` times (rectangles placed by identity)."""
    folder.mkdir(parents=True, exist_ok=True)
    top = "images_background_small1"
    with zipfile.ZipFile(folder / f"{top}.zip", "w") as archive:
        for a in range(1, alphabets + 1):
            for c in range(1, characters + 1):
                for d in range(1, drawers + 1):
                    mask = glyph_mask(f"Script{a}", f"character{c:02d}", d)
                    archive.writestr(f"{top}/Script{a}/character{c:02d}/{900 + c:04d}_{d:02d}.png", png_bytes(mask))
    return folder


def config(algo: str, task: str = "sinusoid", **changes: Any) -> FewShotConfig:
    """``algo``'s default configuration on ``task``, with ``changes``."""
    return FewShotConfig(algo=algo, task=task, **{**fewshot_defaults(algo, task, changes.get("ways")), **changes})


RULE_CONFIG = '{"input_bias_init": [-0.5, -0.3], "forget_bias_init": [9, 10]}'  # starts at step ~0.4
SINE_TINY = ["--meta-batch", "2", "--val-tasks", "2", "--checkpoint-every", "2"]


def test_maml_sinusoid_lowers_the_validation_loss_and_writes_its_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--algo", "maml", "--meta-steps", "12", "--meta-batch", "10", "--meta-lr", "0.01", "--val-tasks", "20"]
    assert train(out, *args) == 0
    head = header(out / MODEL_NAME)
    assert head["algo"] == "maml" and head["architecture"] == {"kind": "mlp", "sizes": [1, 40, 40, 1], "activation": "relu"}
    assert head["inner_lr"] == 0.01 and head["test_inner_steps"] == 10
    validation = head["validation"]
    assert validation["final"]["loss"] < 0.95 * validation["initial"]["loss"], validation
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13)) and head["final_meta_loss"] == log[-1]["meta_loss"]
    card = (out / "MODEL_CARD.md").read_text()
    assert head["command"] in card and "--algo maml --task sinusoid" in card
    assert f"{validation['final']['loss']:.6g}" in card
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 12 and {"learner", "meta_optimizer", "config", "rng"} <= set(checkpoint)

    learner, _ = load_learner(out / MODEL_NAME)  # rebuilds and adapts without the checkpoint
    # the card's validation is on the fixed draw of key (seed, 2), for both learners
    trainer = FewShotTrainer(config("maml", meta_steps=12, meta_batch=10, meta_lr=0.01, val_tasks=20))
    assert trainer.validate(learner)["loss"] == pytest.approx(validation["final"]["loss"], rel=1e-5)
    assert trainer.validate(trainer.initial_learner())["loss"] == pytest.approx(validation["initial"]["loss"], rel=1e-5)
    x = torch.linspace(-5, 5, 10).unsqueeze(1)
    params = learner.adapt(x, torch.sin(x))
    assert learner.predict(params, x).shape == (10, 1)


def test_meta_lstm_an_empty_rule_config_is_the_default_rule_on_resume(tmp_path: Path) -> None:
    """``--rule-config '{}'`` sets no field of meta-lstm's rule: a resume that gave it to a run
    started without it was refused as a changed configuration (``--rule-config: None -> {}``)."""
    assert config("meta-lstm", rule_config={}) == config("meta-lstm")
    out, args = tmp_path / "run", ["--algo", "meta-lstm", *SINE_TINY, "--inner-steps", "1", "--test-inner-steps", "1",
                                   "--meta-steps", "3"]  # fmt: skip
    assert train(out, *args, "--stop-after", "2") == 0
    assert train(out, *args, "--resume", "--rule-config", "{}") == 0
    assert "--rule-config" not in header(out / MODEL_NAME)["command"]


def test_a_resume_whose_learner_builds_another_architecture_is_refused(tmp_path: Path, capsys) -> None:
    """The checkpoint records the learner's architecture (network and meta-lstm's rule): where
    the run now builds another of the same tensor shapes (the library's or a class's default
    changed since the run began, e.g. MetaLSTMCell's ``step_scale``), the resume loaded the old
    tensors into it and went on silently as another run. It is refused in one line naming the
    fields; a checkpoint that does not record it is not checked."""
    out, args = tmp_path / "run", ["--algo", "meta-lstm", *SINE_TINY, "--inner-steps", "1", "--test-inner-steps", "1",
                                   "--meta-steps", "3", "--checkpoint-every", "1"]  # fmt: skip
    assert train(out, *args, "--stop-after", "1") == 0
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert payload["architecture"]["rule"]["config"]["step_scale"] == 1.0
    payload["architecture"]["rule"]["config"]["step_scale"] = 2.0
    payload["architecture"]["network"]["activation"] = "tanh"
    torch.save(payload, out / "checkpoint.pt")
    assert train(out, *args, "--resume") == 2
    assert capsys.readouterr().err == (
        "learnedopt meta-train: error: --resume: the checkpoint holds a meta-lstm learner of another architecture than "
        "this run builds (network.activation: 'tanh' -> 'relu', rule.config.step_scale: 2.0 -> 1.0): its class or "
        "defaults changed since the run began; resume it with them as they were, or start over in another --out "
        "without --resume\n"
    )
    del payload["architecture"]
    torch.save(payload, out / "checkpoint.pt")
    assert train(out, *args, "--resume") == 0


@pytest.mark.parametrize(
    "algo_args",
    [
        ["--algo", "maml", "--learn-inner-lr"],
        ["--algo", "maml", "--learn-inner-lr", "--inner-steps", "2", "--multi-step-loss", "3"],
        ["--algo", "maml", "--learn-inner-lr", "--first-order-until", "2"],
        ["--algo", "reptile", "--meta-batch", "2"],
        ["--algo", "meta-lstm", "--inner-steps", "2", "--test-inner-steps", "2"],
        ["--algo", "meta-lstm", "--rule", "CoordinateLSTM", "--inner-steps", "2", "--test-inner-steps", "2"],
        ["--algo", "meta-lstm", "--rule-config", RULE_CONFIG, "--inner-steps", "2", "--test-inner-steps", "2"],
        ["--algo", "meta-lstm", "--preset", "meta-lstm-adam", "--inner-steps", "2", "--test-inner-steps", "2"],
    ],
    ids=["maml-metasgd", "maml-multi-step-loss", "maml-first-order-until", "reptile", "meta-lstm", "meta-lstm-coordinate-lstm", "meta-lstm-rule-config", "meta-lstm-preset"],
)
def test_resume_after_interruption_is_bit_identical(tmp_path: Path, algo_args: list[str]) -> None:
    args = [*SINE_TINY, "--meta-steps", "4", "--seed", "5", *algo_args]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert train(whole, *args) == 0
    assert train(broken, *args, "--stop-after", "3") == 0  # killed after step 3: checkpoint at 2
    assert not (broken / MODEL_NAME).exists()
    assert torch.load(broken / "checkpoint.pt", weights_only=True)["step"] == 2
    assert train(broken, *args, "--resume") == 0
    a, b = tensors(whole / MODEL_NAME), tensors(broken / MODEL_NAME)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    expected = {"maml": "inner_lr.", "meta-lstm": "rule.", "reptile": "model."}[algo_args[1]]
    assert any(name.startswith(expected) for name in a)
    if "--learn-inner-lr" in algo_args:
        assert (whole / "MODEL_CARD.md").read_text().startswith("# Meta-trained few-shot learner: maml (Meta-SGD) on sinusoid\n")
    ha, hb = header(whole / MODEL_NAME), header(broken / MODEL_NAME)
    assert ha["validation"] == hb["validation"]
    if "--rule" in algo_args:  # LSTMOptimizer's update in the inner loop, and the file says so
        assert ha["rule"]["kind"] == "CoordinateLSTM" and "--rule CoordinateLSTM" in ha["command"]
        learner, _ = load_learner(whole / MODEL_NAME)
        assert type(learner.rule).__name__ == "CoordinateLSTM"
        assert all(torch.equal(v, a[k]) for k, v in learner.tensors().items())
    if "--rule-config" in algo_args:  # the file, its command and the rebuilt rule carry the config
        assert ha["rule"]["config"]["input_bias_init"] == [-0.5, -0.3]
        assert ha["rule"]["config"]["forget_bias_init"] == [9, 10]
        words = shlex.split(ha["command"])
        assert json.loads(words[words.index("--rule-config") + 1]) == json.loads(RULE_CONFIG)
        learner, _ = load_learner(whole / MODEL_NAME)
        assert learner.rule.config.input_bias_init == (-0.5, -0.3)
        untrained = MetaLSTMCell.from_config_dict(json.loads(RULE_CONFIG))
        untrained.reset_parameters(generator=torch.Generator().manual_seed(0))
        forget_bias, input_bias = untrained.bias_fi.detach().tolist()
        assert -0.5 <= input_bias <= -0.3 and 9 <= forget_bias <= 10


def test_a_folder_another_run_is_writing_to_is_refused(tmp_path: Path, capsys) -> None:
    """A ``--resume`` while the run is still going is refused before it writes anything."""
    pytest.importorskip("fcntl")  # POSIX
    out, args = tmp_path / "run", [*SINE_TINY, "--algo", "maml", "--meta-steps", "3"]
    assert train(out, *args, "--stop-after", "2") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with folder_locked_by_another_run(out):
        assert train(out, *args, "--resume") == 2
        assert "in use by another meta-train process" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert train(out, *args, "--resume") == 0
    assert (out / MODEL_NAME).exists()


def test_a_run_killed_at_any_file_write_resumes_to_the_uninterrupted_runs_files(tmp_path: Path) -> None:
    """As for --algo lstm: killed during or after any checkpoint (with the best weights of
    --select-every and Reptile's annealing step), the model file or the card, the resumed run
    ends with the files of one never killed."""
    out, args = tmp_path / "run", [*SINE_TINY, "--algo", "reptile", "--meta-steps", "3", "--select-every", "2"]
    # 5 writes: the configuration it began with, checkpoints at meta-steps 2 and 3, the model file, the card
    assert_killed_at_any_write_resumes(out, train, args, writes=5)


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_model_file_that_cannot_be_written_is_one_line_and_resume_writes_it(tmp_path: Path, capsys) -> None:
    """As for --algo lstm: a full disk while the model file was written was safetensors' own
    traceback; it is one line naming the file, exit code 1, and ``--resume`` writes it."""
    args = [*SINE_TINY, "--algo", "maml", "--meta-steps", "2"]
    out = tmp_path / "run"
    assert train(out, *args) == 0
    whole = run_files(out)
    (out / MODEL_NAME).unlink()  # killed after the last checkpoint
    (out / "MODEL_CARD.md").unlink()
    capsys.readouterr()
    with file_size_limit(len(whole[MODEL_NAME]) // 2):
        assert train(out, *args, "--resume") == 1
    assert capsys.readouterr().err == (f"learnedopt meta-train: error: cannot write {out / MODEL_NAME} (File too large); the "
                                       "run's files written before it are kept whole: --resume continues the run once it "
                                       "can write\n")  # fmt: skip
    assert not (out / MODEL_NAME).exists() and not list(out.glob("*.tmp"))
    assert train(out, *args, "--resume") == 0
    assert run_files(out) == whole


def test_a_resume_before_the_first_checkpoint_is_refused_with_other_options(tmp_path: Path, capsys) -> None:
    """As for --algo lstm: a run killed before its first checkpoint resumes only as it began
    (``config.json``); another --inner-lr or --algo was started again silently."""
    out, args = tmp_path / "run", [*SINE_TINY, "--algo", "maml", "--meta-steps", "3"]
    assert train(out, *args, "--stop-after", "1") == 0
    assert not (out / "checkpoint.pt").exists()
    capsys.readouterr()
    assert train(out, *args, "--inner-lr", "0.5", "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"differs from the one the run in {out} began with (--inner-lr: 0.01 -> 0.5)" in err, err
    assert train(out, *args, "--algo", "fomaml", "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume: the run in {out} is one of --algo maml, not --algo fomaml" in err, err
    assert train(out, *args, "--resume") == 0 and (out / MODEL_NAME).exists()


def test_a_resume_accepts_the_settings_of_the_run_given_explicitly(tmp_path: Path, capsys) -> None:
    """As for --algo lstm: a setting given on ``--resume`` as the value the run took without it
    (``--train-shots`` equal to ``--shots``, meta-lstm's ``--rule MetaLSTMCell`` or a
    ``--rule-config`` of its defaults, the Omniglot alphabets in another order) runs the same,
    and was refused as a change; real changes are still refused, naming both values."""
    from learnedopt.meta.loop import _load_checkpoint, _save_checkpoint

    path = tmp_path / "checkpoint.pt"
    omniglot = {"valid_alphabets": "Script1,Script2", "test_alphabets": "Script3"}
    for begun, same in (
        (config("maml"), {"train_shots": 10}),
        (config("meta-lstm"), {"rule": "MetaLSTMCell", "rule_config": {"hidden_size": 20, "forget_bias_init": [4, 6]}}),
        (config("maml", "omniglot", **omniglot), {"valid_alphabets": "Script2, Script1,", "test_alphabets": " Script3"}),
    ):
        _save_checkpoint(path, begun, {}, 1)
        _load_checkpoint(path, dataclasses.replace(begun, **same))
    for begun, other, shown in (
        (config("maml"), {"train_shots": 5}, "--train-shots: 10 -> 5"),
        (config("meta-lstm"), {"rule": "CoordinateLSTM"}, "--rule: 'MetaLSTMCell' -> 'CoordinateLSTM'"),
        (config("maml", "omniglot", **omniglot), {"valid_alphabets": "Script1,Script4"},
         "--valid-alphabets: 'Script1,Script2' -> 'Script1,Script4'"),
    ):
        _save_checkpoint(path, begun, {}, 1)
        with pytest.raises(ConfigError, match=re.escape(f"differs from the checkpoint's ({shown})") + "$"):
            _load_checkpoint(path, dataclasses.replace(begun, **other))

    out, args = tmp_path / "run", [*SINE_TINY, "--algo", "meta-lstm", "--meta-steps", "3", "--shots", "4"]
    assert train(out, *args, "--stop-after", "2") == 0
    assert train(out, *args, "--resume", "--train-shots", "4", "--rule", "MetaLSTMCell") == 0, capsys.readouterr().err


def test_selection_keeps_the_best_validated_learner_and_resumes_exactly(tmp_path: Path) -> None:
    args = ["--algo", "maml", "--meta-batch", "2", "--val-tasks", "4", "--checkpoint-every", "2", "--seed", "6",
            "--meta-lr", "0.05"]  # fmt: skip
    selecting, broken = tmp_path / "selecting", tmp_path / "broken"
    assert train(selecting, *args, "--meta-steps", "6", "--select-every", "2") == 0
    log = [json.loads(line) for line in (selecting / "log.jsonl").read_text().splitlines()]
    scores = [r.get("select_loss") for r in log]
    assert scores[0] is None and scores[2] is None and None not in scores[1::2]
    head = header(selecting / MODEL_NAME)
    # at this setting meta-step 2 scores best (below the initialisation, which is scored too)
    assert head["selected_step"] == 2 and head["select_loss"] == min(scores[1::2]) == scores[1]
    assert "--select-every 2" in head["command"]
    # the saved learner is the one after meta-step 2: a run of 2 meta-steps (MAML's training does
    # not depend on --meta-steps) ends with the same tensors
    assert train(tmp_path / "two", *args, "--meta-steps", "2") == 0
    a, b = tensors(selecting / MODEL_NAME), tensors(tmp_path / "two" / MODEL_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "--select-every" not in header(tmp_path / "two" / MODEL_NAME)["command"]
    assert "These weights are those after meta-step 2 of 6" in (selecting / "MODEL_CARD.md").read_text()
    # killed after meta-step 5 (the checkpoint at 4 holds the selection): the same result
    assert train(broken, *args, "--meta-steps", "6", "--select-every", "2", "--stop-after", "5") == 0
    assert train(broken, *args, "--meta-steps", "6", "--select-every", "2", "--resume") == 0
    c = tensors(broken / MODEL_NAME)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert header(broken / MODEL_NAME)["selected_step"] == 2


@pytest.fixture(scope="module")
def omniglot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_omniglot_zip(tmp_path_factory.mktemp("omniglot"))


OMNIGLOT_TINY = ["--task", "omniglot", "--ways", "2", "--shots", "1", "--queries", "1", "--hidden", "4",
                 "--meta-steps", "2", "--meta-batch", "2", "--val-tasks", "2"]  # fmt: skip


@pytest.mark.parametrize("algo", ["fomaml", "reptile", "meta-lstm"])
def test_omniglot_on_a_generated_zip(tmp_path: Path, omniglot_dir: Path, algo: str, capsys) -> None:
    out = tmp_path / algo
    extra = ["--inner-steps", "2", "--test-inner-steps", "1"]
    if algo == "reptile":  # Nichol et al.'s scheme: more shots in meta-training, read in minibatches
        extra += ["--train-shots", "2", "--inner-batch", "3"]
    if algo == "fomaml":
        extra += ["--same-rotation", "--augment", "--zero-head"]
    assert train(out, "--algo", algo, *OMNIGLOT_TINY, *extra, "--same-alphabet", "--data", str(omniglot_dir)) == 0
    head = header(out / MODEL_NAME)
    accuracy = {k: head["validation"][k]["accuracy"] for k in ("initial", "final")}
    assert "accuracy (%) after 1 inner steps" in (out / "MODEL_CARD.md").read_text()  # a percentage, so said
    assert f"accuracy {accuracy['initial']:.4g}% -> {accuracy['final']:.4g}%" in capsys.readouterr().out
    assert head["architecture"] == {"kind": "conv4", "in_channels": 1, "ways": 2, "hidden": 4, "image_size": 28}
    split = head["omniglot_split"]
    assert len(split["meta_train"]) == 5 and len(split["meta_valid"]) == 1 and len(split["meta_test"]) == 2
    assert not set(split["meta_train"]) & set(split["meta_valid"] + split["meta_test"])
    assert 0.0 <= head["validation"]["final"]["accuracy"] <= 100.0
    card = (out / "MODEL_CARD.md").read_text()
    held_out = ", ".join(split["meta_valid"] + split["meta_test"])
    assert f"Held out from meta-training: {held_out}" in card and "with rotations" in card
    assert "each episode within one alphabet" in card
    tuned = "each episode within one rotation, every image distorted by a random affine map"
    assert (tuned in card) == (algo == "fomaml") and ("--same-rotation --augment" in head["command"]) == (algo == "fomaml")
    train_shots = 2 if algo == "reptile" else 1
    assert f"Meta-training tasks: Omniglot 2-way {train_shots}-shot 1-query" in card
    assert "Validation tasks (2): Omniglot 2-way 1-shot 1-query" in card
    learner, _ = load_learner(out / MODEL_NAME)
    assert head["zero_head"] == (algo == "fomaml") and ("--zero-head" in head["command"]) == (algo == "fomaml")
    if algo == "fomaml":  # the output layer (conv-4's last Linear) starts every task at zero
        head_params = {k: v for k, v in learner.tensors().items() if k.startswith("model.13.")}
        assert len(head_params) == 2 and all(torch.count_nonzero(v) == 0 for v in head_params.values())
    images = torch.rand(2, 1, 28, 28)
    params = learner.adapt(images, torch.tensor([0, 1]))
    assert learner.predict(params, images).shape == (2, 2)


BAD = [
    (["--algo", "maml", "--task", "mnist-mlp"], "--algo maml trains on --task sinusoid or omniglot, or your own few-shot family as module:attribute (e.g. mytasks:LineFamily), not 'mnist-mlp'"),
    (["--algo", "nope"], "unknown algo 'nope'; choose from lstm, maml, fomaml, reptile, meta-lstm"),
    (["--algo", "maml", "--task", "omniglot", "--data", "{tmp}/no-such-dir"], "--task omniglot needs the Omniglot zips"),
    (["--algo", "maml", "--unroll", "5"], "--unroll does not apply to --algo maml"),
    (["--ways", "5"], "--ways does not apply to --algo lstm"),
    (["--algo", "maml", "--ways", "5"], "--ways does not apply to --task sinusoid"),
    (["--algo", "maml", "--augment"], "--augment does not apply to --task sinusoid"),
    (["--algo", "reptile", "--same-rotation"], "--same-rotation does not apply to --task sinusoid"),
    # the sinusoid tasks are generated: --data was ignored, yet recorded in the card's command
    (["--algo", "maml", "--data", "{tmp}"], "--data does not apply to --task sinusoid"),
    (["--algo", "reptile", "--clip", "1"], "--clip does not apply to --algo reptile (it has no meta-gradient)"),
    (["--algo", "meta-lstm", "--inner-lr", "0.1"], "--inner-lr does not apply to --algo meta-lstm (its rule learns the step); it is an option of --algo maml, fomaml, reptile"),
    (["--algo", "reptile", "--learn-inner-lr"], "--learn-inner-lr does not apply to --algo reptile"),
    (["--algo", "meta-lstm", "--zero-head"], "--zero-head does not apply to --algo meta-lstm"),
    (["--algo", "reptile", "--head-only"], "--head-only does not apply to --algo reptile"),
    (["--algo", "fomaml", "--first-order-until", "3"], "--first-order-until does not apply to --algo fomaml"),
    (["--algo", "maml", "--first-order-until", "0"], "--first-order-until must be a positive integer, got 0"),
    # --first-order was argparse's abbreviation of --first-order-until: "expected one argument", and
    # "--algo maml --first-order 100" ran second-order MAML after 100 first-order meta-steps
    (["--algo", "maml", "--first-order"], "--first-order is not an option: first-order MAML is --algo fomaml"),
    (["--algo", "fomaml", "--first-order"], "--first-order is not an option: --algo fomaml is first-order MAML already"),
    (["--algo", "reptile", "--first-order"], "--first-order is not an option: --algo reptile is first-order by construction"),
    (["--algo", "meta-lstm", "--first-order"], "--first-order is not an option: --algo meta-lstm is first-order already"),
    # lstm's truncated unrolls are first order unless --second-order: not a pointer to --algo fomaml
    (["--first-order"], "--first-order is not an option: --algo lstm is first-order already (the optimizee's gradients are "
                        "detached; --second-order keeps their second-order terms)"),
    (["--algo", "lstm", "--first-order"], "--first-order is not an option: --algo lstm is first-order already"),
    (["--algo", "maml", "--first-order="], "--first-order is not an option: first-order MAML is --algo fomaml"),
    (["--algo", "maml", "--shots", "0"], "--shots must be a positive integer, got 0"),
    (["--algo", "maml", "--task", "omniglot", "--ways", "1", "--data", "{tmp}/no-such-dir"], "--ways must be at least 2, got 1"),
    (["--algo", "reptile", "--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (["--algo", "maml", "--inner-lr", "0"], "--inner-lr must be a positive number, got 0.0"),
    (["--algo", "fomaml", "--meta-lr", "-1"], "--meta-lr must be a positive number"),
    (["--algo", "maml", "--resume"], "--resume: no checkpoint at"),
    (["--algo", "maml", "--rule", "CoordinateLSTM"], "--rule does not apply to --algo maml"),
    (["--algo", "meta-lstm", "--rule", "SGD"], "unknown rule 'SGD'"),
    (["--algo", "maml", "--rule-config", "{}"], "--rule-config does not apply to --algo maml"),
    (["--algo", "meta-lstm", "--rule-config", '{"nope": 1}'], "--rule-config: unknown MetaLSTMCell config keys: ['nope']"),
    (["--algo", "meta-lstm", "--rule-config", '{"input_bias_init": [1, 0]}'], "--rule-config: input_bias_init must be a range"),
    (["--algo", "maml", "--inner-batch", "4"], "--inner-batch does not apply to --algo maml"),
    (["--algo", "maml", "--preset", "meta-lstm-adam"], "--preset does not apply to --algo maml; it is an option of --algo lstm, meta-lstm"),
    (["--algo", "meta-lstm", "--preset", "l2l-shrt"], "--preset: unknown preset 'l2l-shrt'"),
    (["--algo", "meta-lstm", "--preset", "meta-lstm-adam", "--rule-config", '{"hidden_size": 20}'], "--preset brings its rule's architecture and weights"),
    (["--algo", "reptile", "--multi-step-loss", "2"], "--multi-step-loss does not apply to --algo reptile"),
    (["--algo", "maml", "--multi-step-loss", "0"], "--multi-step-loss must be a positive integer, got 0"),
    (["--algo", "reptile", "--train-shots", "0"], "--train-shots must be a positive integer, got 0"),
    (["--algo", "reptile", "--inner-batch", "0"], "--inner-batch must be a positive integer, got 0"),
    # counts too large to ever run: a traceback from torch, or terabytes allocated before the first step
    (["--algo", "maml", "--shots", "10000000000000000000000"],
     "--meta-batch 25 and --shots 10000000000000000000000: the tasks' examples would have 250,000,000,000,000,000,000,000 elements; learnedopt's tensors have at most 2,147,483,647 (2**31 - 1)"),
    (["--algo", "fomaml", "--queries", "3000000000"], "--meta-batch 25 and --queries 3000000000: the tasks' examples"),
    (["--algo", "maml", "--meta-batch", "300000000"], "--meta-batch 300000000 and --shots 10: the tasks' examples would have 3,000,000,000 elements"),
    (["--algo", "maml", "--val-tasks", "30000000"], "--val-tasks 30000000 and validation queries 100: the tasks' examples would have 3,000,000,000 elements"),
    (["--algo", "reptile", "--train-shots", "3000000000"], "--meta-batch 1 and --train-shots 3000000000: the tasks' examples"),
    (["--algo", "maml", "--inner-steps", "3000000000"], "--inner-steps 3000000000: an inner loop's per-step losses would have 3,000,000,000 elements"),
    (["--algo", "meta-lstm", "--test-inner-steps", "10000000000000000000000"], "--test-inner-steps 10000000000000000000000: an inner loop's per-step losses"),
    (["--algo", "reptile", "--inner-batch", "1000000000"], "--inner-steps 5 and --inner-batch 1000000000: Reptile's (steps, batch) inner minibatches"),
    (["--algo", "maml", "--task", "omniglot", "--image-size", "10000000000000000000000", "--data", "{tmp}/no-such-dir"],
     "--meta-batch 8 and --shots 1 (with --ways 5 and --image-size 10000000000000000000000): the tasks' examples"),
    (["--algo", "maml", "--task", "omniglot", "--hidden", "100000", "--data", "{tmp}/no-such-dir"],
     "--hidden 100000: the conv-4's (hidden, hidden, 3, 3) weights would have 90,000,000,000 elements"),
    (["--algo", "maml", "--valid-alphabets", "A", "--test-alphabets", "B"], "--valid-alphabets does not apply to --task sinusoid"),
    (["--algo", "maml", "--task", "omniglot", "--test-alphabets", "Greek"],
     "--valid-alphabets and --test-alphabets choose the split together: give both or neither"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_configuration_is_one_line_and_exit_code_2(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert main(["meta-train", "--out", str(tmp_path / "run"), "--meta-steps", "1", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("learnedopt meta-train: error: ")
    assert message in err
    assert not (tmp_path / "run").exists()


def test_omniglot_without_pillow_names_pillow_not_the_zips(tmp_path: Path, capsys, monkeypatch) -> None:
    """Pillow (the ``data`` extra) missing, with the Omniglot zips in place: the one line said
    ``--task omniglot needs the Omniglot zips: reading Omniglot needs Pillow``, sending the user
    to look for files that were there."""
    data = make_omniglot_zip(tmp_path / "omniglot")
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    args = ["--algo", "maml", "--task", "omniglot", "--ways", "2", "--shots", "1", "--data", str(data)]
    assert main(["meta-train", "--out", str(tmp_path / "run"), "--meta-steps", "1", "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("learnedopt meta-train: error: --task omniglot: reading Omniglot needs Pillow"), err
    assert "zips" not in err
    assert not (tmp_path / "run").exists()


def test_first_order_followed_by_a_number_is_not_read_as_first_order_until(tmp_path: Path, capsys) -> None:
    """argparse took ``--first-order`` for its abbreviation ``--first-order-until``: ``--algo maml
    --first-order 3`` ran, second-order after 3 first-order meta-steps, with no word said. It is
    the refusal of ``--first-order``, which points to ``--first-order-until``, not argparse's
    "unrecognized arguments: 3", which said nothing of why."""
    assert main(["meta-train", "--out", str(tmp_path / "run"), "--meta-steps", "1", "--quiet", "--algo", "maml", "--first-order", "3"]) == 2
    err = capsys.readouterr().err
    assert err == ("learnedopt meta-train: error: --first-order is not an option: first-order MAML is --algo fomaml "
                   "(--first-order-until STEPS makes --algo maml first-order for its first STEPS meta-steps)\n")
    assert not (tmp_path / "run").exists()


def test_fewshot_counts_up_to_the_element_limit_are_accepted() -> None:
    """Counts of meta-steps size no tensor: any number passes; the examples of a draw may reach
    exactly 2**31 - 1 elements, one more is refused."""
    from learnedopt.meta.loop import MAX_ELEMENTS

    def config(algo: str = "maml", task: str = "sinusoid", **changes: Any) -> FewShotConfig:
        return FewShotConfig(algo=algo, task=task, **{**fewshot_defaults(algo, task, None), **changes})

    config(meta_steps=10**30, multi_step_loss=10**30, first_order_until=10**30).validate()
    config(meta_batch=MAX_ELEMENTS, shots=1, queries=1, val_tasks=1).validate()
    with pytest.raises(ConfigError, match="--meta-batch 2147483648 and --shots 1: the tasks' examples would have 2,147,483,648"):
        config(meta_batch=MAX_ELEMENTS + 1, shots=1, queries=1).validate()
    # Omniglot: (tasks, ways * examples, 1, S, S) images
    omniglot = fewshot_defaults("maml", "omniglot", None)
    assert omniglot["meta_batch"] * omniglot["ways"] * omniglot["queries"] == 200
    config(task="omniglot", image_size=3276, val_tasks=1).validate()  # 200 * 3276**2 = 2,146,435,200
    with pytest.raises(ConfigError, match=r"--meta-batch 8 and --queries 5 \(with --ways 5 and --image-size 3277\)"):
        config(task="omniglot", image_size=3277, val_tasks=1).validate()


@pytest.mark.parametrize(("task", "field", "value", "message"), [
    # refused deep in the run as "need integers n_way >= 1, k_shot >= 1 ... ask for fewer --ways"
    ("omniglot", "shots", 2.5, "--shots must be a positive integer, got 2.5"),
    ("omniglot", "ways", 3.0, "--ways must be a positive integer, got 3.0"),
    # "'<' not supported between instances of 'NoneType' and 'int'"
    ("omniglot", "image_size", None, "--image-size must be a positive integer, got None"),
    ("omniglot", "hidden", None, "--hidden must be a positive integer, got None"),
    ("sinusoid", "meta_batch", 2.0, "--meta-batch must be a positive integer, got 2.0"),  # a ValueError from the tasks
    ("sinusoid", "meta_steps", True, "--meta-steps must be a positive integer, got True"),
    ("sinusoid", "inner_batch", 1.5, "--inner-batch must be a positive integer, got 1.5"),
    # derive_seed took int(0.5): seed 0.5 drew every task of seed 0
    ("sinusoid", "seed", 0.5, "--seed must be a non-negative integer, got 0.5"),
])  # fmt: skip
def test_the_api_configuration_refuses_counts_that_are_not_integers(task: str, field: str, value: Any, message: str) -> None:
    """``FewShotConfig`` from Python (the command line gives integers) took a float or None for a
    count, and the run failed later, naming another option, or with a TypeError."""
    algo = "reptile" if field == "inner_batch" else "maml"
    values = {**fewshot_defaults(algo, task, None), field: value}
    seed = values.pop("seed", 0)
    with pytest.raises(ConfigError, match=re.escape(message)):
        FewShotConfig(algo=algo, task=task, seed=seed, **values).validate()


def test_same_rotation_episodes_share_an_orientation_and_augment_distorts_them(omniglot_dir: Path) -> None:
    data = load_omniglot(omniglot_dir / "images_background_small1.zip", rotations=True)
    classes = torch.arange(data.num_classes)

    def draws(source: OmniglotSource, n: int = 60) -> list[tuple[set[int], set[int]]]:
        """(rotations, alphabets) of the classes of ``n`` episodes."""
        episodes = [source.sampler.sample() for _ in range(n)]
        return [(set(data.rotation_of_class[e.classes].tolist()), set(data.alphabet_of_class[e.classes].tolist()))
                for e in episodes]  # fmt: skip

    both = draws(OmniglotSource(data, classes, 3, 1, 1, True, "meta_train", same_rotation=True))
    assert all(len(r) == 1 and len(a) == 1 for r, a in both)
    assert {next(iter(r)) for r, _ in both} == {0, 90, 180, 270}
    rotation_only = draws(OmniglotSource(data, classes, 3, 1, 1, False, "meta_train", same_rotation=True))
    assert all(len(r) == 1 for r, _ in rotation_only) and any(len(a) > 1 for _, a in rotation_only)
    alphabet_only = draws(OmniglotSource(data, classes, 3, 1, 1, True, "meta_train"))
    assert all(len(a) == 1 for _, a in alphabet_only) and any(len(r) > 1 for r, _ in alphabet_only)

    plain = OmniglotSource(data, classes, 3, 1, 2, False, "meta_train").batch(4, seed=7)
    augmented = OmniglotSource(data, classes, 3, 1, 2, False, "meta_train", augment=True)
    distorted, again = augmented.batch(4, seed=7), augmented.batch(4, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(distorted, again, strict=True))  # reproducible from the seed
    assert torch.equal(distorted[1], plain[1]) and torch.equal(distorted[3], plain[3])  # the same episodes
    for x_plain, x_distorted in ((plain[0], distorted[0]), (plain[2], distorted[2])):
        changed = (x_distorted - x_plain).abs().amax((-1, -2, -3))
        assert bool((changed > 0.05).all())  # every image, support and query, is distorted


def test_the_fixed_split_holds_out_the_alphabets_the_readme_names() -> None:
    """The fixed split is drawn (seed OMNIGLOT_SPLIT_SEED) over the 8 alphabets of the two small
    background sets: nothing pinned which ones it holds out, as the README says it does, so a torch
    whose randperm draws otherwise would move an alphabet across the split in silence."""
    names = ["Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean", "Latin", "Sanskrit", "Tagalog"]
    data = SimpleNamespace(num_classes=4 * 8, alphabet_of_class=torch.arange(8).repeat(4),
                           rotation_of_class=torch.tensor([0, 90, 180, 270]).repeat_interleave(8))  # fmt: skip
    parts = omniglot_class_splits(data)
    assert {part: sorted({names[i] for i in data.alphabet_of_class[ids].tolist()}) for part, ids in parts.items()} == {
        "meta_train": ["Balinese", "Greek", "Japanese_(katakana)", "Korean", "Tagalog"],
        "meta_valid": ["Latin"],
        "meta_test": ["Early_Aramaic", "Sanskrit"],
    }
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert ("meta-train Balinese, Greek, Japanese (katakana), Korean and Tagalog, with rotated classes added; "
            "meta-valid Latin; meta-test Early Aramaic and Sanskrit.") in readme  # fmt: skip


def test_the_split_of_data_on_a_gpu_is_the_cpu_split() -> None:
    """Class tables on a GPU (CUDA's device checks faked on the CPU): the named split compared
    them with a CPU tensor of alphabet ids (torch.isin raised a device mismatch), and the drawn one
    gave CPU meta-train ids beside meta-valid and meta-test ids on the GPU; every part is now the
    CPU ids the split of a CPU copy gives, as class_splits and EpisodeSampler take them."""
    from fake_cuda import fake_cuda

    names = [f"A{i}" for i in range(8)]
    data = SimpleNamespace(num_classes=4 * 8, alphabets=names, alphabet_of_class=torch.arange(8).repeat(4),
                           rotation_of_class=torch.tensor([0, 90, 180, 270]).repeat_interleave(8))  # fmt: skip
    expected = [omniglot_class_splits(data), omniglot_class_splits(data, ["A1"], ["A2", "A5"])]
    with fake_cuda():
        on_gpu = SimpleNamespace(num_classes=data.num_classes, alphabets=names, alphabet_of_class=data.alphabet_of_class.cuda(),
                                 rotation_of_class=data.rotation_of_class.cuda())  # fmt: skip
        got = [omniglot_class_splits(on_gpu), omniglot_class_splits(on_gpu, ["A1"], ["A2", "A5"])]
        for parts, want in zip(got, expected, strict=True):
            assert {k: (v.device.type, v.tolist()) for k, v in parts.items()} == {k: ("cpu", v.tolist()) for k, v in want.items()}


def test_named_held_out_alphabets_split_the_classes(tmp_path: Path, omniglot_dir: Path) -> None:
    data = load_omniglot(omniglot_dir / "images_background_small1.zip", rotations=True)
    parts = omniglot_class_splits(data, ["Script2"], ["Script5", "Script7"])

    def alphabets(ids: torch.Tensor) -> set[str]:
        return {data.alphabets[i] for i in data.alphabet_of_class[ids].tolist()}

    assert alphabets(parts["meta_valid"]) == {"Script2"} and alphabets(parts["meta_test"]) == {"Script5", "Script7"}
    assert alphabets(parts["meta_train"]) == {f"Script{i}" for i in (1, 3, 4, 6, 8)}
    every = torch.cat(list(parts.values()))
    assert len(every) == len(set(every.tolist()))  # disjoint
    unrotated = data.rotation_of_class == 0
    assert bool(unrotated[parts["meta_valid"]].all() and unrotated[parts["meta_test"]].all())
    assert len(parts["meta_test"]) == 2 * 3 and len(parts["meta_train"]) == 5 * 3 * 4  # 3 characters, 4 rotations
    with pytest.raises(ValueError, match="no alphabet 'Klingon' in the data; it has Script1, "):
        omniglot_class_splits(data, ["Script2"], ["Klingon"])
    with pytest.raises(ValueError, match="alphabet\\(s\\) Script2 named twice"):
        omniglot_class_splits(data, ["Script2"], ["Script2", "Script3"])
    with pytest.raises(ValueError, match="none is left for meta-training"):
        omniglot_class_splits(data, ["Script1"], [f"Script{i}" for i in range(2, 9)])
    with pytest.raises(ValueError, match="or neither"):
        omniglot_class_splits(data, ["Script1"], None)

    out = tmp_path / "named"
    names = ["--valid-alphabets", "Script2", "--test-alphabets", "Script5,Script7"]
    assert train(out, "--algo", "maml", *OMNIGLOT_TINY, *names, "--data", str(omniglot_dir)) == 0
    head = header(out / MODEL_NAME)
    assert head["omniglot_split"] == {"meta_train": ["Script1", "Script3", "Script4", "Script6", "Script8"],
                                      "meta_valid": ["Script2"], "meta_test": ["Script5", "Script7"]}  # fmt: skip
    assert head["meta_train_config"]["test_alphabets"] == "Script5,Script7"
    assert "--valid-alphabets Script2 --test-alphabets Script5,Script7" in head["command"]
    assert "as named by `--valid-alphabets` and `--test-alphabets`" in (out / "MODEL_CARD.md").read_text()
    assert train(tmp_path / "bad", "--algo", "maml", *OMNIGLOT_TINY, "--valid-alphabets", "Script2",
                 "--test-alphabets", "Script9", "--data", str(omniglot_dir)) == 2  # fmt: skip


def test_too_few_omniglot_classes_for_the_ways(tmp_path: Path, omniglot_dir: Path, capsys) -> None:
    args = ["--algo", "maml", "--task", "omniglot", "--ways", "5", "--queries", "1", "--data", str(omniglot_dir)]
    assert train(tmp_path / "run", *args) == 2
    err = capsys.readouterr().err
    assert "meta_valid classes: 5-way episodes need 5 classes, only 3 are allowed" in err
    # which alphabets the part holds, and how to name others (the part's alphabet(s) in the generated data)
    assert re.search(r"\(classes per alphabet: (Script\d 3)\); name other alphabets with --valid-alphabets or ask "
                     r"for fewer --ways$", err.strip())


@pytest.mark.parametrize(("extra", "ending"), [
    (["--shots", "2", "--queries", "2"], "have fewer than k_shot + q_query = 4 examples (class 0 has 3, class 1 has 3, class 2 has 3, "
                                         "class 6 has 3, class 7 has 3, ...); ask for fewer examples per class (--shots 2 plus --queries 2)"),
    (["--algo", "reptile", "--shots", "1", "--train-shots", "3", "--queries", "1"],
     "; ask for fewer examples per class (--train-shots 3 plus --queries 1)"),
    # enough drawings, too few classes in any one alphabet: the ways are what to lower
    (["--shots", "1", "--queries", "1", "--ways", "13", "--same-alphabet"], "Script8 12); ask for fewer --ways"),
])  # fmt: skip
def test_too_few_omniglot_drawings_for_the_shots_asks_for_fewer_shots(tmp_path: Path, omniglot_dir: Path, capsys,
                                                                       extra: list[str], ending: str) -> None:
    """Each generated character has 3 drawings: the fix is fewer examples per class, not fewer --ways."""
    args = ["--algo", "maml", "--task", "omniglot", "--ways", "2", "--data", str(omniglot_dir), *extra]
    assert train(tmp_path / "run", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--task omniglot, meta_train classes: " in err and err.endswith(ending), err


def test_inner_minibatches_use_every_example_once_before_repeating() -> None:
    x, y = torch.arange(10.0).view(5, 2), torch.arange(5)
    batches = inner_minibatches(x, y, 2, 6, torch.Generator().manual_seed(0))
    assert len(batches) == 6 and all(xb.shape == (2, 2) and yb.shape == (2,) for xb, yb in batches)
    picks = torch.cat([yb for _, yb in batches])
    assert sorted(picks[:5].tolist()) == [0, 1, 2, 3, 4] and sorted(picks[5:10].tolist()) == [0, 1, 2, 3, 4]
    for xb, yb in batches:  # inputs stay paired with their targets
        assert torch.equal(xb, x[yb])
    again = inner_minibatches(x, y, 2, 6, torch.Generator().manual_seed(0))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    assert not torch.equal(torch.cat([yb for _, yb in inner_minibatches(x, y, 2, 6, torch.Generator().manual_seed(1))]), picks)
    assert not torch.equal(picks[:5], picks[5:10])  # each pass over the set has a new order
    whole = inner_minibatches(x, y, None, 3, torch.Generator())
    assert len(whole) == 3 and all(xb is x and yb is y for xb, yb in whole)
    assert all(xb is x for xb, _ in inner_minibatches(x, y, 7, 2, torch.Generator()))


def test_a_diverging_reptile_run_stops_with_one_line_and_no_files(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train(out, *SINE_TINY, "--algo", "reptile", "--task", "sinusoid", "--meta-steps", "5", "--inner-lr", "1e6") == 2
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and "--inner-lr" in err and len(err.strip().splitlines()) == 1
    assert not (out / MODEL_NAME).exists()


@pytest.mark.parametrize("fixing", [["--algo", "reptile"], ["--algo", "maml", "--select-every", "2"]], ids=["reptile", "selection"])
def test_meta_steps_that_shape_the_run_cannot_change_on_resume(tmp_path: Path, capsys, fixing: list[str]) -> None:
    out = tmp_path / "run"
    args = [*SINE_TINY, "--task", "sinusoid", *fixing]
    assert train(out, *args, "--meta-steps", "4", "--stop-after", "2") == 0
    assert train(out, *args, "--meta-steps", "6", "--resume") == 2
    assert "--meta-steps: 4 -> 6" in capsys.readouterr().err
    assert train(out, *args, "--meta-steps", "4", "--resume") == 0


def test_a_finished_run_prints_its_files_and_validation(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train(out, "--algo", "maml", *SINE_TINY, "--meta-steps", "1") == 0
    validation = header(out / MODEL_NAME)["validation"]
    shown = f"loss {validation['initial']['loss']:.4g} -> {validation['final']['loss']:.4g}"
    assert capsys.readouterr().out == (
        f"wrote {out / MODEL_NAME} and MODEL_CARD.md: validation {shown} (initialisation -> meta-trained)\n"
    )


def test_first_order_until_takes_first_order_meta_steps_then_second_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAML++'s derivative-order annealing: meta-steps 1 and 2 of ``first_order_until=2`` are
    first-order MAML's, bit for bit (the same learner as fomaml's after step 1), the rest
    second-order; the API's configuration refuses it for the other algorithms."""
    from learnedopt.meta.maml import MAML

    orders: list[bool] = []
    query_losses = MAML.query_losses
    monkeypatch.setattr(MAML, "query_losses", lambda self, *a, **k: orders.append(self.first_order) or query_losses(self, *a, **k))
    annealed = FewShotTrainer(config("maml", first_order_until=2, meta_batch=2, val_tasks=2))
    for step in (1, 2, 3):
        annealed.step(step)
        if step == 1:
            after_one = {k: v.clone() for k, v in annealed.learner.tensors().items()}
    assert orders == [True, True, False]
    first_order = FewShotTrainer(config("fomaml", meta_batch=2, val_tasks=2))
    first_order.step(1)
    assert all(torch.equal(v, after_one[k]) for k, v in first_order.learner.tensors().items())
    second_order = FewShotTrainer(config("maml", meta_batch=2, val_tasks=2))
    second_order.step(1)
    assert not all(torch.equal(v, after_one[k]) for k, v in second_order.learner.tensors().items())
    for algo in ("fomaml", "reptile", "meta-lstm"):
        said = f"--first-order-until anneals MAML's meta-gradient from first to second order, not --algo {algo}'s"
        said += " (first-order throughout)" if algo == "fomaml" else ""
        with pytest.raises(ConfigError, match=f"^{re.escape(said)}$"):
            config(algo, first_order_until=2).validate()


def test_zero_head_is_refused_for_algorithms_without_a_maml_head() -> None:
    """The command line refuses ``--zero-head`` first; the API's configuration must too."""
    for algo in ("reptile", "meta-lstm"):
        with pytest.raises(ConfigError, match=f"--zero-head sets how MAML starts each task's output layer, not --algo {algo}'s"):
            config(algo, zero_head=True).validate()
    config("fomaml", zero_head=True).validate()
    for algo in ("reptile", "meta-lstm"):
        with pytest.raises(ConfigError, match=f"--head-only sets which layers MAML's inner loop adapts, not --algo {algo}'s"):
            config(algo, head_only=True).validate()


def test_head_only_adapts_the_output_layer_alone_and_meta_learns_the_rest(tmp_path: Path) -> None:
    """``--head-only`` (ANIL): a sinusoid run records it in its command and model file; the
    loaded learner adapts only the last layer, and its meta-gradient reaches the body."""
    out = tmp_path / "anil"
    assert train(out, "--algo", "maml", "--meta-steps", "2", "--meta-batch", "2", "--val-tasks", "2", "--head-only") == 0
    assert train(tmp_path / "plain", "--algo", "maml", "--meta-steps", "1", "--meta-batch", "2", "--val-tasks", "2") == 0
    head = header(out / MODEL_NAME)
    assert head["head_only"] is True and "--head-only" in head["command"]
    # the card's title names the variant (it said "maml" alone)
    assert (out / "MODEL_CARD.md").read_text().startswith("# Meta-trained few-shot learner: maml (ANIL) on sinusoid\n")
    assert (tmp_path / "plain" / "MODEL_CARD.md").read_text().startswith("# Meta-trained few-shot learner: maml on sinusoid\n")
    # format 2, which a reader of format 1 (that would adapt every layer) refuses; others stay 1
    assert head["format"] == 2 and header(tmp_path / "plain" / MODEL_NAME)["format"] == 1
    learner, _ = load_learner(out / MODEL_NAME)
    g = torch.Generator().manual_seed(0)
    x_s, y_s, x_q, y_q = (torch.randn(2, 10, 1, generator=g) for _ in range(4))
    assert set(learner.adapt(x_s[0], y_s[0])) == {"4.weight", "4.bias"}
    learner.meta_loss(x_s, y_s, x_q, y_q).backward()
    assert learner.model[0].weight.grad.abs().max() > 0


@pytest.mark.parametrize(
    ("algo", "task", "changes", "message"),
    [
        ("reptile", "sinusoid", {"learn_inner_lr": True}, "--learn-inner-lr learns MAML's inner step sizes (Meta-SGD), not --algo reptile's"),
        ("meta-lstm", "sinusoid", {"learn_inner_lr": True}, "--learn-inner-lr learns MAML's inner step sizes (Meta-SGD), not --algo meta-lstm's"),
        ("meta-lstm", "sinusoid", {"inner_lr": 0.5}, "--inner-lr sets the inner step size of MAML and Reptile, not --algo meta-lstm's"),
        ("reptile", "sinusoid", {"clip": 1.0}, "--clip clips a meta-gradient, and --algo reptile has none"),
        ("meta-lstm", "sinusoid", {"multi_step_loss": 5}, "--multi-step-loss weighs MAML's query losses after each inner step, not --algo meta-lstm's"),
        ("maml", "sinusoid", {"augment": True}, "--augment is an Omniglot setting; --task sinusoid does not read it"),
        ("maml", "sinusoid", {"hidden": 8}, "--hidden is an Omniglot setting"),
        ("fomaml", "sinusoid", {"same_alphabet": True}, "--same-alphabet is an Omniglot setting"),
        ("reptile", "sinusoid", {"data": "/some/folder"}, "--data is an Omniglot setting"),
    ],
)
def test_the_api_refuses_settings_its_run_would_ignore(algo: str, task: str, changes: dict, message: str) -> None:
    """The command line refuses these options; a configuration built in Python must too, or the
    run ignores them while the model file records them (a Reptile file saying learn_inner_lr)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        config(algo, task, **changes).validate()
    config("maml", learn_inner_lr=True).validate()
    config("meta-lstm", clip=0.5).validate()
    config("reptile", "omniglot", augment=True, same_alphabet=True).validate()


# the documented defaults ("the papers', scaled like the benchmarks"): README (Reptile on Omniglot),
# benchmarks/fewshot.py's docstring (sinusoid), the settings of its Omniglot results, which train
# with fewshot_defaults (MAML, meta-lstm), and the --val-tasks and --clip help
DOCUMENTED_DEFAULTS: dict[tuple[str, str, int | None], dict[str, Any]] = {
    ("maml", "sinusoid", None): {"inner_steps": 1, "inner_lr": 0.01, "test_inner_steps": 10, "meta_batch": 25,
                                 "meta_lr": 1e-3, "shots": 10, "queries": 10},
    ("reptile", "sinusoid", None): {"inner_steps": 5, "inner_lr": 0.02, "meta_batch": 1, "meta_lr": 0.1},
    ("maml", "omniglot", 5): {"inner_steps": 1, "inner_lr": 0.4, "test_inner_steps": 3, "train_shots": None},
    ("maml", "omniglot", 20): {"inner_steps": 5, "inner_lr": 0.1, "test_inner_steps": 5, "train_shots": None},
    ("reptile", "omniglot", 5): {"inner_steps": 5, "inner_lr": 1e-3, "test_inner_steps": 50, "train_shots": 10,
                                 "inner_batch": 10, "meta_batch": 5, "meta_lr": 1.0},
    ("reptile", "omniglot", 20): {"inner_steps": 10, "inner_lr": 5e-4, "test_inner_steps": 50, "train_shots": 10,
                                  "inner_batch": 20, "meta_batch": 5, "meta_lr": 1.0},
    ("meta-lstm", "omniglot", 5): {"inner_steps": 5, "inner_lr": None, "test_inner_steps": 5, "clip": 0.25},
}  # fmt: skip


def test_fewshot_defaults_are_the_documented_ones() -> None:
    for (algo, task, ways), expected in DOCUMENTED_DEFAULTS.items():
        for variant in ("maml", "fomaml") if algo == "maml" else (algo,):
            defaults = fewshot_defaults(variant, task, ways)
            assert {k: defaults[k] for k in expected} == expected, (variant, task, ways)
            assert defaults["val_tasks"] == 100, (variant, task, ways)
            assert defaults["clip"] == (0.25 if algo == "meta-lstm" else None)
    for algo in ("maml", "fomaml", "reptile", "meta-lstm"):  # --ways defaults to 5
        assert fewshot_defaults(algo, "omniglot", None) == fewshot_defaults(algo, "omniglot", 5)


def test_reptile_inner_optimizer_is_sgd_on_sinusoid_and_adam_on_omniglot() -> None:
    assert LearnerSpec.for_config(config("reptile")).inner_optimizer == "sgd"
    assert LearnerSpec.for_config(config("reptile", "omniglot", hidden=4)).inner_optimizer == "adam"
    assert LearnerSpec.for_config(config("maml")).inner_optimizer is None


def test_reptile_inner_adam_has_beta1_zero() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    adam = FewShotLearner(LearnerSpec.for_config(config("reptile", "omniglot", hidden=4))).inner_optimizer(params)
    assert type(adam) is torch.optim.Adam
    assert adam.defaults["betas"] == (0.0, 0.999) and adam.defaults["lr"] == 1e-3
    sgd = FewShotLearner(LearnerSpec.for_config(config("reptile"))).inner_optimizer(params)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["lr"] == 0.02 and sgd.defaults["momentum"] == 0


def test_evaluate_reports_the_accuracy_in_percent() -> None:
    spec = LearnerSpec(algo="maml", architecture={"kind": "mlp", "sizes": [2, 2], "activation": "relu"},
                       loss="cross_entropy", inner_steps=1, test_inner_steps=1, inner_lr=0.1)  # fmt: skip
    learner = FewShotLearner(spec, seed=0)
    with torch.no_grad():  # the identity: input i is classified as class i
        learner.model[0].weight.copy_(torch.eye(2))
        learner.model[0].bias.zero_()
    x = 5 * torch.eye(2).expand(2, 2, 2)
    labels = torch.tensor([[0, 1], [0, 0]])  # the second task's second query is labelled wrongly
    assert learner.evaluate(x, torch.tensor([[0, 1], [0, 1]]), x, labels, steps=0)["accuracy"] == 75.0


def test_meta_lstm_meta_loss_is_the_query_loss_after_adapting() -> None:
    learner = FewShotLearner(LearnerSpec.for_config(config("meta-lstm", inner_steps=2, test_inner_steps=2)), seed=0)
    g = torch.Generator().manual_seed(0)
    x_s, y_s, x_q, y_q = (torch.randn(2, 10, 1, generator=g) for _ in range(4))
    loss = learner.meta_loss(x_s, y_s, x_q, y_q)
    with torch.no_grad():
        per_task = [learner.loss_fn(learner.predict(learner.adapt(x_s[b], y_s[b]), x_q[b]), y_q[b]) for b in range(2)]
    torch.testing.assert_close(loss.detach(), torch.stack(per_task).mean())
    assert float(learner.meta_loss(x_s, y_s, x_q, y_q + 1).detach()) != pytest.approx(float(loss.detach()), rel=1e-3)


class TokenIds:
    """A few-shot family of your own over integer inputs: 5 token ids (vocabulary 6) per example,
    into an ``nn.Embedding``; class 1 where token 3 occurs more often than token 4."""

    loss = "cross_entropy"

    def sample(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        x = torch.randint(0, 6, (size, 7, 5), generator=generator)
        y = ((x == 3).sum(-1) > (x == 4).sum(-1)).long()
        return x[:, :4], y[:, :4], x[:, 4:], y[:, 4:]

    def model(self) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Embedding(6, 3), torch.nn.Flatten(), torch.nn.Linear(15, 2))


def test_meta_lstm_adapts_integer_inputs_with_its_states_in_the_parameters_dtype(monkeypatch) -> None:
    """Token ids are inputs a model of your own may take: the meta-lstm inner loop made its rule's
    states in the inputs' dtype (int64 here), which only worked because zeros promote (and the
    Triton path refuses them); they are in the parameters' math dtype, as ``init_rule_state`` makes them."""
    from learnedopt.meta.fewshot import learner as learner_module

    seen = []

    def spy(rule, task_batch, params, rule_state, *args, **kwargs):
        seen.append({k: v.dtype for k, v in rule_state.items()})
        return unroll(rule, task_batch, params, rule_state, *args, **kwargs)

    unroll = learner_module.unroll
    monkeypatch.setattr(learner_module, "unroll", spy)
    family = TokenIds()
    spec = LearnerSpec.for_config(config("meta-lstm", "tests:TokenIds", inner_steps=2, test_inner_steps=2), family=family)
    learner = FewShotLearner(spec, seed=0, family=family)
    x_s, y_s, x_q, y_q = family.sample(2, torch.Generator().manual_seed(0))
    assert torch.isfinite(learner.meta_loss(x_s, y_s, x_q, y_q))
    assert learner.predict(learner.adapt(x_s[0], y_s[0]), x_q[0]).shape == (3, 2)
    assert len(seen) == 2 and all(dtype == torch.float32 for states in seen for dtype in states.values()), seen


def test_meta_sgd_step_sizes_are_meta_trained() -> None:
    trainer = FewShotTrainer(config("maml", learn_inner_lr=True, meta_batch=2, val_tasks=1))
    before = {k: v.clone() for k, v in trainer.learner.tensors().items() if k.startswith("inner_lr.")}
    assert len(before) == 6  # a weight and a bias per layer
    trainer.step(0)
    after = trainer.learner.tensors()
    assert all(not torch.equal(after[k], v) for k, v in before.items())


def test_load_tensors_refuses_a_wrongly_shaped_tensor() -> None:
    learner = FewShotLearner(LearnerSpec.for_config(config("maml")), seed=0)
    before = {k: v.clone() for k, v in learner.tensors().items()}
    wrong = {**before, "model.0.bias": torch.full((1,), 7.0)}  # (1,) broadcasts to the (40,) bias
    with pytest.raises(ValueError, match=re.escape("missing [], unexpected [], wrong shape ['model.0.bias']")):
        learner.load_tensors(wrong)
    assert all(torch.equal(v, before[k]) for k, v in learner.tensors().items())


def test_inner_minibatches_as_large_as_the_support_set_keep_its_order() -> None:
    x, y = torch.arange(10.0).view(5, 2), torch.arange(5)
    batches = inner_minibatches(x, y, 5, 3, torch.Generator().manual_seed(0))
    assert len(batches) == 3 and all(xb is x and yb is y for xb, yb in batches)


def test_reptile_logs_the_mean_support_loss_over_the_meta_batch() -> None:
    trainer = FewShotTrainer(config("reptile", meta_batch=4, val_tasks=1))
    x_s, y_s, _, _ = trainer.source.batch(4, derive_seed(0, _TRAIN_STREAM, 0))
    with torch.no_grad():
        losses = [float(torch.nn.functional.mse_loss(trainer.learner.model(x), y)) for x, y in zip(x_s, y_s, strict=True)]
    assert trainer.step(0)["meta_loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)


@pytest.mark.parametrize("algo", ["maml", "fomaml", "meta-lstm"])
def test_clip_bounds_the_meta_gradient_adam_steps_with(algo: str) -> None:
    trainer = FewShotTrainer(config(algo, meta_batch=2, val_tasks=1, inner_steps=2, test_inner_steps=2, clip=1e-3))
    norms, step = [], trainer.meta_optimizer.step

    def grad_norm() -> float:
        grads = [p.grad for p in trainer.learner.meta_parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def spied_step(*args: Any, **kwargs: Any) -> Any:
        norms.append(grad_norm())  # what Adam steps with
        return step(*args, **kwargs)

    trainer.meta_optimizer.step = spied_step
    record = trainer.step(0)
    assert record["grad_norm"] > 0.01  # the logged norm is the one before clipping
    assert norms == [pytest.approx(1e-3, rel=1e-4)]  # clipped before the step, not after it


@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_meta_train_takes_clip_for_maml(tmp_path: Path, algo: str) -> None:
    """``--clip`` reaches MAML's trainer from the command line (it was refused there, though the
    trainer applied it), and the card's command repeats it."""
    out = tmp_path / "run"
    assert train(out, "--algo", algo, *SINE_TINY, "--meta-steps", "1", "--clip", "0.001") == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["clip"] == 0.001
    assert "--clip 0.001" in header(out / MODEL_NAME)["command"]


@pytest.mark.parametrize(("algo", "clip"), [("maml", None), ("fomaml", None), ("meta-lstm", 0.25)])
def test_the_default_clip_is_none_for_maml_and_a_quarter_for_meta_lstm(algo: str, clip: float | None) -> None:
    from learnedopt.cli import build_parser
    from learnedopt.meta.fewshot.config import config_from_args

    args = build_parser().parse_args(["meta-train", "--algo", algo, "--out", "unused"])
    assert config_from_args(args).clip == clip


@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_multi_step_loss_weighs_every_inner_step_then_anneals_to_the_last(algo: str) -> None:
    """``--multi-step-loss 2`` with 3 inner steps: meta-step 0 weighs the query loss after each
    step alike, meta-step 1 mostly the last, and from meta-step 2 on only the last counts."""
    trainer = FewShotTrainer(config(algo, inner_steps=3, multi_step_loss=2, meta_batch=2, val_tasks=1))
    plain = FewShotTrainer(config(algo, inner_steps=3, meta_batch=2, val_tasks=1))
    weights = [[1 / 3] * 3, [1 / 6, 1 / 6, 2 / 3], [0, 0, 1]]
    for step, w in enumerate(weights):
        batch = trainer.source.batch(2, derive_seed(0, _TRAIN_STREAM, step))
        with torch.no_grad():
            losses = trainer.learner.maml.query_losses(*batch)
        if step == 0:  # the same seed: the same initialisation and tasks
            last = float(losses[:, -1].mean())
            assert plain.step(0)["meta_loss"] == pytest.approx(last, rel=1e-5)
            assert abs(float(losses.mean()) - last) > 1e-3 * last  # the weighting shows
        expected = float((losses * losses.new_tensor(w)).sum(1).mean())
        assert trainer.step(step)["meta_loss"] == pytest.approx(expected, rel=1e-5), step


@pytest.mark.parametrize("preset", ["meta-lstm-adam", "l2l-blend"])
def test_meta_lstm_starts_its_learned_update_from_a_preset(preset: str, tmp_path: Path) -> None:
    """``--preset`` gives meta-lstm's rule the preset's architecture and weights (the seeded
    initialisation otherwise), in training and in the initial learner validation compares with;
    the model file keeps the trained rule, not the preset."""
    from learnedopt.weights import build_preset

    start = build_preset(preset)[0]
    trainer = FewShotTrainer(config("meta-lstm", preset=preset, meta_batch=2, val_tasks=1, inner_steps=2, test_inner_steps=2))
    for learner in (trainer.learner, trainer.initial_learner()):
        assert learner.rule.kind == start.kind and learner.rule.config_dict() == start.config_dict()
        for name, value in start.state_dict().items():
            assert torch.equal(learner.rule.state_dict()[name], value), name
    seeded = FewShotTrainer(config("meta-lstm", rule=start.kind, meta_batch=2, val_tasks=1, inner_steps=2, test_inner_steps=2))
    assert not all(torch.equal(a, b) for a, b in zip(seeded.learner.rule.state_dict().values(), start.state_dict().values()))
    trainer.step(0)
    path = tmp_path / "model.safetensors"
    save_learner(trainer.learner, path)
    loaded, _ = load_learner(path)
    assert all(torch.equal(v, trainer.learner.tensors()[k]) for k, v in loaded.tensors().items())
    assert not torch.equal(loaded.rule.state_dict()[next(iter(start.state_dict()))], next(iter(start.state_dict().values())))


def test_meta_lstm_from_a_preset_file_needs_it_only_at_the_start(tmp_path: Path) -> None:
    """The initial learner that validation compares with is kept from the start (its ``--preset``
    file was read again at the end, failing a run whose file had moved), and a killed run resumes
    from the copy of the file in its folder; both end as the uninterrupted run, whose model file
    records ``--preset`` as given."""
    from learnedopt import save_weights
    from learnedopt.weights import build_preset

    start = tmp_path / "mine.safetensors"
    save_weights(build_preset("meta-lstm-adam")[0], start)
    args = [*SINE_TINY, "--meta-steps", "4", "--seed", "5", "--algo", "meta-lstm", "--preset", str(start),
            "--inner-steps", "2", "--test-inner-steps", "2"]  # fmt: skip
    assert train(tmp_path / "whole", *args) == 0
    trainer = FewShotTrainer(config("meta-lstm", preset=str(start), meta_batch=2, val_tasks=1, inner_steps=2, test_inner_steps=2))
    kept = start.read_bytes()
    start.unlink()
    trainer.step(0)
    initial = trainer.initial_learner()
    for name, value in build_preset("meta-lstm-adam")[0].state_dict().items():
        assert torch.equal(initial.rule.state_dict()[name], value), name
    start.write_bytes(kept)

    broken = tmp_path / "broken"
    assert train(broken, *args, "--stop-after", "3") == 0
    start.unlink()
    assert train(broken, *args, "--resume") == 0
    a, b = tensors(tmp_path / "whole" / MODEL_NAME), tensors(broken / MODEL_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = header(tmp_path / "whole" / MODEL_NAME), header(broken / MODEL_NAME)
    assert ha["validation"] == hb["validation"] and ha["rule_start"] == hb["rule_start"] == str(start)


@pytest.mark.parametrize("hidden", [100_000, 10**12])
def test_a_model_header_stating_a_far_larger_rule_than_its_tensors_is_refused_before_building_it(tmp_path: Path, hidden: int) -> None:
    """A meta-lstm model file whose header states a rule of hidden size 100000 over hidden-20
    tensors: the learner was built first, a 160 GB allocation and a raw RuntimeError; of hidden
    size 10**12, whose sizes overflow even on the meta device, a raw allocator error after that."""
    from safetensors.torch import save_file

    trainer = FewShotTrainer(config("meta-lstm", meta_batch=2, val_tasks=1, inner_steps=2, test_inner_steps=2))
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_learner(trainer.learner, good)
    changed = header(good)
    changed["rule"]["config"]["hidden_size"] = hidden
    save_file(tensors(good), str(bad), metadata={"learnedopt_model": json.dumps(changed)})
    with pytest.raises(ValueError, match=r"bad.safetensors: its update rule: tensors do not match the MetaLSTMCell architecture .*wrong shape \['lstm.bias_hh_l0'"):
        load_learner(bad)
    learner, _ = load_learner(good)  # the real learner still loads, its tensors those saved
    assert all(torch.equal(v, trainer.learner.tensors()[k]) for k, v in learner.tensors().items())


def test_load_learner_builds_a_rule_that_cannot_say_its_shapes_without_building_once(tmp_path: Path, monkeypatch) -> None:
    """A rule of your own whose shapes are compared by building it (its ``weight_shapes`` fails:
    it cannot be built on the meta device): ``check_rule_shapes`` built it on the CPU, and
    ``load_learner`` dropped that rule and built another for the learner (and a third attempt
    on the meta device for its shape probe). It now uses the rule the check built, as
    ``load_weights`` does, and the learner's tensors are those saved. The check builds it as
    ``weights.blank_rule`` does: constructed once, on the meta device, then allocated on the CPU."""
    trainer = FewShotTrainer(config("meta-lstm", meta_batch=2, val_tasks=1, inner_steps=2, test_inner_steps=2))
    save_learner(trainer.learner, tmp_path / MODEL_NAME)

    def fails_on_meta(cls, values):
        raise NotImplementedError("Cannot copy out of meta tensor")

    built: list[str] = []
    real_init = MetaLSTMCell.__init__

    def counting_init(self, *args, **kwargs) -> None:
        built.append(str(torch.get_default_device()))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(MetaLSTMCell, "weight_shapes", classmethod(fails_on_meta))
    monkeypatch.setattr(MetaLSTMCell, "__init__", counting_init)
    learner, _ = load_learner(tmp_path / MODEL_NAME)
    assert built == ["meta"]
    assert {t.device.type for t in learner.rule.state_dict().values()} == {"cpu"}
    assert learner.tensors().keys() == trainer.learner.tensors().keys()
    assert all(torch.equal(v, trainer.learner.tensors()[k]) for k, v in learner.tensors().items())


def test_reptile_outer_step_anneals_linearly_to_zero_over_the_meta_steps() -> None:
    trainer = FewShotTrainer(config("reptile", meta_steps=4, meta_lr=0.1, val_tasks=1))
    assert [trainer.step(s)["outer_stepsize"] for s in range(4)] == pytest.approx([0.1, 0.075, 0.05, 0.025])
    assert trainer.reptile.current_outer_stepsize() == 0.0


def test_parse_alphabets_splits_at_commas_and_strips_spaces() -> None:
    assert parse_alphabets("Greek, Latin") == ["Greek", "Latin"]
    assert parse_alphabets(" Japanese_(katakana) ,Latin,, ") == ["Japanese_(katakana)", "Latin"]
    assert parse_alphabets(None) is None


def test_data_may_name_a_data_root_holding_omniglot(omniglot_dir: Path, tmp_path: Path) -> None:
    """``--data`` takes the data root (``LEARNEDOPT_DATA``'s folder, holding ``omniglot/``) as
    it does for MNIST, and reads the same images as from the zips' own folder."""
    root = tmp_path / "data"
    (root / "omniglot").mkdir(parents=True)
    (root / "omniglot" / "images_background_small1.zip").write_bytes((omniglot_dir / "images_background_small1.zip").read_bytes())
    from_root, _, _ = make_sources(config("maml", "omniglot", ways=2, queries=1, hidden=4, data=str(root)))
    direct, _, _ = make_sources(config("maml", "omniglot", ways=2, queries=1, hidden=4, data=str(omniglot_dir)))
    assert from_root.describe() == direct.describe()
    assert torch.equal(from_root.data.images, direct.data.images)


def test_the_default_omniglot_data_is_loaded_with_rotations(omniglot_dir: Path, monkeypatch) -> None:
    import learnedopt.data

    real, calls = learnedopt.data.load_omniglot, []

    def default_data(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return real(omniglot_dir / "images_background_small1.zip", **kwargs)

    monkeypatch.setattr(learnedopt.data, "load_omniglot", default_data)
    train_source, _, _ = make_sources(config("maml", "omniglot", ways=2, queries=1, hidden=4))  # no data folder given
    assert calls == [((None,), {"image_size": 28, "rotations": True})]  # None: the default search
    assert "with rotations" in train_source.describe()


@pytest.mark.parametrize("algo", ["maml", "reptile", "meta-lstm"])
def test_adaptation_takes_test_inner_steps_unless_told(algo: str) -> None:
    learner = FewShotLearner(LearnerSpec.for_config(config(algo, inner_steps=1, test_inner_steps=3)), seed=0)
    g = torch.Generator().manual_seed(0)
    x_s, y_s, x_q, y_q = (torch.randn(1, 10, 1, generator=g) for _ in range(4))
    default, three, one = learner.adapt(x_s[0], y_s[0]), learner.adapt(x_s[0], y_s[0], 3), learner.adapt(x_s[0], y_s[0], 1)
    assert all(torch.equal(default[k], three[k]) for k in default) and not all(torch.equal(default[k], one[k]) for k in default)
    initial = dict(learner.model.named_parameters())
    assert not all(torch.equal(one[k], initial[k]) for k in one)  # the adapted parameters, not the initial ones
    for steps, params in ((1, one), (None, three)):  # evaluate adapts with the steps it is given
        with torch.no_grad():
            expected = float(learner.loss_fn(learner.predict(params, x_q[0]), y_q[0]))
        assert learner.evaluate(x_s, y_s, x_q, y_q, steps=steps)["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "meta-lstm"])
def test_adaptation_under_no_grad_and_inference_mode_is_the_one_outside(algo: str) -> None:
    """MAML adapted under ``torch.inference_mode()``; Reptile's and meta-lstm's adaptation failed
    there ('element 0 of tensors does not require grad', and the unroll's refusal)."""
    learner = FewShotLearner(LearnerSpec.for_config(config(algo, inner_steps=1, test_inner_steps=2)), seed=0)
    g = torch.Generator().manual_seed(0)
    x_s, y_s, x_q, y_q = (torch.randn(1, 10, 1, generator=g) for _ in range(4))
    expected = learner.evaluate(x_s, y_s, x_q, y_q)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            inside = [t.clone() for t in (x_s, y_s, x_q, y_q)]  # inference tensors, under inference_mode
            assert learner.evaluate(*inside) == expected


@pytest.mark.parametrize("algo", ["maml", "fomaml", "meta-lstm"])
def test_the_meta_loss_under_no_grad_and_inference_mode_is_the_one_outside(algo: str) -> None:
    """An evaluation of the meta-loss (a validation meta-loss) under ``torch.no_grad()`` or
    ``torch.inference_mode()`` gives the value of the differentiable one, without a graph, for
    every algorithm that has one: MAML's did, meta-lstm's raised the unroll's "call it with
    autograd enabled" instead (its adaptation already ran there)."""
    learner = FewShotLearner(LearnerSpec.for_config(config(algo, inner_steps=2, test_inner_steps=2)), seed=0)
    g = torch.Generator().manual_seed(0)
    episode = [torch.randn(2, 6, 1, generator=g) for _ in range(4)]
    expected = learner.meta_loss(*episode)
    assert expected.requires_grad
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            inside = [t.clone() for t in episode]  # inference tensors, under inference_mode
            loss = learner.meta_loss(*inside)
        assert not loss.requires_grad
        torch.testing.assert_close(loss, expected.detach(), rtol=0, atol=0)
    assert all(p.grad is None for p in learner.meta_parameters())


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "meta-lstm"])
def test_a_frozen_layer_is_neither_adapted_nor_meta_trained(algo: str) -> None:
    """A layer with requires_grad=False (head-only adaptation) stays as it is, as in MAML and
    Reptile; meta-lstm's inner loop updated every parameter of the model."""
    learner = FewShotLearner(LearnerSpec.for_config(config(algo, inner_steps=2, test_inner_steps=2)), seed=0)
    learner.model[0].requires_grad_(False)
    frozen = {f"0.{k}": v.detach().clone() for k, v in learner.model[0].named_parameters()}
    g = torch.Generator().manual_seed(0)
    x_s, y_s, x_q, y_q = (torch.randn(2, 10, 1, generator=g) for _ in range(4))
    adapted = learner.adapt(x_s[0], y_s[0])
    assert all(torch.equal(adapted.get(k, v), v) for k, v in frozen.items())
    assert not torch.equal(adapted["4.weight"], learner.model[4].weight)
    if algo != "reptile":
        learner.meta_loss(x_s, y_s, x_q, y_q).backward()
        assert learner.model[0].weight.grad is None and learner.model[4].weight.grad is not None


@pytest.mark.parametrize("changes", [
    {"algo": "maml", "zero_head": True, "learn_inner_lr": True, "inner_steps": 2, "test_inner_steps": 4, "inner_lr": 0.05},
    {"algo": "reptile", "inner_steps": 2, "test_inner_steps": 3},
    {"algo": "meta-lstm", "inner_steps": 2, "test_inner_steps": 3},
])  # fmt: skip
def test_the_model_file_keeps_the_whole_spec_and_the_adaptation(tmp_path: Path, changes: dict) -> None:
    learner = FewShotLearner(LearnerSpec.for_config(config(**changes)), seed=0)
    save_learner(learner, tmp_path / MODEL_NAME)
    loaded, _ = load_learner(tmp_path / MODEL_NAME)
    assert loaded.spec == learner.spec
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 1, generator=g), torch.randn(10, 1, generator=g)
    want, got = learner.adapt(x, y), loaded.adapt(x, y)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_zero_head_zeroes_the_output_layer_of_the_mlp() -> None:
    learner = FewShotLearner(LearnerSpec.for_config(config("maml", zero_head=True)), seed=0)
    assert output_layer_name(learner.model) == "4"  # Linear 0, ReLU 1, Linear 2, ReLU 3, Linear 4
    params = learner.adapt(torch.randn(5, 1), torch.randn(5, 1), steps=0)
    assert torch.equal(learner.predict(params, torch.randn(7, 1)), torch.zeros(7, 1))


def test_maml_keeps_the_second_order_terms_that_fomaml_drops() -> None:
    g = torch.Generator().manual_seed(0)
    batch = [torch.randn(2, 10, 1, generator=g) for _ in range(4)]

    def meta_gradient(algo: str) -> torch.Tensor:
        learner = FewShotLearner(LearnerSpec.for_config(config(algo, inner_steps=2)), seed=0)
        learner.meta_loss(*batch).backward()
        return torch.cat([p.grad.flatten() for p in learner.meta_parameters()])

    second, first = meta_gradient("maml"), meta_gradient("fomaml")
    assert not torch.allclose(second, first, rtol=1e-3, atol=1e-6)


def test_support_and_query_distortions_are_drawn_apart(omniglot_dir: Path, monkeypatch) -> None:
    """``augment``: each image its own map, so a query image does not repeat its support
    counterpart's distortion."""
    import learnedopt.data

    data = load_omniglot(omniglot_dir / "images_background_small1.zip", rotations=True)
    real, states = learnedopt.data.random_affine, []
    monkeypatch.setattr(learnedopt.data, "random_affine", lambda x, g, *a: states.append(g.get_state()) or real(x, g, *a))
    source = OmniglotSource(data, torch.arange(data.num_classes), 3, 1, 1, False, "meta_train", augment=True)
    distorted = source.batch(2, seed=7)
    assert len(states) == 2 and not torch.equal(states[0], states[1])
    # the batch's seed keys the distortions as well as the episodes: (seed, 1)
    plain_source = OmniglotSource(data, torch.arange(data.num_classes), 3, 1, 1, False, "meta_train")
    plain = plain_source.batch(2, seed=7)
    g = generator_for(7, 1)
    assert torch.equal(distorted[0], real(plain[0], g)) and torch.equal(distorted[2], real(plain[2], g))
    # and every seed draws its own episodes
    supports = [plain_source.batch(2, seed=s)[0] for s in range(4)]
    assert all(not torch.equal(supports[i], supports[j]) for i in range(4) for j in range(i))


@pytest.mark.parametrize("names", [{}, {"valid_alphabets": "Script2", "test_alphabets": "Script5,Script7"}])
def test_the_sources_draw_only_from_their_part_and_validation_is_never_distorted(omniglot_dir: Path, names: dict) -> None:
    settings = dict(ways=2, queries=1, hidden=4, data=str(omniglot_dir), **names)
    train_source, valid_source, split = make_sources(config("maml", "omniglot", augment=True, **settings))
    data = train_source.data

    def alphabets(ids: torch.Tensor) -> list[str]:
        return sorted({data.alphabets[i] for i in data.alphabet_of_class[ids].tolist()})

    assert alphabets(train_source.classes) == split["meta_train"] and alphabets(valid_source.classes) == split["meta_valid"]
    assert not set(split["meta_test"]) & set(alphabets(train_source.classes) + alphabets(valid_source.classes))
    _, plain_valid, _ = make_sources(config("maml", "omniglot", **settings))
    assert all(torch.equal(a, b) for a, b in zip(valid_source.batch(3, 5), plain_valid.batch(3, 5), strict=True))


def test_reptile_inner_minibatches_have_their_size_and_a_key_per_task_and_step(monkeypatch) -> None:
    import learnedopt.meta.fewshot.training as training

    real, states, sizes = training.inner_minibatches, [], []

    def spy(x: torch.Tensor, y: torch.Tensor, batch: int | None, steps: int, generator: torch.Generator) -> list:
        states.append(generator.get_state())
        batches = real(x, y, batch, steps, generator)
        sizes.extend(len(yb) for _, yb in batches)
        return batches

    monkeypatch.setattr(training, "inner_minibatches", spy)
    trainer = FewShotTrainer(config("reptile", inner_batch=4, meta_batch=2, val_tasks=1))
    trainer.step(0)
    trainer.step(1)
    assert len(states) == 4 and set(sizes) == {4}
    assert all(not torch.equal(states[i], states[j]) for i in range(4) for j in range(i))


def test_validation_keeps_the_support_size_when_meta_training_has_more_shots() -> None:
    train_source, valid_source, _ = make_sources(config("maml", shots=5, train_shots=8))
    assert train_source.batch(2, 0)[0].shape == (2, 8, 1) and valid_source.batch(2, 0)[0].shape == (2, 5, 1)


def test_same_alphabet_holds_for_the_validation_episodes(omniglot_dir: Path) -> None:
    names = {"valid_alphabets": "Script2,Script3", "test_alphabets": "Script5"}
    _, valid_source, _ = make_sources(config("maml", "omniglot", ways=2, queries=1, hidden=4, data=str(omniglot_dir),
                                             same_alphabet=True, **names))  # fmt: skip
    data = valid_source.data
    alphabets = [set(data.alphabet_of_class[valid_source.sampler.sample().classes].tolist()) for _ in range(30)]
    assert all(len(a) == 1 for a in alphabets) and set().union(*alphabets) == {1, 2}


def test_meta_lstm_meta_gradient_reads_detached_support_gradients() -> None:
    """As in Ravi & Larochelle: the rule reads the support gradients and losses as constants,
    so the meta-gradient (of the initialisation and of the rule) is that of :func:`unroll`
    with ``stop_optimizee_grad=True`` run by hand on the support-then-query losses, not the
    exact one that keeps the second-order terms."""
    from learnedopt.meta.tasks import TaskBatch
    from learnedopt.meta.unroll import num_coordinates, unroll

    class SupportThenQuery(TaskBatch):
        def __init__(self, model: torch.nn.Module, data: list[torch.Tensor], steps: int) -> None:
            self.model, self.data, self.steps = model, data, steps

        def __len__(self) -> int:
            return self.data[0].shape[0]

        def loss(self, params: dict, step_index: int) -> torch.Tensor:
            x, y = self.data[:2] if step_index < self.steps else self.data[2:]
            return torch.stack([torch.nn.functional.mse_loss(
                torch.func.functional_call(self.model, {k: v[b] for k, v in params.items()}, (x[b],)), y[b])
                for b in range(len(self))])  # fmt: skip

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 10, 1, generator=g) for _ in range(4)]
    learner = FewShotLearner(LearnerSpec.for_config(config("meta-lstm", inner_steps=2, test_inner_steps=2)), seed=0)
    meta_parameters = learner.meta_parameters()
    got = torch.autograd.grad(learner.meta_loss(*data), meta_parameters)

    def by_hand(stop: bool) -> tuple[torch.Tensor, ...]:
        params = {k: p.unsqueeze(0).expand(2, *p.shape) for k, p in learner.model.named_parameters()}
        state = learner.rule.init_state(num_coordinates(params), dtype=torch.float32, device="cpu")
        result = unroll(learner.rule, SupportThenQuery(learner.model, data, 2), params, state, 2, stop_optimizee_grad=stop)
        return torch.autograd.grad(result.losses[-1].mean(), meta_parameters)

    detached, exact = by_hand(True), by_hand(False)
    for a, b in zip(got, detached, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(got, exact, strict=True))


@pytest.mark.parametrize("rule", [None, "CoordinateLSTM"])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_lstm_meta_loss_and_meta_gradient_equal_a_hand_written_float64_loop(rule: str | None, steps: int) -> None:
    """The learned initialisation and the learned update rule together, against a loop written
    without the unroll (float64): each task starts from the model's parameters and the rule's
    fresh states, takes ``steps`` rule steps ``theta + rule(grad, theta, state[, loss])`` on its
    support loss (the gradient and the loss the rule reads detached), and scores the query loss;
    the meta-loss is their mean, and its gradient for every meta-parameter (the model's and the
    rule's) is the learner's."""
    from torch.func import functional_call

    changes = {"inner_steps": steps, "test_inner_steps": steps, **({} if rule is None else {"rule": rule})}
    learner = FewShotLearner(LearnerSpec.for_config(config("meta-lstm", **changes)), seed=0)
    learner.model.double()
    learner.rule.double()
    g = torch.Generator().manual_seed(1)
    x_s, y_s, x_q, y_q = (torch.randn(2, 6, 1, generator=g, dtype=torch.float64) for _ in range(4))
    meta_parameters = learner.meta_parameters()
    meta_loss = learner.meta_loss(x_s, y_s, x_q, y_q)
    got = torch.autograd.grad(meta_loss, meta_parameters)

    model, cell = learner.model, learner.rule
    per_task = []
    for b in range(2):
        fast = dict(model.named_parameters())
        sizes = [v.numel() for v in fast.values()]
        state = cell.init_state(sum(sizes), dtype=torch.float64, device="cpu")
        for _ in range(steps):
            loss = learner.loss_fn(functional_call(model, fast, (x_s[b],)), y_s[b])
            grads = torch.autograd.grad(loss, list(fast.values()), retain_graph=True)
            flat_grad = torch.cat([v.reshape(-1) for v in grads])  # no graph: detached
            flat = torch.cat([v.reshape(-1) for v in fast.values()])
            reads = (loss.detach().reshape(1),) if cell.needs_loss else ()
            step, state = cell(flat_grad, flat, state, *reads)
            fast = {k: piece.view_as(v) for (k, v), piece in zip(fast.items(), (flat + step).split(sizes), strict=True)}
        per_task.append(learner.loss_fn(functional_call(model, fast, (x_q[b],)), y_q[b]))
    expected_loss = torch.stack(per_task).mean()
    expected = torch.autograd.grad(expected_loss, meta_parameters)
    torch.testing.assert_close(meta_loss, expected_loss, rtol=1e-13, atol=0)
    assert all(e.abs().max() > 0 for e in expected[-2:])  # the rule's output layer learns
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-14)


def test_same_alphabet_and_same_rotation_keep_every_rotated_alphabet_apart_with_50_alphabets() -> None:
    """Omniglot's 50 alphabets, each rotated 4 ways: a group per (alphabet, rotation). Rotations
    in degrees rather than quarter turns in the group id made alphabet a at 180 degrees and
    alphabet a + 45 upright one group; the generated test zips have only 8 alphabets."""
    from types import SimpleNamespace

    alphabet_of_base = torch.arange(50).repeat_interleave(2)  # 2 characters per alphabet
    angles = torch.tensor([0, 90, 180, 270])
    data = SimpleNamespace(
        alphabet_of_class=alphabet_of_base.repeat(4),
        rotation_of_class=angles.repeat_interleave(len(alphabet_of_base)),
        labels=torch.arange(4 * len(alphabet_of_base)).repeat_interleave(2),  # 2 drawings per class
    )
    classes = torch.arange(4 * len(alphabet_of_base))
    source = OmniglotSource(data, classes, 2, 1, 1, True, "meta_train", same_rotation=True)
    for _ in range(1000):
        ways = source.sampler.sample().classes
        assert len(set(data.alphabet_of_class[ways].tolist())) == 1
        assert len(set(data.rotation_of_class[ways].tolist())) == 1


def test_resume_on_other_omniglot_images_is_refused_and_a_copy_of_them_resumes(
    tmp_path: Path, omniglot_dir: Path, capsys
) -> None:
    """As for MNIST under --algo lstm: --data may move on --resume, not change the images."""
    other = make_omniglot_zip(tmp_path / "other", drawers=4)
    argv = ["--algo", "fomaml", *OMNIGLOT_TINY, "--inner-steps", "1", "--test-inner-steps", "1", "--checkpoint-every", "1"]
    out = tmp_path / "run"
    assert train(out, *argv, "--data", str(omniglot_dir), "--stop-after", "1") == 0
    assert train(out, *argv, "--data", str(other), "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume: the checkpoint's run read other Omniglot images" in err, err
    moved = shutil.copytree(omniglot_dir, tmp_path / "moved")
    assert train(out, *argv, "--data", str(moved), "--resume") == 0
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "meta-lstm"])
def test_inputs_and_targets_of_different_example_counts_are_refused_by_every_algorithm(algo: str) -> None:
    """MSE broadcast one query target over a task's outputs with only a warning (a wrong
    meta-loss), and a short support set failed inside the loss naming neither set; evaluate
    adapted every task before failing on a bad query set."""
    learner = FewShotLearner(LearnerSpec.for_config(config(algo, inner_steps=1, test_inner_steps=2)), seed=0)
    g = torch.Generator().manual_seed(0)
    x_s, y_s, x_q, y_q = (torch.randn(2, 10, 1, generator=g) for _ in range(4))
    mismatch = "inputs and targets hold different numbers of examples: "
    with pytest.raises(ValueError, match=re.escape(mismatch) + r"10 in (x_support|inputs) \(10, 1\), 3 in (y_support|targets) \(3, 1\)$"):
        learner.adapt(x_s[0], y_s[0, :3])
    if algo != "reptile":
        with pytest.raises(ValueError, match=re.escape(f"the query set's {mismatch}10 in x_query (2, 10, 1), 1 in y_query (2, 1, 1)")):
            learner.meta_loss(x_s, y_s, x_q, y_q[:, :1])
        with pytest.raises(ValueError, match=re.escape(f"the support set's {mismatch}10 in x_support (2, 10, 1), 4 in y_support (2, 4, 1)")):
            learner.meta_loss(x_s, y_s[:, :4], x_q, y_q)
    adapted = []
    learner.adapt = lambda *args, **kwargs: adapted.append(args)  # evaluate refuses before adapting any task
    with pytest.raises(ValueError, match=re.escape(f"the query set's {mismatch}10 in x_query (2, 10, 1), 1 in y_query (2, 1, 1)")):
        learner.evaluate(x_s, y_s, x_q, y_q[:, :1])
    with pytest.raises(ValueError, match=re.escape(f"the support set's {mismatch}10 in x_support (2, 10, 1), 4 in y_support (2, 4, 1)")):
        learner.evaluate(x_s, y_s[:, :4], x_q, y_q)
    assert adapted == []


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "meta-lstm"])
def test_every_algorithm_refuses_the_episodes_maml_refuses(algo: str) -> None:
    """meta-lstm's ``meta_loss`` took an empty support or query set to a NaN meta-loss without a
    word, failed on no tasks with "cannot reshape tensor of 0 elements" and on sets of different
    task counts with vmap's "Expected all tensors to have the same size in the mapped
    dimension"; its ``adapt`` of no example returned NaN parameters. ``evaluate`` (every
    algorithm) divided by zero on no tasks and failed on an IndexError after adapting the
    tasks it had. They refuse these as ``MAML`` does, in one line, before anything runs."""
    learner = FewShotLearner(LearnerSpec.for_config(config(algo, inner_steps=1, test_inner_steps=2)), seed=0)
    g = torch.Generator().manual_seed(0)
    x_s, y_s, x_q, y_q = (torch.randn(2, 10, 1, generator=g) for _ in range(4))
    cases = [
        ((x_s[:, :0], y_s[:, :0], x_q, y_q), "needs at least one support and one query example per task, got x_support (2, 0, 1), y_support (2, 0, 1)"),
        ((x_s, y_s, x_q[:, :0], y_q[:, :0]), "needs at least one support and one query example per task, got x_query (2, 0, 1), y_query (2, 0, 1)"),
        ((x_s[:0], y_s[:0], x_q[:0], y_q[:0]), "needs at least one task, got x_support (0, 10, 1), y_support (0, 10, 1), x_query (0, 10, 1)"),
        ((x_s, y_s, x_q[:1], y_q[:1]), "takes (B, N, ...) tensors of the same B tasks, got x_support (2, 10, 1), y_support (2, 10, 1), x_query (1, 10, 1)"),
        ((x_s, y_s[:, 0, 0], x_q, y_q), "takes (B, N, ...) tensors of B tasks of N examples, got y_support of shape (2,): one target per task"),
    ]  # fmt: skip
    who = {"maml": "MAML", "fomaml": "MAML", "meta-lstm": "meta-lstm"}
    adapt = learner.adapt
    adapted = []

    def spy(*args, **kwargs):
        adapted.append(args)
        raise RuntimeError("adapted a task")

    for args, message in cases:
        if algo in who:
            with pytest.raises(ValueError, match="^" + re.escape(f"{who[algo]} {message}")):
                learner.meta_loss(*args)
        learner.adapt = spy  # evaluate refuses before adapting any task
        with pytest.raises(ValueError, match="^" + re.escape(f"evaluate {message}")):
            learner.evaluate(*args)
        learner.adapt = adapt
    assert adapted == []
    with pytest.raises(ValueError, match=r"needs at least one (support )?example, got (x_support|inputs) of shape \(0, 1\)$"):
        learner.adapt(x_s[0, :0], y_s[0, :0])


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "meta-lstm"])
def test_classifiers_take_integer_labels_of_any_width_and_refuse_float_labels(algo: str) -> None:
    """The few-shot classifiers' cross-entropy is MAML's default loss: int32 labels failed in
    conv-4's task loop ("expected target dtype to be Long or Byte, but got Int") where an MLP
    under vmap took them, and float labels failed with torch's messages, "gather(): Expected
    dtype int32/int64 for index" under vmap."""
    learner = FewShotLearner(LearnerSpec.for_config(config(algo, "omniglot", hidden=4, image_size=14, inner_steps=1,
                                                           test_inner_steps=1)), seed=0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 10, 1, 14, 14, generator=g)
    y = torch.arange(5).repeat(2).expand(2, 10)
    want = learner.evaluate(x, y, x, y)
    assert learner.evaluate(x, y.int(), x, y.short()) == want
    if algo != "reptile":
        torch.testing.assert_close(learner.meta_loss(x, y.int(), x, y.int()), learner.meta_loss(x, y, x, y), rtol=0, atol=0)
    message = re.escape("takes class indices as integer targets or class probabilities of the outputs' shape (10, 5), got torch.float32 targets")
    with pytest.raises(TypeError, match=message):
        learner.evaluate(x, y.float(), x, y.float())
    if algo != "reptile":
        with pytest.raises(TypeError, match=message):
            learner.meta_loss(x, y.float(), x, y.float())


class BatchNormLines:
    """A regression family of your own whose network holds a BatchNorm layer."""

    loss = "mse"

    def sample(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        slope = torch.randn(size, 1, 1, generator=generator)
        x = torch.rand(size, 15, 1, generator=generator)
        return x[:, :5], slope * x[:, :5], x[:, 5:], slope * x[:, 5:]

    def model(self) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def describe(self) -> str:
        return "lines through a BatchNorm network"


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "meta-lstm"])
def test_a_batchnorm_network_of_your_own_family_is_transductive_for_every_algorithm(tmp_path: Path, algo: str) -> None:
    """MAML and Reptile replace BatchNorm by ``BatchStatNorm``; meta-lstm's learner kept the
    family's ``nn.BatchNorm1d``, whose running statistics failed its vmapped inner loop ("Batch
    norm got a batched tensor as input while the running_mean or running_var, which will be
    updated in place, were not batched") in meta_loss, adapt and evaluate alike."""
    from learnedopt.meta import BatchStatNorm

    family = BatchNormLines()
    spec = LearnerSpec.for_config(config(algo, "tests:BatchNormLines", inner_steps=1, test_inner_steps=2), family=family)
    learner = FewShotLearner(spec, seed=0, family=family)
    assert isinstance(learner.model[1], BatchStatNorm) and not list(learner.model.buffers())
    x_s, y_s, x_q, y_q = family.sample(2, torch.Generator().manual_seed(0))
    if algo != "reptile":
        assert torch.isfinite(learner.meta_loss(x_s, y_s, x_q, y_q))
    params = learner.adapt(x_s[0], y_s[0])
    with torch.no_grad():  # the adapted network normalises with its own batch's statistics
        outputs = learner.predict(params, x_q[0])
        features = x_q[0] @ params["0.weight"].T + params["0.bias"]
        normalised = (features - features.mean(0)) / torch.sqrt(features.var(0, unbiased=False) + 1e-5)
        hidden = torch.relu(normalised * params["1.weight"] + params["1.bias"])
        expected = hidden @ params["3.weight"].T + params["3.bias"]
    torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-6)
    assert set(learner.evaluate(x_s, y_s, x_q, y_q)) == {"loss"}


@pytest.mark.parametrize("algo", ["maml", "reptile", "meta-lstm"])
def test_a_model_with_every_parameter_frozen_is_refused_alike_by_every_algorithm(algo: str) -> None:
    """meta-lstm said "init_rule_state: params is empty", a function the user never called."""
    learner = FewShotLearner(LearnerSpec.for_config(config(algo, inner_steps=1, test_inner_steps=2)), seed=0)
    learner.model.requires_grad_(False)
    x = torch.randn(2, 10, 1)
    who = {"maml": "MAML", "reptile": "Reptile", "meta-lstm": "meta-lstm"}[algo]
    message = f"^{who}: no parameter of the model requires grad, so an inner step has nothing to adapt$"
    with pytest.raises(ValueError, match=message):
        learner.adapt(x[0], x[0])
    if algo != "reptile":
        with pytest.raises(ValueError, match=message):
            learner.meta_loss(x, x, x, x)


@pytest.mark.parametrize("algo", ["maml", "reptile", "meta-lstm"])
def test_adapting_for_zero_steps_gives_the_initialisation_for_every_algorithm(algo: str) -> None:
    """``adapt(..., steps=0)`` and ``evaluate(..., steps=0)`` (the score before adapting) gave the
    initialisation in MAML and Reptile; meta-lstm's unroll refused them ("steps must be >= 1")."""
    learner = FewShotLearner(LearnerSpec.for_config(config(algo, inner_steps=1, test_inner_steps=2)), seed=0)
    g = torch.Generator().manual_seed(0)
    x_s, y_s, x_q, y_q = (torch.randn(2, 10, 1, generator=g) for _ in range(4))
    params = learner.adapt(x_s[0], y_s[0], steps=0)
    initial = dict(learner.model.named_parameters())
    assert params.keys() == initial.keys() and all(torch.equal(v, initial[k]) and not v.requires_grad for k, v in params.items())
    with torch.no_grad():
        expected = sum(float(learner.loss_fn(learner.model(x_q[b]), y_q[b])) for b in range(2)) / 2
    assert learner.evaluate(x_s, y_s, x_q, y_q, steps=0)["loss"] == pytest.approx(expected, rel=1e-6)
    if algo != "reptile":  # no step reads the examples (Reptile checks its batches whatever the steps)
        assert learner.adapt(x_s[0, :0], y_s[0, :0], steps=0).keys() == initial.keys()


class ScaledInputs:
    """A regression family of your own whose network takes two inputs, ``model(x, scale)``."""

    loss = "mse"

    class Network(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = torch.nn.Linear(1, 8), torch.nn.Linear(8, 1)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.body(x)) * scale[..., None])

    def sample(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        x = torch.rand(size, 15, 1, generator=generator)
        return x[:, :5], 2 * x[:, :5], x[:, 5:], 2 * x[:, 5:]

    def model(self) -> torch.nn.Module:
        return self.Network()

    def describe(self) -> str:
        return "lines through a network of two inputs"


class PackedScaledInputs(ScaledInputs):
    """:class:`ScaledInputs` with its network taking both inputs packed in one ``(N, 2)`` tensor."""

    class Network(ScaledInputs.Network):
        def forward(self, xs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(xs[..., :1], xs[..., 1])


@pytest.mark.parametrize("algo", ["maml", "reptile", "meta-lstm"])
def test_every_algorithm_takes_a_tuple_or_dict_of_inputs_as_maml_does(algo: str) -> None:
    """MAML's learner took a network's several inputs as a tuple or dict in meta_loss and adapt,
    but evaluate failed on them ("'tuple' object has no attribute 'shape'"), and so did
    meta-lstm's meta_loss and adapt ("tuple indices must be integers or slices, not NoneType").
    Each gives what the same inputs give through a network taking them packed in one tensor."""
    family = ScaledInputs()
    spec = LearnerSpec.for_config(config(algo, "tests:ScaledInputs", inner_steps=1, test_inner_steps=2), family=family)
    learner = FewShotLearner(spec, seed=0, family=family)
    x_s, y_s, x_q, y_q = family.sample(2, torch.Generator().manual_seed(0))
    s_s, s_q = torch.rand(2, 5, generator=torch.Generator().manual_seed(1)), torch.ones(2, 10)
    packed = FewShotLearner(spec, seed=0, family=PackedScaledInputs())  # the same initialisation
    pack = lambda x, s: torch.cat([x, s[..., None]], -1)  # noqa: E731
    for inputs in (lambda x, s: (x, s), lambda x, s: {"scale": s, "x": x}):
        want = packed.evaluate(pack(x_s, s_s), y_s, pack(x_q, s_q), y_q)
        assert learner.evaluate(inputs(x_s, s_s), y_s, inputs(x_q, s_q), y_q) == pytest.approx(want, rel=1e-6)
        got, expected = learner.adapt(inputs(x_s[0], s_s[0]), y_s[0]), packed.adapt(pack(x_s[0], s_s[0]), y_s[0])
        assert all(torch.allclose(got[k], expected[k], rtol=1e-6, atol=1e-7) for k in expected)
        if algo != "reptile":
            torch.testing.assert_close(learner.meta_loss(inputs(x_s, s_s), y_s, inputs(x_q, s_q), y_q),
                                       packed.meta_loss(pack(x_s, s_s), y_s, pack(x_q, s_q), y_q), rtol=1e-6, atol=1e-7)  # fmt: skip


def test_a_library_network_refuses_a_tuple_of_inputs_naming_what_it_takes() -> None:
    """The sinusoid MLP and conv-4 take one tensor: a tuple failed with "'tuple' object has no
    attribute 'shape'"."""
    learner = FewShotLearner(LearnerSpec.for_config(config("maml")), seed=0)
    x = torch.randn(10, 1)
    with pytest.raises(TypeError, match=re.escape("x_support is a tuple; this learner's model takes one (N, 1) tensor")):
        learner.adapt((x, x), x)
    with pytest.raises(TypeError, match=re.escape("x is a dict; this learner's model takes one (N, 1) tensor")):
        learner.predict(learner.adapt(x, x), {"x": x})


def test_building_a_seeded_learner_leaves_the_cuda_generators_alone(monkeypatch) -> None:  # noqa: ANN001
    """``FewShotLearner(seed=...)`` built its model under ``torch.manual_seed`` inside a fork of
    the CPU generator only, which also reseeded every CUDA generator for good (the caller's GPU
    draws changed); the model is built on the CPU, and only the CPU generator is seeded now, and
    restored. So is an own rule's constructor under ``meta-train --rule module:Class``."""
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    spec = LearnerSpec.for_config(config("maml"))
    before = torch.get_rng_state()
    a, b = FewShotLearner(spec, seed=3), FewShotLearner(spec, seed=3)
    assert reseeded == []
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True))
