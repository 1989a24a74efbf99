"""``learnedopt meta-train --algo maml|fomaml|reptile|meta-lstm``: training, artefacts, exact
resume, Omniglot on a generated zip, configuration errors."""

from __future__ import annotations

import json
import shlex
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_data_omniglot import glyph_mask, png_bytes

from learnedopt.cli import main
from learnedopt.data import load_omniglot
from learnedopt.meta.fewshot import MODEL_NAME, OmniglotSource, inner_minibatches, load_learner, omniglot_class_splits
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
    x = torch.linspace(-5, 5, 10).unsqueeze(1)
    params = learner.adapt(x, torch.sin(x))
    assert learner.predict(params, x).shape == (10, 1)


@pytest.mark.parametrize(
    "algo_args",
    [
        ["--algo", "maml", "--learn-inner-lr"],
        ["--algo", "reptile", "--meta-batch", "2"],
        ["--algo", "meta-lstm", "--inner-steps", "2", "--test-inner-steps", "2"],
        ["--algo", "meta-lstm", "--rule", "CoordinateLSTM", "--inner-steps", "2", "--test-inner-steps", "2"],
        ["--algo", "meta-lstm", "--rule-config", RULE_CONFIG, "--inner-steps", "2", "--test-inner-steps", "2"],
    ],
    ids=["maml-metasgd", "reptile", "meta-lstm", "meta-lstm-coordinate-lstm", "meta-lstm-rule-config"],
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
def test_omniglot_on_a_generated_zip(tmp_path: Path, omniglot_dir: Path, algo: str) -> None:
    out = tmp_path / algo
    extra = ["--inner-steps", "2", "--test-inner-steps", "1"]
    if algo == "reptile":  # Nichol et al.'s scheme: more shots in meta-training, read in minibatches
        extra += ["--train-shots", "2", "--inner-batch", "3"]
    if algo == "fomaml":
        extra += ["--same-rotation", "--augment", "--zero-head"]
    assert train(out, "--algo", algo, *OMNIGLOT_TINY, *extra, "--same-alphabet", "--data", str(omniglot_dir)) == 0
    head = header(out / MODEL_NAME)
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
    (["--algo", "maml", "--task", "mnist-mlp"], "--algo maml trains on --task sinusoid or omniglot, not 'mnist-mlp'"),
    (["--algo", "nope"], "unknown algo 'nope'; choose from lstm, maml, fomaml, reptile, meta-lstm"),
    (["--algo", "maml", "--task", "omniglot", "--data", "{tmp}/no-such-dir"], "--task omniglot needs the Omniglot zips"),
    (["--algo", "maml", "--unroll", "5"], "--unroll does not apply to --algo maml"),
    (["--ways", "5"], "--ways does not apply to --algo lstm"),
    (["--algo", "maml", "--ways", "5"], "--ways does not apply to --task sinusoid"),
    (["--algo", "maml", "--augment"], "--augment does not apply to --task sinusoid"),
    (["--algo", "reptile", "--same-rotation"], "--same-rotation does not apply to --task sinusoid"),
    (["--algo", "reptile", "--clip", "1"], "--clip does not apply to --algo reptile"),
    (["--algo", "meta-lstm", "--inner-lr", "0.1"], "--inner-lr does not apply to --algo meta-lstm"),
    (["--algo", "reptile", "--learn-inner-lr"], "--learn-inner-lr does not apply to --algo reptile"),
    (["--algo", "meta-lstm", "--zero-head"], "--zero-head does not apply to --algo meta-lstm"),
    (["--algo", "maml", "--shots", "0"], "--shots must be a positive integer, got 0"),
    (["--algo", "fomaml", "--meta-lr", "-1"], "--meta-lr must be a positive number"),
    (["--algo", "maml", "--resume"], "--resume: no checkpoint at"),
    (["--algo", "maml", "--rule", "CoordinateLSTM"], "--rule does not apply to --algo maml"),
    (["--algo", "meta-lstm", "--rule", "SGD"], "unknown rule 'SGD'"),
    (["--algo", "maml", "--rule-config", "{}"], "--rule-config does not apply to --algo maml"),
    (["--algo", "meta-lstm", "--rule-config", '{"nope": 1}'], "--rule-config: unknown MetaLSTMCell config keys: ['nope']"),
    (["--algo", "meta-lstm", "--rule-config", '{"input_bias_init": [1, 0]}'], "--rule-config: input_bias_init must be a range"),
    (["--algo", "maml", "--inner-batch", "4"], "--inner-batch does not apply to --algo maml"),
    (["--algo", "reptile", "--train-shots", "0"], "--train-shots must be a positive integer, got 0"),
    (["--algo", "reptile", "--inner-batch", "0"], "--inner-batch must be a positive integer, got 0"),
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
    assert "meta_valid classes: 5-way episodes need 5 classes, only 3 are allowed" in capsys.readouterr().err


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
    assert "meta_steps: 4 -> 6" in capsys.readouterr().err
    assert train(out, *args, "--meta-steps", "4", "--resume") == 0
