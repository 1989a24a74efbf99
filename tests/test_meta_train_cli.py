"""``learnedopt meta-train``: training, logs, checkpoints, exact resume, configuration errors."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from helpers import (
    OWN_RULE,
    assert_killed_at_any_write_resumes,
    file_size_limit,
    folder_locked_by_another_run,
    importable_module,
    own_rule_module,
    run_files,
)
from test_meta_unroll import random_rule, write_fake_mnist

from learnedopt import load_weights
from learnedopt.cli import main
from learnedopt.meta.loop import MACHINE_FIELDS
from learnedopt.weights import read_header

# small and fast: 4 tasks, 10 steps in truncations of 5
FAST = [
    "--task",
    "quadratic",
    "--unroll",
    "5",
    "--horizon",
    "10",
    "--meta-batch",
    "4",
    "--meta-lr",
    "0.01",
    "--quiet",
]


def run(out: Path, *extra: str) -> int:
    return main(["meta-train", *FAST, "--out", str(out), *extra])


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict


def resumed_equals_whole(whole: Path, broken: Path, args: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run ``args`` into ``broken``, stopped after 3 meta-steps and resumed; assert its weights
    equal those of the uninterrupted run in ``whole`` bit for bit, and return them."""
    assert run(broken, *args, "--stop-after", "3") == 0
    assert run(broken, *args, "--resume") == 0
    a, b = tensors(whole / "weights.safetensors"), tensors(broken / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a


def test_meta_train_lowers_the_meta_loss_and_writes_its_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run(out, "--meta-steps", "8", "--checkpoint-every", "3") == 0

    log = log_lines(out)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(r["meta_updates"] == 2 for r in log)
    header = read_header(out / "weights.safetensors")
    assert header["trained"] is True and header["kind"] == "CoordinateLSTM"
    assert (
        header["meta_train_config"]["meta_steps"] == 8
        and header["final_meta_loss"] == log[-1]["meta_loss"]
    )
    # the same fixed evaluation episode, before and after meta-training
    assert header["eval_final"] < 0.75 * header["eval_initial"]
    assert header["command"].startswith(
        "learnedopt meta-train --rule CoordinateLSTM --task quadratic"
    )
    rule, _ = load_weights(out / "weights.safetensors")
    assert rule.config.hidden_size == 20

    card = (out / "MODEL_CARD.md").read_text()
    assert (
        header["command"] in card
        and "||W theta - y||^2" in card
        and f"{header['eval_final']:.6g}" in card
    )
    for name, value in header["meta_train_config"].items():  # every setting has its row
        assert f"| `{name}` | `{value!r}` |" in card, name
    assert "one Adam step (lr 0.01, gradient norm clipped to 1.0) per\ntruncation; optimizee gradients detached" in card
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 8 and set(checkpoint) >= {
        "rule",
        "meta_optimizer",
        "rng",
        "config",
    }
    assert not list(out.glob("*.tmp"))


def test_resume_after_interruption_is_bit_identical(tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ("--meta-steps", "6", "--checkpoint-every", "2", "--seed", "3")
    assert run(whole, *args) == 0
    # killed after meta-step 5: the checkpoint holds step 4, step 5 is logged but lost
    assert run(broken, *args, "--stop-after", "5") == 0
    assert not (broken / "weights.safetensors").exists()
    checkpoint = torch.load(broken / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 4 and checkpoint["rng"]["seed"] == 3  # every draw derives from the seed
    assert [r["step"] for r in log_lines(broken)] == [1, 2, 3, 4, 5]
    assert run(broken, *args, "--resume") == 0

    a, b = tensors(whole / "weights.safetensors"), tensors(broken / "weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    untimed = [
        [{k: v for k, v in r.items() if k not in MACHINE_FIELDS} for r in log_lines(d)]
        for d in (whole, broken)
    ]
    assert untimed[0] == untimed[1]  # steps 1..6, once each
    if sys.platform != "win32":  # the process's peak memory (MiB) is logged with every step
        peaks = [r["peak_rss_mb"] for r in log_lines(whole)]
        assert all(50 < p < 100_000 for p in peaks) and peaks == sorted(peaks), peaks
    ha, hb = read_header(whole / "weights.safetensors"), read_header(broken / "weights.safetensors")
    assert {k: v for k, v in ha.items() if k != "command"} == {
        k: v for k, v in hb.items() if k != "command"
    }


def test_other_rules_presets_and_module_entry_point(tmp_path: Path) -> None:
    assert run(tmp_path / "meta", "--rule", "MetaLSTMCell", "--meta-steps", "2") == 0
    assert read_header(tmp_path / "meta" / "weights.safetensors")["kind"] == "MetaLSTMCell"
    assert (
        run(tmp_path / "preset", "--preset", "l2l-2016", "--meta-steps", "1", "--second-order") == 0
    )
    assert (
        read_header(tmp_path / "preset" / "weights.safetensors")["meta_train_config"]["preset"]
        == "l2l-2016"
    )
    assert "truncation; second-order (exact) meta-gradients." in (tmp_path / "preset" / "MODEL_CARD.md").read_text()
    for module in ("learnedopt.meta.train", "learnedopt.train"):  # the issue's name is the second
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True
        )
        assert result.stdout.startswith(f"usage: python -m {module} ")
        assert "--checkpoint-every" in result.stdout and "--stop-after" not in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "learnedopt.train", "--unroll", "30", "--horizon", "20", "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unroll" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


def test_preset_may_be_a_weight_file_and_starts_where_that_preset_does(tmp_path: Path, capsys) -> None:
    from learnedopt import save_weights
    from learnedopt.weights import build_preset

    start = tmp_path / "start.safetensors"
    save_weights(build_preset("l2l-2016")[0], start)
    assert run(tmp_path / "by_name", "--preset", "l2l-2016", "--meta-steps", "2") == 0
    assert run(tmp_path / "by_file", "--preset", str(start), "--meta-steps", "2") == 0
    a = tensors(tmp_path / "by_name" / "weights.safetensors")
    b = tensors(tmp_path / "by_file" / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert f"--preset {start}" in read_header(tmp_path / "by_file" / "weights.safetensors")["command"]

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a weight file")
    assert run(tmp_path / "bad", "--preset", str(corrupt), "--meta-steps", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable weight file" in err
    assert not (tmp_path / "bad").exists()


def test_resume_needs_no_preset_file_the_run_keeps_a_copy(tmp_path: Path, capsys) -> None:
    """A killed run started from a ``--preset`` weight file resumes with the same command after
    the file was removed, or replaced by another rule's weights: it reads the copy in its folder,
    and ends as the uninterrupted run did."""
    from learnedopt import save_weights
    from learnedopt.weights import build_preset

    start = tmp_path / "mine.safetensors"
    save_weights(build_preset("l2l-2016")[0], start)
    args = ("--preset", str(start), "--meta-steps", "4", "--checkpoint-every", "2")
    assert run(tmp_path / "whole", *args) == 0
    for case in ("removed", "replaced"):
        broken = tmp_path / case
        assert run(broken, *args, "--stop-after", "3") == 0
        assert (broken / "start.safetensors").read_bytes() == start.read_bytes()
        kept = start.read_bytes()
        start.unlink()
        if case == "replaced":  # another architecture: the rule could not even load the checkpoint
            save_weights(build_preset("meta-lstm-adam")[0], start)
        assert run(broken, *args, "--resume") == 0, capsys.readouterr().err
        a, b = tensors(tmp_path / "whole" / "weights.safetensors"), tensors(broken / "weights.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ha, hb = read_header(tmp_path / "whole" / "weights.safetensors"), read_header(broken / "weights.safetensors")
        assert {k: v for k, v in ha.items() if k != "command"} == {k: v for k, v in hb.items() if k != "command"}
        assert hb["meta_train_config"]["preset"] == str(start)  # as given, not the copy
        start.write_bytes(kept)

    # killed before its first checkpoint: --resume starts again from the copy
    early = tmp_path / "early"
    assert run(early, *args, "--stop-after", "1") == 0
    assert not (early / "checkpoint.pt").exists()
    kept = start.read_bytes()
    start.unlink()
    assert run(early, *args, "--resume") == 0, capsys.readouterr().err
    a, b = tensors(tmp_path / "whole" / "weights.safetensors"), tensors(early / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start.write_bytes(kept)

    # a run from before runs kept a copy, its file gone: one line saying what to do
    old = tmp_path / "old"
    assert run(old, *args, "--stop-after", "3") == 0
    (old / "start.safetensors").unlink()
    start.unlink()
    capsys.readouterr()
    assert run(old, *args, "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--preset {start} is gone and {old} keeps no copy of it" in err, err


def test_a_resume_given_a_missing_preset_the_run_never_had_does_not_say_the_runs_file_is_gone(
    tmp_path: Path, capsys
) -> None:
    """A ``--resume`` given a ``--preset`` that names no preset and no file (a typo, or a path
    that is gone) said "the run's --preset X is gone and DIR keeps no copy of it (the run began
    before runs kept one)" for a run begun with no ``--preset`` or another one: false on both
    counts. Such a resume is refused as any unknown preset is, the folder untouched."""
    out = tmp_path / "run"
    args = ("--meta-steps", "4", "--checkpoint-every", "2")
    assert run(out, *args, "--stop-after", "3") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    missing = tmp_path / "mine.safetensors"
    for preset in ("l2l-typo", str(missing)):
        assert run(out, *args, "--preset", preset, "--resume") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"unknown preset {preset!r} and no such weight file" in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # begun from a preset file: another missing path is not the run's file either
    from learnedopt import save_weights
    from learnedopt.weights import build_preset

    start = tmp_path / "start.safetensors"
    save_weights(build_preset("l2l-2016")[0], start)
    other = tmp_path / "other"
    assert run(other, *args, "--preset", str(start), "--stop-after", "3") == 0
    (other / "start.safetensors").unlink()
    assert run(other, *args, "--preset", str(missing), "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"unknown preset {str(missing)!r} and no such weight file" in err, err


def test_rule_config_sets_the_architecture_and_is_recorded(tmp_path: Path) -> None:
    arch = '{"momentum_decays": [0.9, 0.99], "rms_decays": [0.999], "hidden_size": 8}'
    out = tmp_path / "rich"
    assert run(out, "--rule-config", arch, "--meta-steps", "2") == 0
    rule, header = load_weights(out / "weights.safetensors")
    assert rule.config.momentum_decays == (0.9, 0.99) and rule.config.rms_decays == (0.999,)
    assert rule.config.hidden_size == 8 and rule.config.num_inputs == 7
    assert header["meta_train_config"]["rule_config"] == json.loads(arch)
    # the recorded command runs the same architecture
    assert "--rule-config" in header["command"] and '"hidden_size": 8' in header["command"]


def test_random_horizon_draws_each_episode_length_and_resumes_exactly(tmp_path: Path) -> None:
    args = ["--random-horizon", "--unroll", "2", "--horizon", "9", "--meta-steps", "6", "--checkpoint-every", "2"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run(whole, *args) == 0
    log = log_lines(whole)
    horizons = [r["horizon"] for r in log]
    assert all(2 <= h <= 9 for h in horizons) and len(set(horizons)) > 1, horizons
    assert [r["meta_updates"] for r in log] == [-(-h // 2) for h in horizons]  # ceil(h / T)
    assert "drawn uniformly from [2, 9]" in (whole / "MODEL_CARD.md").read_text()
    assert "--random-horizon" in read_header(whole / "weights.safetensors")["command"]
    assert run(broken, *args, "--stop-after", "3") == 0
    assert run(broken, *args, "--resume") == 0
    assert [r["horizon"] for r in log_lines(broken)] == horizons
    a, b = tensors(whole / "weights.safetensors"), tensors(broken / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mnist_mlp_on_fake_data(tmp_path: Path) -> None:
    data = write_fake_mnist(tmp_path / "mnist", n=60)
    out = tmp_path / "run"
    argv = [
        "meta-train",
        "--task",
        "mnist-mlp",
        "--data",
        str(data),
        "--unroll",
        "2",
        "--horizon",
        "4",
    ]
    assert (
        main([*argv, "--meta-batch", "2", "--meta-steps", "2", "--out", str(out), "--quiet"]) == 0
    )
    card = (out / "MODEL_CARD.md").read_text()
    assert (
        "784-20-10" in card
        and "'meta_train' part (36 images)" in card
        and "'meta_valid' part (6 images)" in card
    )
    assert len(log_lines(out)) == 2


BAD = [
    (["--task", "cubic"], "unknown task 'cubic'"),
    # the README's few-shot command without its --algo: the mistake is the algorithm, not the task
    (["--task", "sinusoid"], "--task sinusoid is a few-shot task: meta-train it with --algo maml, fomaml, reptile, meta-lstm"),
    (["--task", "omniglot", "--ways", "20"], "--task omniglot is a few-shot task: meta-train it with --algo maml"),
    (["--task", "quadratic+quadratic"], "or a mixture of them joined by '+'"),
    (["--task", "quadratic:0+mnist-mlp"], "unknown task 'quadratic:0+mnist-mlp'"),
    (["--unroll", "20", "--horizon", "10"], "--unroll T=20 is longer than --horizon H=10"),
    (["--task", "mnist-mlp", "--data", "{tmp}/no-such-dir"], "no-such-dir"),
    # no family of these reads data: --data was ignored, yet written into the card's command
    (["--data", "{tmp}"], "--data is the MNIST folder of --task mnist-mlp and mlp-random; --task quadratic reads none"),
    (["--task", "regression+quadratic", "--data", "{tmp}"], "--task regression+quadratic reads none"),
    # a weight of non-ASCII digits passed str.isdigit() and crashed int() with a traceback
    (["--task", "quadratic:\u00b3+regression"], "unknown task 'quadratic:\u00b3+regression'"),
    # a weight beyond int64 crashed torch.randint with "Overflow when unpacking long long"
    (["--task", "quadratic:99999999999999999999999+regression"], "--task quadratic:99999999999999999999999+regression: a mixture's weights must sum to at most 1,000,000"),
    (["--unroll", "0"], "--unroll must be a positive integer, got 0"),
    (["--loss-weighting", "final"], "unknown --loss-weighting 'final'; choose from uniform, linear"),
    (["--horizon", "-5"], "--horizon must be a positive integer"),
    (["--meta-batch", "0"], "--meta-batch must be a positive integer"),
    (["--meta-steps", "0"], "--meta-steps must be a positive integer"),
    (["--meta-lr", "0"], "--meta-lr must be a positive number"),
    (["--meta-lr", "inf"], "--meta-lr must be a positive number, got inf"),
    (["--clip", "-1"], "--clip must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be a positive integer"),
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--select-every", "-1"], "--select-every must be a non-negative integer (0: no selection), got -1"),
    (["--algo", "maml", "--select-every", "-2"], "--select-every must be a non-negative integer"),
    (["--select-every", "1", "--select-tasks", "0"], "--select-tasks must be a positive integer, got 0"),
    # counts too large to ever run: a traceback from torch, or terabytes allocated before the first step
    (["--horizon", "100000000000000000000"], "--horizon 100000000000000000000 and --meta-batch 8: an episode's (H, B) losses would have 800,000,000,000,000,000,000 elements; learnedopt's tensors have at most 2,147,483,647 (2**31 - 1)"),
    (["--meta-batch", "100000000000000000000000"], "--horizon 100 and --meta-batch 100000000000000000000000: an episode's (H, B) losses"),
    (["--horizon", "1000000000"], "--horizon 1000000000 and --meta-batch 8: an episode's (H, B) losses would have 8,000,000,000 elements"),
    (["--meta-batch", "300000000", "--horizon", "2", "--unroll", "1"],
     "--task quadratic and --meta-batch 300000000: the rule's (B * P,) coordinates (P = 10 parameters per task) would have 3,000,000,000 elements"),
    (["--select-every", "1", "--select-tasks", "300000000", "--horizon", "2", "--unroll", "1"],
     "--task quadratic and --select-tasks 300000000: the rule's (B * P,) coordinates"),
    (["--select-every", "1", "--select-tasks", "10000000000"], "--horizon 100 and --select-tasks 10000000000: the selection episode's (H, K) losses"),
    # num_layers built layers for hours; a width too large for memory failed in torch with a traceback
    (["--rule-config", '{"num_layers": 100000000000}'], "--rule-config: num_layers must be at most 2,147,483,647 (2**31 - 1"),
    (["--rule-config", '{"hidden_size": 100000000}'], "--rule-config: CoordinateLSTM cannot be built: "),
    # under 2**31 weights but 4 * 10**8 tensors: built for hours
    (["--rule-config", '{"num_layers": 100000000, "hidden_size": 1}'],
     "--rule-config: CoordinateLSTM {'num_layers': 100000000, 'hidden_size': 1} would have 400,000,002 weight tensors; a rule has at most 10,000"),
    (["--algo", "meta-lstm", "--rule-config", '{"hidden_size": 100000000000}'], "--rule-config: hidden_size must be at most 2,147,483,647"),
    (["--select-tasks", "8"], "--select-tasks sizes the selection episode of --select-every; give --select-every too"),
    (["--algo", "maml", "--select-tasks", "8"], "--select-tasks"),
    (["--rule", "SGD"], "unknown rule 'SGD'"),
    (["--preset", "nope"], "unknown preset 'nope' and no such weight file"),
    (["--preset", "{tmp}/missing.safetensors"], "and no such weight file"),
    (["--resume"], "checkpoint.pt, nor a log: nothing to continue; run the command without --resume"),
    (["--rule-config", '{"width": 3}'], "--rule-config: unknown CoordinateLSTM config keys: ['width']"),
    (["--rule-config", '{"hidden_size": 0}'], "--rule-config: hidden_size must be an integer >= 1, got 0"),
    # JSON true is not the integer 1 (it trained a 1-unit rule, or crashed after creating the folder)
    (["--rule-config", '{"num_layers": true}'], "--rule-config: num_layers must be an integer >= 1, got True"),
    (["--rule-config", '{"hidden_size": true}'], "--rule-config: hidden_size must be an integer >= 1, got True"),
    (["--rule-config", '{"param_input": 1}'], "--rule-config: param_input must be true or false, got 1"),
    # a number where a list belongs: it said "Value after * must be an iterable, not float"
    (["--rule-config", '{"momentum_decays": 0.9}'], "--rule-config: momentum_decays must be a list of decays, got 0.9"),
    (["--rule", "MetaLSTMCell", "--rule-config", '{"hidden_size": true}'], "hidden_size must be an integer >= 1, got True"),
    (["--preset", "l2l-2016", "--rule-config", '{"hidden_size": 20}'], "--rule-config sets the architecture of --rule"),
    (["--device", "tpu"], "--device must be cpu or cuda[:N], got 'tpu'"),
    (["--device", "cuda:x"], "--device must be cpu or cuda[:N], got 'cuda:x'"),
    (["--algo", "maml", "--device", "mps"], "--device must be cpu or cuda[:N], got 'mps'"),
    # an empty --device ran the few-shot algorithms on the CPU (the default), where --algo lstm refused it
    (["--device", ""], "--device must be cpu or cuda[:N], got ''"),
    (["--algo", "maml", "--device", ""], "--device must be cpu or cuda[:N], got ''"),
    (["--algo", "reptile", "--device", ""], "--device must be cpu or cuda[:N], got ''"),
    # torch takes any index of the CPU as the CPU: a run "on cpu:1" ran on the one CPU device
    (["--device", "cpu:1"], "--device cpu:1: the CPU is one device, cpu or cpu:0; use --device cpu"),
    (["--algo", "maml", "--task", ""], "--algo maml trains on --task sinusoid or omniglot, or your own few-shot family as module:attribute (e.g. mytasks:LineFamily), not ''"),
    (["--dist-timeout", "0"], "--dist-timeout must be a positive number of seconds, got 0.0"),
    (["--dist-timeout", "inf"], "--dist-timeout must be a positive number of seconds, got inf"),
    # finite, but more than a datetime.timedelta holds: torchrun's ranks each stopped with an
    # OverflowError traceback in init_process_group (a single process ran, ignoring it)
    (["--dist-timeout", "1e14"], "--dist-timeout must be at most 8.64e+13 seconds (the longest datetime.timedelta), got 1e+14"),
    # an option of the other kind of algorithm is refused even at a value that reads as false
    (["--algo", "maml", "--horizon", "0"], "--horizon does not apply to --algo maml; it is an option of --algo lstm"),
]
if not torch.cuda.is_available():
    BAD += [
        (["--device", "cuda"], "--device cuda: CUDA is not available to this torch"),
        (["--algo", "reptile", "--device", "cuda:0"], "--device cuda:0: CUDA is not available to this torch"),
    ]


@pytest.mark.parametrize(
    ("extra", "message"), BAD, ids=[m.split(" ")[0] + "|" + " ".join(e) for e, m in BAD]
)
def test_bad_configuration_is_one_line_and_exit_code_2(
    tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    argv = ["meta-train", "--out", str(tmp_path / "run"), "--meta-steps", "1", "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("learnedopt meta-train: error: ")
    assert message in err
    assert not (tmp_path / "run").exists()


def test_counts_up_to_the_element_limit_are_accepted() -> None:
    """The limit is on what a run allocates, not on how long it runs: a million meta-steps (or
    10**30) pass, and so does an episode's (H, B) losses of exactly 2**31 - 1 elements; one more
    is refused."""
    from learnedopt.meta.loop import MAX_ELEMENTS, ConfigError
    from learnedopt.meta.train import MetaTrainConfig

    MetaTrainConfig(meta_steps=10**6).validate()
    MetaTrainConfig(meta_steps=10**30, select_every=10**30).validate()
    MetaTrainConfig(horizon=MAX_ELEMENTS, meta_batch=1).validate()
    with pytest.raises(ConfigError, match=r"--horizon 2147483648 and --meta-batch 1: an episode's \(H, B\) losses"):
        MetaTrainConfig(horizon=MAX_ELEMENTS + 1, meta_batch=1).validate()


def test_rule_config_that_is_not_a_json_object_is_an_argument_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "run", "--meta-steps", "1", "--rule-config", "[1, 2]")
    assert exit_info.value.code == 2
    assert "argument --rule-config: expected a JSON object, got [1, 2]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_checkpoint_every_defaults_to_the_documented_10() -> None:
    import argparse

    from learnedopt.meta.command import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert "checkpoint every N meta-steps (default 10)" in " ".join(parser.format_help().split())
    assert parser.parse_args(["--out", "run"]).checkpoint_every == 10


def test_the_data_help_names_every_task_that_reads_it() -> None:
    """--data goes to a task family of your own that takes ``data`` (both kinds of algorithm, as
    the README says); the help named only MNIST and Omniglot."""
    import argparse

    from learnedopt.meta.command import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    data_help = next(a.help for a in parser._actions if "--data" in a.option_strings)
    assert "mnist-mlp" in data_help and "omniglot" in data_help
    assert "given as data= to your own family (--task module:Class or module:attribute) where it takes one" in data_help


def test_existing_run_and_changed_resume_are_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert run(out, "--meta-steps", "2", "--checkpoint-every", "1", "--stop-after", "1") == 0
    assert run(out, "--meta-steps", "2") == 2
    assert "already holds a run (checkpoint.pt, log.jsonl); pass --resume" in capsys.readouterr().err
    assert run(out, "--meta-steps", "2", "--resume", "--meta-lr", "0.5") == 2
    err = capsys.readouterr().err  # the option's own name
    assert err.count("\n") == 1 and "differs from the checkpoint's (--meta-lr: 0.01 -> 0.5)" in err, err
    # another algorithm's run differs in a dozen settings (each of the two configurations lacks
    # some of the other's): the one to name is --algo
    fewshot = ["--algo", "maml", "--task", "sinusoid", "--meta-batch", "2", "--meta-steps", "2", "--quiet"]
    assert main(["meta-train", *fewshot, "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err == (f"learnedopt meta-train: error: --resume: {out / 'checkpoint.pt'} is a checkpoint "
                                       "of --algo lstm, not --algo maml: resume it with its own --algo, or choose "
                                       "another --out\n")  # fmt: skip
    assert run(out, "--meta-steps", "3", "--resume") == 0  # more steps is allowed
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3]


def test_an_empty_rule_config_is_the_default_architecture_on_resume_and_in_the_files(tmp_path: Path) -> None:
    """``--rule-config '{}'`` sets no field, so it is the class's default architecture, as no
    ``--rule-config``: a resume that gave one and not the other was refused as a changed
    configuration (``--rule-config: None -> {}``), also for a checkpoint written before the two
    were made equal, which recorded ``{}``."""
    from learnedopt.meta.train import MetaTrainConfig

    assert MetaTrainConfig(rule_config={}) == MetaTrainConfig()
    MetaTrainConfig(rule=None, preset="l2l-2016", rule_config={}).validate()  # sets nothing a preset has
    args = ("--meta-steps", "3", "--checkpoint-every", "1")
    plain, given = tmp_path / "plain", tmp_path / "given"
    assert run(plain, *args, "--stop-after", "1") == 0
    assert run(plain, *args, "--stop-after", "2", "--resume", "--rule-config", "{}") == 0
    assert run(given, *args, "--rule-config", "{}", "--stop-after", "1") == 0
    path = given / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["config"]["rule_config"] is None
    payload["config"]["rule_config"] = {}  # as a run given '{}' recorded it before
    torch.save(payload, path)
    assert run(given, *args, "--stop-after", "2", "--resume") == 0
    assert run(given, *args, "--resume", "--rule-config", "{}") == 0
    assert run(plain, *args, "--resume") == 0
    assert tensors(plain / "weights.safetensors").keys() == tensors(given / "weights.safetensors").keys()
    assert all(torch.equal(tensors(plain / "weights.safetensors")[k], v) for k, v in tensors(given / "weights.safetensors").items())
    assert "--rule-config" not in read_header(given / "weights.safetensors")["command"]


def test_linear_loss_weighting_changes_the_training_and_is_recorded(tmp_path: Path) -> None:
    uniform, linear = tmp_path / "uniform", tmp_path / "linear"
    assert run(uniform, "--meta-steps", "2") == 0
    assert run(linear, "--meta-steps", "2", "--loss-weighting", "linear") == 0
    a, b = tensors(uniform / "weights.safetensors"), tensors(linear / "weights.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    header = read_header(linear / "weights.safetensors")
    assert header["meta_train_config"]["loss_weighting"] == "linear"
    assert "--loss-weighting linear" in header["command"]
    assert "--loss-weighting" not in read_header(uniform / "weights.safetensors")["command"]
    assert "linearly weighted mean" in (linear / "MODEL_CARD.md").read_text()
    assert run(tmp_path / "quadratic", "--meta-steps", "1", "--loss-weighting", "quadratic") == 0
    card = (tmp_path / "quadratic" / "MODEL_CARD.md").read_text()
    assert "quadratically weighted mean" in card and "own horizon" not in card
    # with random horizons the weights follow each episode's own horizon, and the card says so
    assert run(tmp_path / "drawn", "--meta-steps", "1", "--loss-weighting", "quadratic", "--random-horizon") == 0
    card = (tmp_path / "drawn" / "MODEL_CARD.md").read_text()
    assert "quadratically weighted mean of the optimizee losses after each update, relative to the episode's own horizon" in card


def test_a_checkpoint_from_before_a_config_field_existed_resumes_at_its_default(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    assert run(out, "--meta-steps", "2", "--checkpoint-every", "1", "--stop-after", "1") == 0
    path = out / "checkpoint.pt"
    payload = torch.load(path, weights_only=False)
    del payload["config"]["random_horizon"]  # as written before --random-horizon was added
    torch.save(payload, path)

    assert run(out, "--meta-steps", "2", "--resume", "--random-horizon") == 2
    assert "(--random-horizon: False -> True)" in capsys.readouterr().err
    assert run(out, "--meta-steps", "2", "--resume") == 0
    assert [r["step"] for r in log_lines(out)] == [1, 2]


def test_selection_keeps_the_best_scored_weights_and_resumes_exactly(tmp_path: Path) -> None:
    from learnedopt.meta.train import _SELECT_STREAM, MetaTrainConfig, _family, evaluate, initial_rule

    args = ("--meta-steps", "6", "--checkpoint-every", "2", "--seed", "3", "--meta-lr", "1.0")
    selecting, plain = tmp_path / "selecting", tmp_path / "plain"
    assert run(selecting, *args, "--select-every", "2") == 0
    assert run(plain, *args) == 0
    log = log_lines(selecting)
    scored = {r["step"]: r["select_loss"] for r in log if "select_loss" in r}
    assert list(scored) == [2, 4, 6]
    # the selection does not change the training: the same meta-losses and last weights
    strip = lambda d: [{k: v for k, v in r.items() if k not in (*MACHINE_FIELDS, "select_loss", "select_loss_initial")} for r in log_lines(d)]  # noqa: E731
    assert strip(selecting) == strip(plain)
    last = torch.load(selecting / "checkpoint.pt", weights_only=True)["rule"]
    assert all(torch.equal(last[k], v) for k, v in torch.load(plain / "checkpoint.pt", weights_only=True)["rule"].items())

    header = read_header(selecting / "weights.safetensors")
    config = MetaTrainConfig(**header["meta_train_config"])
    family = _family(config, "meta_valid")
    score = lambda r: evaluate(r, family, config, stream=_SELECT_STREAM, weighted=True)  # noqa: E731
    candidates = {0: score(initial_rule(config)), **scored}
    assert [r["select_loss_initial"] for r in log if "select_loss_initial" in r] == [candidates[0]]  # logged once
    best = min(candidates, key=lambda s: (candidates[s], s))
    assert best == 4, candidates  # at this setting the last meta-step is worse: a real selection
    assert header["selected_step"] == best and header["select_loss"] == candidates[best]
    assert header["select_loss_initial"] == candidates[0]
    selected, _ = load_weights(selecting / "weights.safetensors")
    assert score(selected) == candidates[best]  # the kept weights are the ones that scored so
    assert "--select-every 2" in header["command"] and "--select-every" not in read_header(plain / "weights.safetensors")["command"]
    card = (selecting / "MODEL_CARD.md").read_text()
    assert f"where they scored {candidates[best]:.6g}, the initial ones {candidates[0]:.6g} (`--select-every 2`)" in card

    # killed after meta-step 5 (the checkpoint at 4 holds the best): the same result
    broken = tmp_path / "broken"
    assert run(broken, *args, "--select-every", "2", "--stop-after", "5") == 0
    assert run(broken, *args, "--select-every", "2", "--resume") == 0
    a, b = tensors(selecting / "weights.safetensors"), tensors(broken / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_header(broken / "weights.safetensors")["selected_step"] == best
    assert [r.get("select_loss") for r in log_lines(broken)] == [r.get("select_loss") for r in log]


def test_select_tasks_sizes_the_selection_episode(tmp_path: Path) -> None:
    from learnedopt.meta.train import _SELECT_STREAM, MetaTrainConfig, _family, evaluate

    out = tmp_path / "run"
    assert run(out, "--meta-steps", "2", "--select-every", "1", "--select-tasks", "6") == 0
    header = read_header(out / "weights.safetensors")
    config = MetaTrainConfig(**header["meta_train_config"])
    assert config.select_tasks == 6 and "--select-every 1 --select-tasks 6" in header["command"]
    selected, _ = load_weights(out / "weights.safetensors")
    family = _family(config, "meta_valid")
    score = lambda tasks: evaluate(selected, family, config, stream=_SELECT_STREAM, weighted=True, tasks=tasks)  # noqa: E731
    assert score(6) == header["select_loss"] != score(4)  # 6 tasks scored, not the meta-batch's 4
    assert "a fixed selection episode of 6 held-out tasks" in (out / "MODEL_CARD.md").read_text()


def test_select_tasks_must_split_over_the_ranks() -> None:
    from learnedopt.meta.distributed import Workers
    from learnedopt.meta.loop import ConfigError
    from learnedopt.meta.train import MetaTrainConfig, _RuleTrainer

    config = MetaTrainConfig(meta_batch=4, unroll=2, horizon=2, select_every=1, select_tasks=3)
    with pytest.raises(ConfigError, match="--select-tasks 3 does not split evenly over 2 processes; use a multiple of 2"):
        _RuleTrainer(config, Workers(rank=0, world_size=2))


def test_selection_prefers_the_earliest_of_equal_scores_and_never_a_non_finite_one() -> None:
    from learnedopt.meta.loop import Selection

    scores = {"start": float("nan"), "w1": float("inf"), "w2": 1.0, "w3": 1.0, "w4": 0.5, "w5": 3.0}
    selection = Selection(2, scores.__getitem__, lambda name: {"name": name})
    assert selection.after_step(1, 5, "w1", lambda: "start") == {}  # not due
    assert selection.best is None
    # scores the start first, and logs its score too
    assert selection.after_step(2, 5, "w2", lambda: "start") == {"select_loss_initial": float("inf"), "select_loss": 1.0}
    assert selection.best == {"step": 2, "score": 1.0, "weights": {"name": "w2"}}
    assert selection.initial_score == float("inf")  # NaN counts as inf
    assert selection.after_step(4, 5, "w3", lambda: "start") == {"select_loss": 1.0}  # a tie keeps the earlier
    assert selection.best["step"] == 2
    assert selection.after_step(5, 5, "w5", lambda: "start") == {"select_loss": 3.0}  # the last step is scored
    assert selection.best["step"] == 2
    # non-finite scores count as inf: with nothing finite, the start is kept
    alone = Selection(1, scores.__getitem__, lambda name: {"name": name})
    alone.after_step(1, 1, "w1", lambda: "start")
    assert alone.best["step"] == 0 and alone.best["score"] == float("inf")
    alone.after_step(2, 3, "w4", lambda: "start")
    assert alone.best["step"] == 2
    assert Selection(0, scores.__getitem__, dict).after_step(2, 2, "w2", lambda: "start") == {}


def test_a_non_finite_meta_gradient_stops_before_the_meta_step() -> None:
    from learnedopt.meta.loop import clip_meta_gradient_

    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    assert clip_meta_gradient_([w], 1.0) == 5.0
    torch.testing.assert_close(w.grad, torch.tensor([0.6, 0.8, 0.0]))
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(FloatingPointError, match="meta-gradient norm is nan"):
        clip_meta_gradient_([w], None)
    w.grad = torch.tensor([1.0, float("inf"), 0.0])  # clipped, it would be [0, nan, 0]
    with pytest.raises(FloatingPointError, match="meta-gradient norm is inf"):
        clip_meta_gradient_([w], 1.0)


def test_a_single_process_stops_on_a_non_finite_value() -> None:
    from learnedopt.meta.distributed import SINGLE

    SINGLE.require_finite("the meta-loss", torch.tensor([1.0, -2.0]))
    SINGLE.require_finite("the meta-loss", 3.5)
    with pytest.raises(FloatingPointError, match="^the meta-loss is nan$"):
        SINGLE.require_finite("the meta-loss", float("nan"))
    with pytest.raises(FloatingPointError, match="^the support loss is inf$"):
        SINGLE.require_finite("the support loss", torch.tensor(float("inf")))


def test_a_mixture_trains_resumes_exactly_and_describes_its_members(tmp_path: Path) -> None:
    data = write_fake_mnist(tmp_path / "mnist", n=60)
    args = ["--task", "mlp-random+quadratic", "--data", str(data), "--meta-steps", "6"]
    args += ["--meta-batch", "2", "--checkpoint-every", "2"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run(whole, *args) == 0
    assert run(broken, *args, "--stop-after", "3") == 0
    assert run(broken, *args, "--resume") == 0
    untimed = [
        [{k: v for k, v in r.items() if k not in MACHINE_FIELDS} for r in log_lines(d)]
        for d in (whole, broken)
    ]
    assert untimed[0] == untimed[1]
    a, b = tensors(whole / "weights.safetensors"), tensors(broken / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = (whole / "MODEL_CARD.md").read_text()
    assert "mixture mlp-random+quadratic" in card and "||W theta - y||^2" in card
    assert "the draw's tasks all come from one member" in card
    # both members were drawn: a quadratic's loss is in the tens, a 10-class classifier's near ln 10
    losses = [r["meta_loss"] for r in log_lines(whole)]
    assert min(losses) < 3.0 < max(losses), losses


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path: Path, capsys) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ("--meta-steps", "4", "--checkpoint-every", "3", "--seed", "2")
    assert run(whole, *args) == 0
    assert run(broken, *args, "--stop-after", "2") == 0  # no checkpoint yet, two log lines
    assert not (broken / "checkpoint.pt").exists()
    assert run(broken, *args) == 2
    assert "--resume starts it again" in capsys.readouterr().err
    with open(broken / "log.jsonl", "a") as log:  # and killed while writing a third line
        log.write('{"step": 3, "meta_lo')
    assert run(broken, *args, "--resume") == 0
    a, b = tensors(whole / "weights.safetensors"), tensors(broken / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in log_lines(broken)] == [1, 2, 3, 4]


def test_a_resume_whose_checkpoint_is_gone_after_the_run_wrote_one_is_refused(tmp_path: Path, capsys) -> None:
    """A log that goes on past a checkpointed meta-step, or a finished run's results, prove that
    the run wrote a checkpoint: without it (deleted or moved) ``--resume`` silently started the
    run again from meta-step 0 and replaced its log, or (no log either) said to run the command
    without --resume, which then refused the folder. Both are refused in one line, judged by what
    the run's own log records (the ``checkpoint`` field of the steps it checkpointed), not by
    this command's --checkpoint-every, which a resume may change."""
    out = tmp_path / "run"
    assert run(out, "--meta-steps", "4", "--checkpoint-every", "2", "--stop-after", "3") == 0
    assert [r.get("checkpoint") for r in log_lines(out)] == [None, True, None]
    (out / "checkpoint.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for every in ("2", "1", "10"):
        assert run(out, "--meta-steps", "4", "--checkpoint-every", every, "--resume") == 2
        assert capsys.readouterr().err == (
            f"learnedopt meta-train: error: --resume: {out / 'checkpoint.pt'} is missing, but the run wrote it "
            f"({out / 'log.jsonl'} goes on past its checkpointed meta-step 2): put it back, or start over in "
            "another --out without --resume\n"
        )
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run(out, "--meta-steps", "4") == 2  # nor does the refusal without --resume say it starts again
    assert capsys.readouterr().err.endswith("already holds a run (log.jsonl); pass --resume to continue it or choose another --out\n")
    finished = tmp_path / "finished"
    assert run(finished, "--meta-steps", "2") == 0
    (finished / "checkpoint.pt").unlink()
    for remove in ("", "log.jsonl"):  # with its log (its last step checkpointed), then without
        if remove:
            (finished / remove).unlink()
        assert run(finished, "--meta-steps", "2", "--resume") == 2
        assert capsys.readouterr().err == (
            f"learnedopt meta-train: error: --resume: {finished / 'checkpoint.pt'} is missing, but the run wrote it "
            "(its results are there: weights.safetensors, MODEL_CARD.md): put it back, or start over in "
            "another --out without --resume\n"
        )
    # killed while writing its first checkpoint (its log line comes first): nothing to continue,
    # started again from meta-step 0 and ends as an uninterrupted run
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ("--meta-steps", "4", "--checkpoint-every", "2")
    assert run(whole, *args) == 0
    assert run(broken, *args, "--stop-after", "2") == 0
    (broken / "checkpoint.pt").unlink()
    log = (broken / "log.jsonl").read_text()
    # but a line cut short after the checkpointed step's is the next step's, begun once that
    # checkpoint was written: the log goes on past it
    (broken / "log.jsonl").write_text(log + '{"step": 3, "meta_')
    assert run(broken, *args, "--resume") == 2
    assert "is missing, but the run wrote it" in capsys.readouterr().err
    (broken / "log.jsonl").write_text(log)
    assert run(broken, *args, "--resume") == 0
    a, b = tensors(whole / "weights.safetensors"), tensors(broken / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    untimed = [[{k: v for k, v in r.items() if k not in MACHINE_FIELDS} for r in log_lines(d)] for d in (whole, broken)]
    assert untimed[0] == untimed[1] and [r.get("checkpoint") for r in untimed[0]] == [None, True, None, True]


def test_a_checkpoint_that_is_a_dangling_symlink_is_refused_not_started_again(tmp_path: Path, capsys) -> None:
    """A ``checkpoint.pt`` that is a symlink to a file that is gone (a checkpoint kept on another
    disk, unmounted) looked like no checkpoint at all: beside a log whose last record is the
    checkpointed one, ``--resume`` started the run again from meta-step 0 and replaced the
    symlink, the log and the work silently, and the refusal without ``--resume`` said that
    ``--resume`` would start it again. Both name the symlink and its target in one line."""
    out = tmp_path / "run"
    args = ("--meta-steps", "4", "--checkpoint-every", "2")
    assert run(out, *args, "--stop-after", "2") == 0
    target = tmp_path / "elsewhere" / "checkpoint.pt"
    (out / "checkpoint.pt").unlink()
    (out / "checkpoint.pt").symlink_to(target)
    before = {p.name: (p.is_symlink(), p.read_bytes() if not p.is_symlink() else None) for p in out.iterdir()}
    message = (f"{out / 'checkpoint.pt'} is a symlink to {target}, which does not exist: put the checkpoint "
               "back there and --resume, or start over in another --out\n")  # fmt: skip
    assert run(out, *args, "--resume") == 2
    assert capsys.readouterr().err == f"learnedopt meta-train: error: --resume: {message}"
    assert run(out, *args) == 2
    assert capsys.readouterr().err == f"learnedopt meta-train: error: {message}"
    assert {p.name: (p.is_symlink(), p.read_bytes() if not p.is_symlink() else None) for p in out.iterdir()} == before
    assert (out / "checkpoint.pt").is_symlink() and not target.exists()
    # with the checkpoint back where the symlink points, the run continues from meta-step 2
    whole = tmp_path / "whole"
    assert run(whole, *args) == 0
    target.parent.mkdir()
    assert run(tmp_path / "source", *args, "--stop-after", "2") == 0
    shutil.copyfile(tmp_path / "source" / "checkpoint.pt", target)
    assert run(out, *args, "--resume") == 0
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3, 4]
    a, b = tensors(whole / "weights.safetensors"), tensors(out / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_whose_log_is_a_dangling_symlink_is_refused_not_continued_without_it(tmp_path: Path, capsys) -> None:
    """A ``log.jsonl`` that is a symlink to a file that is gone (kept on a disk not mounted) was
    read as no log: ``--resume`` warned that records were missing, replaced the symlink with a
    new log of the meta-steps after the checkpoint alone, and the records up to it were no longer
    the run's. It is refused in one line naming the symlink and its target; with the log back
    there the run resumes as an uninterrupted one."""
    out = tmp_path / "run"
    args = ("--meta-steps", "4", "--checkpoint-every", "2")
    assert run(out, *args, "--stop-after", "3") == 0
    target = tmp_path / "elsewhere" / "log.jsonl"
    kept = (out / "log.jsonl").read_bytes()
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").symlink_to(target)
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.is_symlink()}
    assert run(out, *args, "--resume") == 2
    assert capsys.readouterr().err == (
        f"learnedopt meta-train: error: --resume: {out / 'log.jsonl'} is a symlink to {target}, which does not exist: "
        "put the log back there and --resume, or start over in another --out\n"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.is_symlink()} == before
    assert (out / "log.jsonl").is_symlink()
    target.parent.mkdir()
    target.write_bytes(kept)
    assert run(out, *args, "--resume") == 0
    assert capsys.readouterr().err == ""
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3, 4]
    assert run(tmp_path / "whole", *args) == 0
    a, b = tensors(tmp_path / "whole" / "weights.safetensors"), tensors(out / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_copied_from_another_runs_folder_is_refused(tmp_path: Path, capsys) -> None:
    """A checkpoint of another run (another --seed) put in a run's folder resumed when the
    command was that other run's: the folder's log then held the first run's meta-steps up to
    the checkpoint and the other run's after it, and its config.json the first run's settings,
    with no word. The configuration the folder's run began with (config.json) is compared too,
    naming the settings; a resume that changes only what a resume may change still continues."""
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    args = ("--meta-steps", "4", "--checkpoint-every", "2")
    assert run(mine, *args, "--seed", "1", "--stop-after", "3") == 0
    assert run(theirs, *args, "--seed", "0", "--stop-after", "3") == 0
    own = (mine / "checkpoint.pt").read_bytes()
    shutil.copyfile(theirs / "checkpoint.pt", mine / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    assert run(mine, *args, "--seed", "1", "--resume") == 2  # the checkpoint's own check
    assert "differs from the checkpoint's (--seed: 0 -> 1)" in capsys.readouterr().err
    assert run(mine, *args, "--seed", "0", "--resume") == 2
    assert capsys.readouterr().err == (
        f"learnedopt meta-train: error: --resume: the configuration differs from the one the run in {mine} began "
        f"with (--seed: 1 -> 0); {mine / 'checkpoint.pt'} is another run's: put this run's back, or continue that "
        "run in its own --out\n"
    )
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    # its own checkpoint back: it continues, and may run longer (the checkpoint then records 6)
    (mine / "checkpoint.pt").write_bytes(own)
    assert run(mine, "--meta-steps", "6", "--checkpoint-every", "2", "--seed", "1", "--stop-after", "4", "--resume") == 0
    assert run(mine, "--meta-steps", "6", "--checkpoint-every", "2", "--seed", "1", "--resume") == 0
    assert [r["step"] for r in log_lines(mine)] == [1, 2, 3, 4, 5, 6]


def test_a_folder_another_run_is_writing_to_is_refused(tmp_path: Path, capsys) -> None:
    """A second run in the folder of one still running (a ``--resume`` of a run thought dead) is
    refused before it writes: unlocked, it rewrote the log under the first run, whose later lines
    were lost, and the two wrote the same temporary checkpoint (one crashed with a traceback)."""
    pytest.importorskip("fcntl")  # POSIX
    out = tmp_path / "run"
    args = ("--meta-steps", "3", "--checkpoint-every", "1")
    assert run(out, *args, "--stop-after", "2") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with folder_locked_by_another_run(out):
        assert run(out, *args, "--resume") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "in use by another meta-train process" in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run(out, *args, "--resume") == 0
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3]
    assert run(out, *args, "--resume") == 0  # the finished run released it
    # one not checkpointed yet: the refusal alone, not first a notice that it starts again
    fresh = tmp_path / "fresh"
    assert run(fresh, "--meta-steps", "3", "--checkpoint-every", "3", "--stop-after", "1") == 0
    capsys.readouterr()
    with folder_locked_by_another_run(fresh):
        assert run(fresh, "--meta-steps", "3", "--resume") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "in use by another meta-train process" in err, err


def test_a_log_line_cut_by_a_kill_is_dropped_on_resume(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ("--meta-steps", "4", "--checkpoint-every", "2")
    assert run(out, *args, "--stop-after", "3") == 0
    with open(out / "log.jsonl", "a") as log:
        log.write('{"step": 4, "meta_')
    assert run(out, *args, "--resume") == 0
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3, 4]
    assert capsys.readouterr().err == ""  # nothing up to the checkpoint was missing


def test_a_log_with_bytes_that_are_not_utf8_is_recovered_or_one_line(tmp_path: Path, capsys) -> None:
    """A log whose last line was left as garbage bytes (an OS crash or power loss during its
    write, a disk's damage) was a UnicodeDecodeError traceback: a last line that is not a record
    is one cut short, dropped as any other; such a line before the last is a damaged log,
    refused in one line naming the file and the line."""
    out = tmp_path / "run"
    args = ("--meta-steps", "4", "--checkpoint-every", "2")
    assert run(tmp_path / "whole", *args) == 0
    assert run(out, *args, "--stop-after", "3") == 0
    lines = (out / "log.jsonl").read_bytes().splitlines(keepends=True)
    (out / "log.jsonl").write_bytes(b"".join([*lines[:2], b'{"step": 3, "meta_loss": \xff\xfe\x00\n', lines[2]]))
    assert run(out, *args, "--resume") == 2
    assert capsys.readouterr().err == (f"learnedopt meta-train: error: {out / 'log.jsonl'}: line 3 is not a log record "
                                       "(the log is damaged)\n")  # fmt: skip
    (out / "log.jsonl").write_bytes(b"".join([*lines, b'{"step": 4, "meta_loss": \xff\xfe\x00']))
    assert run(out, *args, "--resume") == 0
    assert capsys.readouterr().err == ""
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3, 4]
    a, b = tensors(tmp_path / "whole" / "weights.safetensors"), tensors(out / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_warns_when_the_log_lacks_records_up_to_the_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ("--meta-steps", "3", "--checkpoint-every", "2")
    assert run(out, *args, "--stop-after", "2") == 0
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text(lines[1] + "\n")  # step 1's record lost
    assert run(out, *args, "--resume") == 0
    assert capsys.readouterr().err == (
        f"warning: {out / 'log.jsonl'} lacks records of meta-steps up to the checkpoint's (2); "
        "the resumed run appends to what is there\n"
    )
    assert [r["step"] for r in log_lines(out)] == [2, 3]


def test_a_resume_that_only_writes_the_results_needs_the_last_steps_record(tmp_path: Path, capsys) -> None:
    """The results report the last meta-step's meta-loss, read from the log when the resume runs
    no step: a log without it gave step 2's loss as the final one of 3, and no log an IndexError."""
    out, args = tmp_path / "run", ("--meta-steps", "3", "--checkpoint-every", "3")
    assert run(out, *args) == 0
    before, lines = (out / "weights.safetensors").read_bytes(), (out / "log.jsonl").read_text().splitlines()
    for kept in (lines[:2], []):
        (out / "log.jsonl").write_text("".join(line + "\n" for line in kept))
        assert run(out, *args, "--resume") == 2
        err = capsys.readouterr().err.splitlines()
        assert err[-1] == (f"learnedopt meta-train: error: --resume: {out / 'log.jsonl'} lacks the record of meta-step "
                           "3, the last, whose meta-loss the results report: restore the log, or run the command "
                           "again without --resume in another --out")  # fmt: skip
        assert (out / "weights.safetensors").read_bytes() == before
    (out / "log.jsonl").write_text("".join(line + "\n" for line in lines))
    assert run(out, *args, "--resume") == 0 and (out / "weights.safetensors").read_bytes() == before


def test_folders_that_hold_results_or_are_files_are_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert run(out, "--meta-steps", "1") == 0
    for name in ("checkpoint.pt", "log.jsonl"):  # a finished run's weights and card remain
        (out / name).unlink()
    before = (out / "weights.safetensors").read_bytes()
    assert run(out, "--meta-steps", "1", "--seed", "1") == 2
    assert "already holds a run (weights.safetensors, MODEL_CARD.md)" in capsys.readouterr().err
    assert (out / "weights.safetensors").read_bytes() == before
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert run(a_file, "--meta-steps", "1") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert run(a_file / "below", "--meta-steps", "1") == 2
    assert "cannot create the folder" in capsys.readouterr().err


def test_malformed_checkpoints_and_a_damaged_log_are_one_line_errors(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ("--meta-steps", "3", "--checkpoint-every", "1")
    assert run(out, *args, "--stop-after", "2") == 0
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text("not json\n" + "\n".join(lines) + "\n")
    assert run(out, *args, "--resume") == 2
    assert "line 1 is not a log record" in capsys.readouterr().err
    for edited in ('{"not": "a step"}', '[1, 2]', '{"step": "2"}', '{"step": true}'):  # valid JSON, no meta-step's record
        (out / "log.jsonl").write_text("\n".join([lines[0], edited, *lines[1:]]) + "\n")
        assert run(out, *args, "--resume") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and 'line 2 is not a log record (no integer "step"' in err, err
    (out / "log.jsonl").write_text("\n".join(lines) + "\n")
    # a rule tensor of another shape (a class whose default architecture changed since the run
    # began): torch's message for it is several lines
    reshaped = {**good, "rule": {**good["rule"], "lstm.weight_ih_l0": torch.zeros(3, 3)}}
    for payload, message in (([1, 2], "not a learnedopt meta-train checkpoint"),
                             ({**good, "format": 2}, "has checkpoint format 2, expected 1"),
                             ({k: v for k, v in good.items() if k != "meta_optimizer"}, "does not hold this run's state"),
                             (reshaped, "does not hold this run's state (RuntimeError: Error(s) in loading state_dict for "
                                        "CoordinateLSTM: size mismatch for lstm.weight_ih_l0")):  # fmt: skip
        torch.save(payload, out / "checkpoint.pt")
        assert run(out, *args, "--resume") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    torch.save(good, out / "checkpoint.pt")
    assert run(out, *args, "--resume") == 0


def test_a_checkpoint_whose_step_no_run_writes_is_refused_naming_it(tmp_path: Path, capsys) -> None:
    """A hand-edited checkpoint's step of 0, negative, not an int (True passed as 1) or beyond
    --meta-steps resumed from there with the checkpoint's weights: wrong final weights. Each is
    refused in one line naming the checkpoint, and nothing in the run changes."""
    out = tmp_path / "run"
    args = ("--meta-steps", "3", "--checkpoint-every", "1")
    assert run(out, *args, "--stop-after", "2") == 0
    path = out / "checkpoint.pt"
    good = torch.load(path, weights_only=True)
    log = (out / "log.jsonl").read_bytes()
    for step, message in ((0, "records meta-step 0"), (-1, "records meta-step -1"), (True, "records meta-step True"),
                          (2.0, "records meta-step 2.0"), ("2", "records meta-step '2'"),
                          (4, "is at meta-step 4, beyond --meta-steps 3")):  # fmt: skip
        torch.save({**good, "step": step}, path)
        assert run(out, *args, "--resume") == 2, step
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--resume: {path} {message}" in err, err
        assert (out / "log.jsonl").read_bytes() == log and not (out / "weights.safetensors").exists()
    torch.save(good, path)
    assert run(out, *args, "--resume") == 0


def test_a_checkpoint_path_that_is_a_folder_is_named_as_not_a_file(tmp_path: Path, capsys) -> None:
    """--resume where checkpoint.pt is a folder said "no checkpoint at ..., nor a log" beside the
    run's log; it says the checkpoint's path is not a file, and nothing in the run changes."""
    out = tmp_path / "run"
    args = ("--meta-steps", "3", "--checkpoint-every", "1")
    assert run(out, *args, "--stop-after", "2") == 0
    path = out / "checkpoint.pt"
    path.unlink()
    path.mkdir()
    log = (out / "log.jsonl").read_bytes()
    assert run(out, *args, "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume: {path} is not a file (a folder)" in err and "nor a log" not in err, err
    assert (out / "log.jsonl").read_bytes() == log and path.is_dir() and not any(path.iterdir())


def test_a_damaged_or_cut_checkpoint_is_a_one_line_error_not_a_silent_resume(tmp_path: Path, capsys) -> None:
    """torch.load does not check the zip archive's CRC-32s: a checkpoint with a flipped bit in a
    tensor resumed silently from the damaged values, and a cut one gave torch's messages
    (``[Errno 22] Invalid argument``, or advice to load with ``weights_only=False``)."""
    import zipfile

    out = tmp_path / "run"
    args = ("--meta-steps", "3", "--checkpoint-every", "1")
    assert run(out, *args, "--stop-after", "2") == 0
    good = (out / "checkpoint.pt").read_bytes()
    with zipfile.ZipFile(out / "checkpoint.pt") as archive:
        member = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    # the stored tensor's first byte: after the local header (30 bytes, name, extra field)
    extra = int.from_bytes(good[member.header_offset + 28 : member.header_offset + 30], "little")
    at = member.header_offset + 30 + len(member.filename.encode()) + extra
    damaged = bytearray(good)
    damaged[at] ^= 0x10
    for data, message in ((bytes(damaged), "data/0 fails its CRC-32 check"),
                          (good[: len(good) // 2], "not a complete checkpoint"),
                          (b"", "not a complete checkpoint")):  # fmt: skip
        (out / "checkpoint.pt").write_bytes(data)
        assert run(out, *args, "--resume") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not (out / "weights.safetensors").exists()
    (out / "checkpoint.pt").write_bytes(good)
    assert run(out, *args, "--resume") == 0


def unreadable(monkeypatch, path: Path) -> None:  # noqa: ANN001 - pytest's fixture
    """Make opening ``path`` fail as a file of another user's without read access does: as root
    (these tests' usual user) ``chmod`` keeps nothing from being read, so ``io.open``, which
    ``zipfile``, ``Path.read_bytes`` and ``open`` call, refuses it."""
    import errno
    import io

    real = io.open

    def refusing(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - io.open's signature
        if isinstance(file, (str, Path)) and Path(file).absolute() == path.absolute():
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", refusing)


def test_a_checkpoint_this_user_cannot_read_is_not_called_damaged(tmp_path: Path, monkeypatch, capsys) -> None:
    """A checkpoint without read access (written under another user's account) was refused as
    "not a complete checkpoint (cut short or damaged: [Errno 13] Permission denied ...)", which
    invites deleting a whole checkpoint. The refusal says it cannot be read and why."""
    out = tmp_path / "run"
    args = ("--meta-steps", "3", "--checkpoint-every", "1")
    assert run(out, *args, "--stop-after", "2") == 0
    with monkeypatch.context() as m:
        unreadable(m, out / "checkpoint.pt")
        assert run(out, *args, "--resume") == 2
    assert capsys.readouterr().err == (
        f"learnedopt meta-train: error: --resume: cannot read {out / 'checkpoint.pt'} (Permission denied): give "
        "this user read access to it, then --resume\n"
    )
    assert run(out, *args, "--resume") == 0


def test_a_log_this_user_cannot_read_is_one_line_not_a_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    """A log without read access stopped ``--resume`` with the PermissionError's traceback
    (reading it to drop the meta-steps after the checkpoint, or, with no checkpoint, to see
    whether the run wrote one). It is one line naming it, the folder untouched."""
    args = ("--meta-steps", "4", "--checkpoint-every", "2")
    checkpointed, early = tmp_path / "checkpointed", tmp_path / "early"
    assert run(checkpointed, *args, "--stop-after", "3") == 0
    assert run(early, *args, "--stop-after", "1") == 0
    for out in (checkpointed, early):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with monkeypatch.context() as m:
            unreadable(m, out / "log.jsonl")
            assert run(out, *args, "--resume") == 2
        assert capsys.readouterr().err == (
            f"learnedopt meta-train: error: --resume: cannot read {out / 'log.jsonl'} (Permission denied): give "
            "this user read access to it, then --resume\n"
        ), out
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert run(out, *args, "--resume") == 0
        assert [r["step"] for r in log_lines(out)] == [1, 2, 3, 4]


def test_divergence_at_the_first_meta_step_blames_the_optimizee_settings(tmp_path: Path, capsys) -> None:
    assert run(tmp_path / "run", "--meta-steps", "2", "--lr", "1e30") == 2
    err = capsys.readouterr().err
    assert "meta-step 1:" in err and "the meta-parameters are still the initial ones" in err and "--lr" in err


def test_divergence_after_a_meta_update_of_the_first_meta_step_does_not_say_none_was_taken(
    tmp_path: Path, capsys, own_tasks: str
) -> None:
    # the loss is NaN from step 3: the second truncation of meta-step 1, after the first's
    # meta-update, which the message said had not happened (and so blamed the optimizee alone)
    args = ("--task", f"{own_tasks}:LaterNaNFamily", "--meta-steps", "2", "--unroll", "2", "--horizon", "4")
    assert run(tmp_path / "run", *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "meta-step 1: the meta-loss is nan (after 1 meta-update of this meta-step)" in err, err
    assert "still the initial ones" not in err and "--meta-lr" in err


def test_resuming_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run(out, "--meta-steps", "2") == 0
    before = tensors(out / "weights.safetensors")
    assert run(out, "--meta-steps", "2", "--resume") == 0
    after = tensors(out / "weights.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [r["step"] for r in log_lines(out)] == [1, 2]


def test_a_run_killed_at_any_file_write_resumes_to_the_uninterrupted_runs_files(tmp_path: Path, capsys) -> None:
    """A kill during or after each write of a run (the configuration it began with, the
    checkpoints, with the best weights of --select-every; the final weights and card) and, for the start-up, a kill that left only
    the folder: the run ends with the files of one never killed, and no temporary file."""
    out, args = tmp_path / "run", ("--meta-steps", "3", "--checkpoint-every", "2", "--select-every", "2")
    # 5 writes: the configuration it began with, checkpoints at meta-steps 2 and 3, the weights, the card
    whole = assert_killed_at_any_write_resumes(out, run, args, writes=5)
    assert run(out, *args, "--resume") == 0  # a finished run: its results written again, the same
    assert run_files(out) == whole
    shutil.rmtree(out)
    out.mkdir()  # killed once the folder existed, before the log: nothing to resume, run it again
    capsys.readouterr()
    assert run(out, *args, "--resume") == 2
    assert capsys.readouterr().err == (f"learnedopt meta-train: error: --resume: no checkpoint at {out / 'checkpoint.pt'}, "
                                       "nor a log: nothing to continue; run the command without --resume\n")  # fmt: skip
    assert run(out, *args) == 0 and run_files(out) == whole


def test_unroll_equal_to_horizon_is_one_truncation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run(out, "--meta-steps", "1", "--unroll", "10", "--horizon", "10") == 0  # T <= H, here T = H
    assert [r["meta_updates"] for r in log_lines(out)] == [1]


def test_random_horizons_reach_both_ends_of_the_range(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run(out, "--random-horizon", "--unroll", "2", "--horizon", "3", "--meta-steps", "12") == 0
    assert {r["horizon"] for r in log_lines(out)} == {2, 3}  # [T, H], H included


def test_select_every_fixes_meta_steps_on_resume(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ("--select-every", "2", "--checkpoint-every", "2")
    assert run(out, "--meta-steps", "4", *args, "--stop-after", "2") == 0
    assert run(out, "--meta-steps", "6", *args, "--resume") == 2
    assert "--meta-steps: 4 -> 6" in capsys.readouterr().err


def test_evaluation_episode_weighting_and_fixed_horizon() -> None:
    """``evaluate`` runs the whole horizon H even under ``random_horizon`` (the card's numbers
    compare like with like), and ``weighted`` weights each step's loss as the meta-loss does."""
    import dataclasses

    from learnedopt.meta import horizon_loss_weights
    from learnedopt.meta.tasks import generator_for
    from learnedopt.meta.train import _EVAL_STREAM, MetaTrainConfig, _family, episode, evaluate, initial_rule

    config = MetaTrainConfig(unroll=2, horizon=6, meta_batch=2, loss_weighting="linear")
    family, rule = _family(config, "meta_train"), initial_rule(config)
    drawn = dataclasses.replace(config, random_horizon=True)
    assert evaluate(rule, family, drawn) == evaluate(rule, family, config)
    for seed in range(6):  # without a meta-optimizer (evaluation) no horizon is drawn
        assert episode(rule, family, drawn, generator_for(seed, _EVAL_STREAM))[0].shape[0] == 6
    losses = episode(rule.requires_grad_(False), family, config, generator_for(config.seed, _EVAL_STREAM))[0]
    assert losses.shape[0] == 6
    weighted = (horizon_loss_weights("linear", 6)[:, None] * losses).mean().item()
    assert evaluate(rule, family, config, weighted=True) == pytest.approx(weighted, rel=1e-6)
    assert weighted != pytest.approx(losses.mean().item(), rel=1e-3)


@pytest.mark.parametrize("second_order", [False, True])
def test_an_episode_takes_one_clipped_step_per_truncation_on_that_truncations_meta_gradient(second_order: bool) -> None:
    """``episode`` with a meta-optimizer is truncated backpropagation through the unroll: after
    each truncation one step on the meta-gradient of that truncation's meta-loss alone (weighted
    by ``--loss-weighting``, first- or second-order by ``--second-order``, with the optimizee's
    ``--lr``), clipped to norm ``--clip``. Checked against the procedure written out, with plain
    SGD as the meta-optimizer so that every part of the step shows in the new weights, and a rule
    with random weights, whose step depends on the gradient's size (the initial rule's hides the
    second-order terms)."""
    import copy

    from learnedopt.meta.tasks import generator_for
    from learnedopt.meta.train import _TRAIN_STREAM, MetaTrainConfig, _family, episode
    from learnedopt.meta.unroll import horizon_loss_weights, num_coordinates, truncated_unroll

    config = MetaTrainConfig(unroll=2, horizon=5, meta_batch=2, clip=0.05, lr=0.5,
                             loss_weighting="linear", second_order=second_order)  # fmt: skip
    family = _family(config, "meta_train")
    rule = random_rule("lstm", seed=1).float()
    reference = copy.deepcopy(rule)
    weights = list(reference.parameters())
    _, norms = episode(rule, family, config, generator_for(0, _TRAIN_STREAM, 1), torch.optim.SGD(rule.parameters(), lr=1.0))

    generator = generator_for(0, _TRAIN_STREAM, 1)
    tasks = family.sample_batch(config.meta_batch, generator)
    params = tasks.init_params(generator)
    expected_norms = []

    def update(meta_loss: torch.Tensor) -> None:
        grads = torch.autograd.grad(meta_loss, weights)
        norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))
        expected_norms.append(norm)
        with torch.no_grad():
            for w, g in zip(weights, grads, strict=True):
                w -= g * min(1.0, config.clip / norm)

    truncated_unroll(reference, tasks, params, reference.init_state(num_coordinates(params), dtype=torch.float32, device="cpu"), horizon=5, truncation=2,
                     update=update, lr=0.5, stop_optimizee_grad=not second_order,
                     loss_weights=horizon_loss_weights("linear", 5))  # fmt: skip
    assert len(norms) == 3 and min(expected_norms) > 2 * config.clip  # every step is clipped
    assert norms == pytest.approx(expected_norms, rel=1e-5)
    for got, want in zip(rule.parameters(), weights, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [{"unroll": 3, "horizon": 7, "loss_weighting": "linear", "clip": 0.05},  # every meta-gradient clipped
     {"unroll": 3, "horizon": 7, "loss_weighting": "linear", "clip": 1000.0},  # none
     {"unroll": 2, "horizon": 5, "loss_weighting": "quadratic", "second_order": True, "clip": 0.05},
     {"unroll": 3, "horizon": 9, "random_horizon": True, "clip": 1000.0}],
)  # fmt: skip
def test_a_meta_step_is_the_documented_procedure_written_out_independently(options: dict) -> None:
    """Two meta-steps of ``--algo lstm`` on quadratics against the README's procedure written out
    without the library's unroll: tasks and initial parameters drawn from ``(seed, 1, step)``, the
    horizon (``--random-horizon``) drawn uniformly from [T, H] after them; truncations of T steps
    (the last shorter), states and parameters detached between them; each truncation's meta-loss
    its steps' weighted losses averaged over its own steps and the meta-batch (a shorter last
    truncation's too: each truncation is one Adam step of the same weight),
    backward, the meta-gradient's global norm over all the rule's weights clipped to ``--clip``,
    then one step of ``torch.optim.Adam`` at ``--meta-lr`` and torch's defaults. The log's
    ``meta_loss`` and ``final_loss`` are the unweighted means over the episode and its last step."""
    import copy

    from learnedopt.meta.tasks import generator_for
    from learnedopt.meta.train import MetaTrainConfig, _RuleTrainer

    config = MetaTrainConfig(meta_batch=3, meta_steps=2, meta_lr=0.01, lr=0.5, seed=1, **options)
    trainer = _RuleTrainer(config)
    rule = copy.deepcopy(trainer.rule)
    adam = torch.optim.Adam(rule.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for step in (1, 2):
        record = trainer.step(step)
        generator = generator_for(1, 1, step)
        tasks = [trainer.family.sample(generator) for _ in range(3)]
        theta = torch.stack([task.init_params(generator)["theta"] for task in tasks])
        horizon = int(torch.randint(config.unroll, config.horizon + 1, (), generator=generator)) if config.random_horizon else config.horizon
        W, y = torch.stack([task.weight for task in tasks]), torch.stack([task.target for task in tasks])
        f = lambda th: ((W @ th.unsqueeze(-1)).squeeze(-1) - y).square().sum(1)  # noqa: E731
        t = torch.arange(1, horizon + 1, dtype=torch.float64)
        weights = {"uniform": torch.ones(horizon, dtype=torch.float64), "linear": 2 * t / (horizon + 1),
                   "quadratic": 6 * t**2 / ((horizon + 1) * (2 * horizon + 1))}[config.loss_weighting].float()  # fmt: skip
        state = rule.init_state(theta.numel(), dtype=torch.float32, device="cpu")
        losses, norms = [], []
        for begin in range(0, horizon, config.unroll):
            th = theta.detach().requires_grad_(True)
            state = {k: v.detach() for k, v in state.items()}
            loss, piece = f(th), []
            for _ in range(min(config.unroll, horizon - begin)):
                (grad,) = torch.autograd.grad(loss.sum(), th, retain_graph=True, create_graph=config.second_order)
                update, state = rule(grad.reshape(-1), th.reshape(-1), state)
                th = th + config.lr * update.reshape(th.shape)
                loss = f(th)
                piece.append(loss)
            piece = torch.stack(piece)
            meta_loss = (weights[begin : begin + len(piece), None] * piece).sum() / (len(piece) * 3)
            adam.zero_grad()
            meta_loss.backward()
            norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in rule.parameters()]))
            norms.append(float(norm))
            with torch.no_grad():
                for p in rule.parameters():
                    p.grad *= min(1.0, config.clip / float(norm))
            adam.step()
            losses.append(piece.detach())
            theta = th.detach()
        losses = torch.cat(losses)
        assert record["horizon"] == horizon and record["meta_updates"] == -(-horizon // config.unroll)
        assert record["meta_loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
        assert record["final_loss"] == pytest.approx(float(losses[-1].mean()), rel=1e-5)
        assert record["grad_norm"] == pytest.approx(max(norms), rel=1e-4)
        assert min(norms) > config.clip if config.clip < 1 else max(norms) < config.clip
        for got, want in zip(trainer.rule.parameters(), rule.parameters(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("preset", [False, True])
def test_the_recorded_command_runs_the_same_configuration(preset: bool) -> None:
    """The command a weight file and a model card record (``canonical_command``), parsed as
    ``learnedopt meta-train`` parses it, gives back the run's configuration, every setting away
    from its default included, and its output folder and checkpoint interval."""
    import argparse
    import shlex

    from learnedopt.meta.command import configure_parser
    from learnedopt.meta.train import MetaTrainConfig, canonical_command, config_from_args

    start = {"rule": None, "preset": "l2l-2016"} if preset else {
        "rule": "MetaLSTMCell", "rule_config": {"hidden_size": 4, "momentum_decay": 0.9}}  # fmt: skip
    config = MetaTrainConfig(**start, task="mlp-random+quadratic:2", unroll=3, horizon=7, meta_batch=6, meta_steps=9,
                             meta_lr=0.02, clip=0.3, seed=5, lr=0.7, second_order=True, random_horizon=True,
                             loss_weighting="quadratic", select_every=2, select_tasks=4, data="/some where/data",
                             device="cuda:1")  # fmt: skip
    changed = {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != f.default}
    assert changed == {f.name for f in dataclasses.fields(config)} - ({"rule_config"} if preset else {"preset"})
    words = shlex.split(canonical_command(config, "/runs/my run", 4))
    assert words[:2] == ["learnedopt", "meta-train"]
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(words[2:])
    assert config_from_args(args) == config
    assert (args.out, args.checkpoint_every, args.algo) == ("/runs/my run", 4, "lstm")


def test_a_checkpoint_write_that_fails_leaves_the_last_checkpoint_whole(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint is written beside the old one and renamed over it: a write that fails half-way
    (a full disk, a kill) leaves the last checkpoint as it was, and the run resumes from it."""
    out = tmp_path / "run"
    args = ("--meta-steps", "3", "--checkpoint-every", "1")
    assert run(out, *args, "--stop-after", "1") == 0
    before = (out / "checkpoint.pt").read_bytes()

    def full_disk(self, data) -> None:  # noqa: ANN001 - Path.write_bytes's signature
        with open(self, "wb") as file:
            file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    assert run(out, *args, "--resume") == 1
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob("*.tmp"))
    monkeypatch.undo()
    assert run(out, *args, "--resume") == 0
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3]


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
@pytest.mark.parametrize("fails", ["checkpoint.pt", "log.jsonl", "weights.safetensors"])
def test_a_file_that_cannot_be_written_is_one_line_and_resume_ends_as_a_whole_run(
    tmp_path: Path, capsys, fails: str
) -> None:
    """A full disk (here the OS's file size limit, which fails the write of every writer alike)
    while the run wrote its checkpoint, a log line or its final weights was a traceback: torch's
    "[enforce fail at inline_container.cc:672] . unexpected pos ..." for a checkpoint, and
    safetensors' own error for the weights, neither naming the file. It is one line naming the
    file and the OS's reason, exit code 1; the files written before are kept whole (no temporary
    file left), and ``--resume`` once the disk has room ends as a run never stopped."""
    args = ("--meta-steps", "4", "--checkpoint-every", "2")
    whole, out = tmp_path / "a" / "run", tmp_path / "b" / "run"  # paths of one length, in the headers
    assert run(whole, *args) == 0
    if fails == "weights.safetensors":  # killed after the last checkpoint: --resume writes the results
        assert run(out, *args) == 0
        (out / "weights.safetensors").unlink()
        (out / "MODEL_CARD.md").unlink()
    else:
        assert run(out, *args, "--stop-after", "2") == 0
    checkpoint, log = (out / "checkpoint.pt").read_bytes(), (out / "log.jsonl").stat().st_size
    weights = (whole / "weights.safetensors").stat().st_size
    # the file size that the next log line, the next checkpoint or the weights reaches first
    limit = {"log.jsonl": log + 40, "checkpoint.pt": len(checkpoint) // 2, "weights.safetensors": weights // 2}[fails]
    assert fails == "log.jsonl" or log + 1000 < limit
    capsys.readouterr()
    with file_size_limit(limit):
        assert run(out, *args, "--resume") == 1
    err = capsys.readouterr().err
    assert err == (f"learnedopt meta-train: error: cannot write {out / fails} (File too large); the run's files written "
                   "before it are kept whole: --resume continues the run once it can write\n"), err  # fmt: skip
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    assert not list(out.glob("*.tmp"))
    assert run(out, *args, "--resume") == 0
    assert run_files(out) == {k: v.replace(b"/a/run", b"/b/run") if isinstance(v, bytes) else v
                              for k, v in run_files(whole).items()}, fails  # fmt: skip


def test_a_log_that_cannot_be_created_is_one_line_not_a_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    """A run into a folder where its log cannot be created (an existing folder made read-only,
    a ``log.jsonl`` symlink into a folder that is gone) stopped with the PermissionError's (or
    FileNotFoundError's) traceback from opening the log, the only write of a run not under
    :class:`RunWriteError`'s one line. It is that line, exit code 1, naming the log; the run
    once it can write ends as an uninterrupted one. (The OS's refusal is simulated: as root,
    a read-only folder does not refuse.)"""
    import builtins
    import errno

    from learnedopt.meta import loop

    out = tmp_path / "run"
    out.mkdir()

    def read_only(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - open's signature
        if Path(file) == out / "log.jsonl" and mode != "r":
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return builtins.open(file, mode, *args, **kwargs)

    args = ("--meta-steps", "4", "--checkpoint-every", "2")
    with monkeypatch.context() as m:
        m.setattr(loop, "open", read_only, raising=False)
        assert run(out, *args) == 1
    assert capsys.readouterr().err == (
        f"learnedopt meta-train: error: cannot write {out / 'log.jsonl'} (Permission denied); the run's files written "
        "before it are kept whole: --resume continues the run once it can write\n"
    )
    assert list(out.iterdir()) == []
    (out / "log.jsonl").symlink_to(tmp_path / "gone" / "log.jsonl")
    assert run(out, *args) == 1
    assert capsys.readouterr().err.startswith(f"learnedopt meta-train: error: cannot write {out / 'log.jsonl'} (No such file")
    (out / "log.jsonl").unlink()
    assert run(out, *args) == 0
    assert run(tmp_path / "whole", *args) == 0
    a, b = tensors(tmp_path / "whole" / "weights.safetensors"), tensors(out / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class ScriptedTrainer:
    """A :class:`~learnedopt.meta.loop.Trainer` whose meta-step ``s`` reports ``losses[s - 1]``
    (a float, or an exception to raise) and records the steps already in ``out``'s log."""

    def __init__(self, out: Path, losses: list) -> None:
        self.out, self.losses, self.logged = out, losses, []

    def step(self, step: int) -> dict[str, float]:
        log = self.out / "log.jsonl"
        self.logged.append([json.loads(line)["step"] for line in log.read_text().splitlines()] if log.exists() else [])
        loss = self.losses[step - 1]
        if isinstance(loss, Exception):
            raise loss
        return {"meta_loss": loss}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state) -> None:  # noqa: ANN001 - the protocol's signature
        pass


def scripted_run(out: Path, losses: list, progress: bool = False) -> ScriptedTrainer:
    from learnedopt.meta.loop import train_loop
    from learnedopt.meta.train import MetaTrainConfig

    trainer = ScriptedTrainer(out, losses)
    train_loop(MetaTrainConfig(meta_steps=len(losses)), trainer, out, checkpoint_every=10, resume=False,
               max_steps=None, progress=progress)  # fmt: skip
    return trainer


def test_each_meta_step_is_in_the_log_before_the_next_begins(tmp_path: Path) -> None:
    """The log is flushed after every record, so a run killed during a meta-step has logged every
    step before it."""
    assert scripted_run(tmp_path / "run", [1.0, 2.0, 3.0, 4.0]).logged == [[], [1], [1, 2], [1, 2, 3]]


def test_the_progress_lines_show_the_running_mean_of_the_meta_loss(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain lines, not tqdm's bar
    scripted_run(tmp_path / "run", [1.0, 2.0, 3.0], progress=True)
    lines = capsys.readouterr().err.splitlines()
    # an exponential moving average with weight 0.1 on the newest step: 1, 1.1, 1.29
    assert [line.split("  ")[:3] for line in lines] == [
        ["meta-step 1/3", "meta-loss 1", "running 1"],
        ["meta-step 2/3", "meta-loss 2", "running 1.1"],
        ["meta-step 3/3", "meta-loss 3", "running 1.29"],
    ]


def test_divergence_after_the_first_meta_step_blames_the_meta_settings(tmp_path: Path) -> None:
    from learnedopt.meta.loop import ConfigError

    with pytest.raises(ConfigError, match=r"^meta-step 2: the meta-loss is nan; lower --meta-lr or --clip$"):
        scripted_run(tmp_path / "run", [1.0, FloatingPointError("the meta-loss is nan")])


def test_a_resume_may_change_only_the_data_folder_the_device_and_the_length(tmp_path: Path) -> None:
    """Every other setting changes the finished steps, so a resume with it changed is refused;
    ``--meta-steps`` too once the run scores its last step (``--select-every``)."""
    from learnedopt.meta.loop import ConfigError, _load_checkpoint, _save_checkpoint
    from learnedopt.meta.train import MetaTrainConfig

    other = {"task": "mnist-mlp", "rule": "MetaLSTMCell", "rule_config": {"hidden_size": 3}, "preset": "l2l-2016",
             "unroll": 3, "horizon": 50, "meta_batch": 4, "meta_steps": 7, "meta_lr": 0.5, "clip": 2.0, "seed": 1,
             "lr": 0.5, "second_order": True, "random_horizon": True, "loss_weighting": "linear", "select_every": 3,
             "select_tasks": 3, "data": "/elsewhere", "device": "cuda"}  # fmt: skip
    assert set(other) == {f.name for f in dataclasses.fields(MetaTrainConfig)}
    for base, free in ((MetaTrainConfig(), {"data", "device", "meta_steps"}), (MetaTrainConfig(select_every=2), {"data", "device"})):
        path = tmp_path / f"checkpoint{base.select_every}.pt"
        _save_checkpoint(path, base, {}, 1)
        resumable = set()
        for name, value in other.items():
            try:
                _load_checkpoint(path, dataclasses.replace(base, **{name: value}))
            except ConfigError as err:
                assert f"the configuration differs from the checkpoint's (--{name.replace('_', '-')}: " in str(err)
            else:
                resumable.add(name)
        assert resumable == free


def test_a_finished_run_prints_its_files_and_evaluation_and_nothing_else_when_quiet(tmp_path: Path, capsys) -> None:
    for out, extra, selected in ((tmp_path / "plain", (), ""), (tmp_path / "selecting", ("--select-every", "1"), None)):
        assert run(out, "--meta-steps", "2", *extra) == 0
        header = read_header(out / "weights.safetensors")
        if selected is None:
            selected = f", selected at meta-step {header['selected_step']}"
        assert capsys.readouterr() == (
            f"wrote {out / 'weights.safetensors'} and MODEL_CARD.md: evaluation loss {header['eval_initial']:.6g} "
            f"(initial rule) -> {header['eval_final']:.6g} (meta-trained{selected})\n",
            "",  # --quiet: no progress on stderr
        )
    # without --quiet, a line per meta-step on stderr (tqdm's bar where it is installed)
    main(["meta-train", *[a for a in FAST if a != "--quiet"], "--meta-steps", "2", "--out", str(tmp_path / "loud")])
    assert capsys.readouterr().err


def test_the_result_names_the_meta_step_of_its_weights(tmp_path: Path) -> None:
    from learnedopt.meta.train import MetaTrainConfig, meta_train

    config = MetaTrainConfig(unroll=2, horizon=2, meta_batch=2, meta_steps=3)
    result = meta_train(config, tmp_path / "last", progress=False)
    assert result.finished and result.step == 3 and result.selected_step == 3  # no selection: the last
    # a resume told to stop before its checkpoint's step runs nothing and reports where the run is
    again = meta_train(config, tmp_path / "last", resume=True, max_steps=1, progress=False)
    assert again.finished and again.step == 3 and again.log == []
    selected = meta_train(dataclasses.replace(config, select_every=1), tmp_path / "best", progress=False)
    assert selected.selected_step == read_header(tmp_path / "best" / "weights.safetensors")["selected_step"]


def test_the_api_takes_exactly_one_starting_point() -> None:
    """``MetaTrainConfig`` is public: a library rule and a preset both given (on the command line
    too) is refused, not trained from the preset alone."""
    from learnedopt.meta.loop import ConfigError
    from learnedopt.meta.train import MetaTrainConfig

    with pytest.raises(ConfigError, match="^give exactly one of --rule and --preset$"):
        MetaTrainConfig(rule=None, preset=None).validate()
    with pytest.raises(ConfigError, match=r"^give exactly one of --rule and --preset \(both only for a weight file of your own "
                                          r"rule, whose class --rule module:Class names\)$"):  # fmt: skip
        MetaTrainConfig(rule="CoordinateLSTM", preset="l2l-2016").validate()
    MetaTrainConfig(rule=None, preset="l2l-2016").validate()


def test_a_meta_steps_log_fields_describe_its_episode() -> None:
    """``meta_loss``: the mean loss over the episode's steps and tasks; ``final_loss``: its last
    step's; ``grad_norm``: the largest pre-clip meta-gradient norm of its truncations;
    ``meta_updates``: their number; ``horizon``: its steps."""
    import copy

    from learnedopt.meta.tasks import generator_for
    from learnedopt.meta.train import _TRAIN_STREAM, MetaTrainConfig, _RuleTrainer, episode

    config = MetaTrainConfig(unroll=2, horizon=5, meta_batch=2, meta_steps=1)
    trainer = _RuleTrainer(config)
    rule = copy.deepcopy(trainer.rule)
    losses, norms = episode(rule, trainer.family, config, generator_for(0, _TRAIN_STREAM, 1),
                            torch.optim.Adam(rule.parameters(), lr=config.meta_lr))  # fmt: skip
    assert trainer.step(1) == {"meta_loss": float(losses.mean()), "final_loss": float(losses[-1].mean()),
                               "grad_norm": max(norms), "meta_updates": 3, "horizon": 5}  # fmt: skip
    assert max(norms) != norms[-1] and float(losses[-1].mean()) < float(losses[0].mean())  # fields that differ


def test_data_without_evaluation_tasks_is_refused_before_training(tmp_path: Path, capsys) -> None:
    """Three MNIST images leave the ``meta_valid`` part (10%) empty. The run trained every
    meta-step, then failed at the final evaluation, leaving a checkpoint and a log without
    weights, which a rerun refused and a ``--resume`` failed on again after its training; now
    the problem is found before anything is written."""
    data = write_fake_mnist(tmp_path / "mnist", n=3)
    out = tmp_path / "run"
    argv = ["meta-train", "--task", "mnist-mlp", "--data", str(data), "--unroll", "2", "--horizon", "2",
            "--meta-batch", "2", "--meta-steps", "1", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the 'meta_valid' part of 3 MNIST images is empty" in err, err
    assert not out.exists()


def test_a_resume_compares_with_the_rule_the_run_started_from(tmp_path: Path) -> None:
    """The weight file a run started from may change before its ``--resume``: the final
    evaluation still compares with the rule the run started from, which the checkpoint keeps."""
    from learnedopt import save_weights
    from learnedopt.weights import build_preset

    start, (rule, _) = tmp_path / "start.safetensors", build_preset("l2l-2016")
    save_weights(rule, start)
    args = ("--preset", str(start), "--meta-steps", "2", "--checkpoint-every", "1")
    assert run(tmp_path / "whole", *args) == 0
    assert run(tmp_path / "broken", *args, "--stop-after", "1") == 0
    with torch.no_grad():
        for p in rule.parameters():
            p.mul_(0.5)
    save_weights(rule, start)  # overwritten in between
    assert run(tmp_path / "broken", *args, "--resume") == 0
    ha, hb = (read_header(tmp_path / d / "weights.safetensors") for d in ("whole", "broken"))
    assert (ha["eval_initial"], ha["eval_final"]) == (hb["eval_initial"], hb["eval_final"])


def test_a_resume_whose_rule_class_builds_another_architecture_is_refused(tmp_path: Path, capsys) -> None:
    """The checkpoint records the rule's architecture (its config): where the run now builds
    another one of the same tensor shapes (a class of your own, or the library, whose default
    changed since the run began), the resume loaded the old weights into the new rule and went
    on silently as another run. It is refused in one line naming the fields."""
    out, args = tmp_path / "run", ("--meta-steps", "3", "--checkpoint-every", "1")
    assert run(out, *args, "--stop-after", "1") == 0
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert payload["rule_config"]["output_scale"] == 0.1
    payload["rule_config"]["output_scale"] = 0.2  # as if the class's default had been 0.2
    torch.save(payload, out / "checkpoint.pt")
    assert run(out, *args, "--resume") == 2
    assert capsys.readouterr().err == (
        "learnedopt meta-train: error: --resume: the checkpoint holds a CoordinateLSTM of another "
        "architecture than this run builds (output_scale: 0.2 -> 0.1): its class or defaults changed since the run "
        "began; resume it with them as they were, or start over in another --out without --resume\n"
    )
    # a field the class gained since (its default the old behaviour) is not a change
    payload["rule_config"]["output_scale"] = 0.1
    del payload["rule_config"]["param_input"]
    torch.save(payload, out / "checkpoint.pt")
    assert run(out, *args, "--resume", "--stop-after", "2") == 0
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    del payload["rule_config"], payload["rule_kind"]  # a checkpoint that does not record it: not checked
    torch.save(payload, out / "checkpoint.pt")
    assert run(out, *args, "--resume") == 0


def test_model_card_rows_keep_two_cells_when_a_value_holds_a_pipe() -> None:
    """A "|" in a setting (a data path) split its Markdown row into more cells."""
    import re

    from learnedopt.meta.loop import model_card

    card = model_card("t", "", "cmd", {"data": "/d/a|b", "steps": 3}, "", "", "")
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert len(rows) == 2
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 3 for row in rows)
    assert r"/d/a\|b" in rows[0]


def test_model_card_rows_keep_a_value_with_a_backtick_in_its_code_span() -> None:
    """A backtick in a setting (a data path, an ``--out`` folder) ended the value's inline code:
    the rest showed as Markdown, and a "|" after it split the row. The model card now fences a
    value with more backticks than it holds (learnedopt.markdown, as the reports do)."""
    from learnedopt.meta.loop import model_card

    card = model_card("t", "", "cmd", {"data": "/d/a`b|c", "steps": 3}, "", "", "")
    rows = [line for line in card.splitlines() if line.startswith("| `")]
    assert rows == ["| `data` | ``'/d/a`b\\|c'`` |", "| `steps` | `3` |"], rows


def at_meta_step(monkeypatch, at: int, action) -> None:  # noqa: ANN001 - pytest's fixture, a callable
    """Call ``action()`` when meta-step ``at`` of the next run begins."""
    from learnedopt.meta import train

    step = train._RuleTrainer.step

    def step_with_action(self, s: int) -> dict[str, float]:  # noqa: ANN001 - the trainer
        if s == at:
            action()
        return step(self, s)

    monkeypatch.setattr(train._RuleTrainer, "step", step_with_action)


def interrupt_at(monkeypatch, at: int) -> None:  # noqa: ANN001 - pytest's fixture
    """Make meta-step ``at`` of the next run raise KeyboardInterrupt, as Ctrl-C there does."""

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    at_meta_step(monkeypatch, at, ctrl_c)


def whole_and_stopped_runs(tmp_path: Path, monkeypatch, stop, at: int, checkpoint_every: int, code: int):  # noqa: ANN001
    """A 6-step run, and the same run stopped by ``stop(monkeypatch, at)`` (exit ``code``):
    their folders and the arguments that continue the stopped one."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ("--meta-steps", "6", "--checkpoint-every", str(checkpoint_every), "--seed", "3")
    assert run(whole, *args) == 0
    with monkeypatch.context() as patch:
        stop(patch, at)
        assert run(broken, *args) == code
    return whole, broken, args


def test_ctrl_c_is_one_line_naming_the_checkpoint_and_resume_continues_exactly(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    whole, broken, args = whole_and_stopped_runs(tmp_path, monkeypatch, interrupt_at, 5, 2, 130)
    err = capsys.readouterr().err
    assert err == (
        f"learnedopt meta-train: interrupted during meta-step 5 of 6; the checkpoint in {broken} is at "
        "meta-step 4: continue with --resume (meta-step 5 runs again)\n"
    )
    assert main(["meta-train", *FAST[:-1], "--out", str(broken), *args, "--resume"]) == 0
    assert f"--resume: continuing {broken} from its checkpoint at meta-step 4" in capsys.readouterr().err
    a, b = tensors(whole / "weights.safetensors"), tensors(broken / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in log_lines(broken)] == list(range(1, 7))
    assert main(["meta-train", *FAST[:-1], "--out", str(broken), *args, "--resume"]) == 0
    assert f"--resume: {broken} has run all its 6 meta-steps; writing its results again" in capsys.readouterr().err


def terminate_at(monkeypatch, at: int) -> None:  # noqa: ANN001 - pytest's fixture
    """Send this process SIGTERM during meta-step ``at`` of the next run, once the run's handler
    is in place (without one, SIGTERM would end the test session: the test fails instead)."""
    import signal

    def sigterm() -> None:
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "no SIGTERM handler during the meta-steps"
        signal.raise_signal(signal.SIGTERM)

    at_meta_step(monkeypatch, at, sigterm)


def test_sigterm_finishes_the_meta_step_checkpoints_it_and_resume_runs_nothing_again(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """A scheduler's preemption (SIGTERM, then SIGKILL after a grace period) lost every meta-step
    since the last checkpoint: the process ended at once. The step in progress now finishes and
    is checkpointed, the command exits with 143, and ``--resume`` ends as an uninterrupted run."""
    import signal

    whole, broken, args = whole_and_stopped_runs(tmp_path, monkeypatch, terminate_at, 3, 4, 143)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    assert capsys.readouterr().err == (
        f"learnedopt meta-train: stopped by SIGTERM after meta-step 3 of 6, checkpointed in {broken}: --resume "
        "continues from meta-step 4, running nothing again\n"
    )
    assert torch.load(broken / "checkpoint.pt", weights_only=True)["step"] == 3
    assert [r["step"] for r in log_lines(broken)] == [1, 2, 3]
    assert not (broken / "weights.safetensors").exists()
    assert main(["meta-train", *FAST[:-1], "--out", str(broken), *args, "--resume"]) == 0
    a, b = tensors(whole / "weights.safetensors"), tensors(broken / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["meta_loss"] for r in log_lines(broken)] == [r["meta_loss"] for r in log_lines(whole)]
    with monkeypatch.context() as patch:  # during the last meta-step: --resume writes the results
        terminate_at(patch, 2)
        assert run(tmp_path / "last", "--meta-steps", "2") == 143
    assert capsys.readouterr().err.endswith(
        f"\nlearnedopt meta-train: stopped by SIGTERM after meta-step 2 of 2, checkpointed in {tmp_path / 'last'}: "
        "--resume writes its results, running nothing again\n"
    )


def test_sigterm_while_the_last_checkpoint_is_written_stops_before_the_final_files(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """SIGTERM that arrived after the last meta-step's check, while its checkpoint was written,
    was swallowed: the run went on to its final evaluation and exited 0. It now stops there
    (143), and ``--resume`` writes the results, running nothing again."""
    from learnedopt.meta import loop

    save = loop._save_checkpoint

    def save_then_sigterm(path, config, state, step):  # noqa: ANN001, ANN202 - _save_checkpoint's
        save(path, config, state, step)
        if step == config.meta_steps:
            import signal

            signal.raise_signal(signal.SIGTERM)

    out, args = tmp_path / "run", ("--meta-steps", "3", "--checkpoint-every", "2", "--seed", "3")
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_save_checkpoint", save_then_sigterm)
        assert run(out, *args) == 143
    assert capsys.readouterr().err.endswith(
        f"learnedopt meta-train: stopped by SIGTERM after meta-step 3 of 3, checkpointed in {out}: "
        "--resume writes its results, running nothing again\n"
    )
    assert not (out / "weights.safetensors").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert run(out, *args, "--resume") == 0
    assert run(tmp_path / "whole", *args) == 0
    a, b = tensors(tmp_path / "whole" / "weights.safetensors"), tensors(out / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3]


def test_sigterm_closes_the_progress_bar_before_its_message(tmp_path: Path, monkeypatch) -> None:
    """tqdm's bar is closed (its line ended) before the one-line message, as on Ctrl-C."""
    from learnedopt.meta import loop

    closed: list[int] = []
    monkeypatch.setattr(loop._Progress, "close", lambda self: closed.append(1))
    terminate_at(monkeypatch, 2)
    assert run(tmp_path / "run", "--meta-steps", "3") == 143
    assert closed == [1]


def test_meta_train_runs_in_a_thread_that_cannot_handle_signals(tmp_path: Path) -> None:
    """Python lets only the main thread install a signal handler: a run in another thread (a
    notebook's or a service's worker) trains without one rather than failing."""
    import signal
    import threading

    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(run(tmp_path / "run", "--meta-steps", "2")))
    thread.start()
    thread.join()
    assert codes == [0] and [r["step"] for r in log_lines(tmp_path / "run")] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_handled_by_the_caller_is_left_to_the_caller(tmp_path: Path, monkeypatch) -> None:
    """A program that calls meta-training with its own SIGTERM handler keeps it: the run does
    not replace it, and is not stopped by it."""
    import signal

    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        at_meta_step(monkeypatch, 2, lambda: signal.raise_signal(signal.SIGTERM))
        assert run(tmp_path / "run", "--meta-steps", "3") == 0
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_before_the_first_checkpoint_or_the_first_step_says_what_resume_does(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 2)
    assert run(out, "--meta-steps", "4", "--checkpoint-every", "3") == 130
    assert capsys.readouterr().err == (
        "learnedopt meta-train: interrupted during meta-step 2 of 4, before the run's first checkpoint: "
        "--resume starts it again from meta-step 0\n"
    )
    from learnedopt.meta import train

    def ctrl_c(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - any signature
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_loop", ctrl_c)  # Ctrl-C while building the run
    fresh = tmp_path / "fresh"
    assert run(fresh, "--meta-steps", "4") == 130
    assert capsys.readouterr().err == (
        f"learnedopt meta-train: interrupted before the run wrote anything to {fresh}: run the command "
        "again, without --resume\n"
    )
    assert run(out, "--meta-steps", "4", "--resume") == 130
    assert f"interrupted; continue the run in {out} with --resume" in capsys.readouterr().err


def test_ctrl_c_while_a_checkpoint_is_written_names_both_places_resume_may_continue_from(tmp_path: Path) -> None:
    from learnedopt.meta.loop import interrupted_message

    assert interrupted_message(tmp_path, 6, 9, 3, saving=True) == (
        f"interrupted during meta-step 6 of 9, while writing its checkpoint to {tmp_path}: continue with "
        "--resume (from meta-step 6, or 3 if that write did not finish)"
    )
    assert interrupted_message(tmp_path, 9, 9, 3, saving=False).endswith("(meta-steps 4 to 9 run again)")


@pytest.mark.parametrize(("option", "field"), [("--meta-batch", "meta_batch"), ("--meta-steps", "meta_steps"),
                                               ("--meta-lr", "meta_lr")])  # fmt: skip
def test_the_help_gives_the_few_shot_defaults_a_run_takes(option: str, field: str, capsys) -> None:
    """The help gave these defaults for --algo lstm alone; a few-shot run takes others (20,000
    meta-steps on the sinusoid), which a user learnt only from the card."""
    import argparse
    import re

    from learnedopt.meta.command import configure_parser
    from learnedopt.meta.fewshot import config_from_args as fewshot_config

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    said = re.search(rf"{option} \S+ ([^\[][^)]*)\)", text).group(1)  # its help, not the usage line
    for task in ("sinusoid", "omniglot"):
        for algo in ("maml", "fomaml", "reptile", "meta-lstm"):
            value = getattr(fewshot_config(parser.parse_args(["--algo", algo, "--task", task, "--out", "x"])), field)
            part = said[said.index(f"{task}:"):].split(";")[0]
            assert f" {value:g}" in part and (algo in part or "/" not in part), (algo, task, said)


@pytest.mark.parametrize(
    ("algo", "variable", "meaning"),
    [
        ("lstm", "LEARNEDOPT_COMPILE", "use 1 (compile the LSTM step, the default) or 0 (run it eagerly)"),
        ("maml", "LEARNEDOPT_COMPILE", "use 1 (compile the LSTM step, the default) or 0 (run it eagerly)"),
        ("lstm", "LEARNEDOPT_CPU_KERNEL", "use 1 (the fused CPU LSTM layer, the default) or 0 (the LSTM step without it)"),
    ],
)
def test_a_bad_learnedopt_compile_is_a_one_line_error_before_the_run_writes(
    algo: str, variable: str, meaning: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    """It was read at the first LSTM step: a traceback in meta-step 1, and a log that made the
    corrected command refuse the folder without --resume."""
    monkeypatch.setenv(variable, "maybe")
    extra = [] if algo == "lstm" else ["--algo", "maml", "--task", "sinusoid", "--meta-batch", "2", "--val-tasks", "2"]
    argv = ["meta-train", *(FAST if algo == "lstm" else ["--quiet"]), *extra, "--meta-steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"learnedopt meta-train: error: {variable}='maybe': {meaning}\n"
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- --task module:Class
OWN_TASKS = '''
import random

import numpy as np
import torch
import torch.nn.functional as F
from learnedopt.meta import Task, TaskBatch, TaskFamily


class Logistic(Task):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def init_params(self, generator):
        return {"w": torch.zeros(self.x.shape[1]), "b": torch.zeros(())}

    def loss(self, params, step_index):
        return F.binary_cross_entropy_with_logits(self.x @ params["w"] + params["b"], self.y)


class LogisticFamily(TaskFamily):
    name = "logistic"
    splits = []  # the split of every instance made, in order

    def __init__(self, split):
        LogisticFamily.splits.append(split)
        self.scale = 3.0 if split == "meta_train" else 1.0

    def sample(self, generator):
        x = torch.randn(64, 5, generator=generator) * self.scale
        return Logistic(x, (x @ torch.randn(5, generator=generator) > 0).float())

    def describe(self):
        return "logistic regression on 64 Gaussian points in 5 dimensions"


def make_with_data(data):
    family = LogisticFamily("meta_train")
    family.data = data
    return family


def not_a_family():
    return 3


# what a user gets wrong: each is refused in one line before the run writes anything
class NoDescribe(TaskFamily):
    name = "no-describe"

    def sample(self, generator):
        return LogisticFamily("meta_train").sample(generator)


class NeedsWidth(LogisticFamily):
    def __init__(self, width, split="meta_train"):
        super().__init__(split)


def broken_factory():
    raise RuntimeError("cannot reach the data server")


class Variant(LogisticFamily):
    task = Logistic

    def __init__(self, split="meta_train"):
        self.scale = 3.0

    def sample(self, generator):
        task = super().sample(generator)
        task.__class__ = self.task
        return task


class PerExample(Logistic):
    def loss(self, params, step_index):
        return F.binary_cross_entropy_with_logits(self.x @ params["w"] + params["b"], self.y, reduction="none")


class PerExampleFamily(Variant):
    task = PerExample


class NaNLoss(Logistic):
    def loss(self, params, step_index):
        return super().loss(params, step_index) * float("nan")


class NaNFamily(Variant):
    task = NaNLoss


class Float64(Logistic):
    def init_params(self, generator):
        return {k: v.double() for k, v in super().init_params(generator).items()}


class Float64Family(Variant):
    task = Float64


class UnusedBias(Logistic):
    def loss(self, params, step_index):
        return F.binary_cross_entropy_with_logits(self.x @ params["w"], self.y)


class UnusedFamily(Variant):
    task = UnusedBias


class OtherDevice(Logistic):
    def loss(self, params, step_index):
        return F.binary_cross_entropy_with_logits(self.x.to("meta") @ params["w"] + params["b"], self.y.to("meta"))


class OtherDeviceFamily(Variant):
    task = OtherDevice


class DrawnWidth(Logistic):
    def init_params(self, generator):
        return {"w": torch.zeros(int(torch.randint(3, 6, (), generator=generator))), "b": torch.zeros(())}


class DrawnWidthFamily(Variant):
    task = DrawnWidth


class LaterNaN(Logistic):
    def loss(self, params, step_index):  # finite at step 0, where the run's checks look
        return super().loss(params, step_index) * (float("nan") if step_index >= 3 else 1.0)


class LaterNaNFamily(Variant):
    task = LaterNaN


class ScaledBatch(TaskBatch):  # a batch of its own, whose constructor is not (tasks)
    def __init__(self, tasks, scale):
        super().__init__(tasks)
        self.scale = scale

    def loss(self, params, step_index):
        return super().loss(params, step_index) * self.scale


class ScaledBatchFamily(Variant):
    def sample_batch(self, size, generator):
        return ScaledBatch([self.sample(generator) for _ in range(size)], 2.0)


class Dropout(Logistic):
    def loss(self, params, step_index):  # dropout on the inputs: masks from torch's global RNG at every step
        x = F.dropout(self.x, 0.3, training=True)
        return F.binary_cross_entropy_with_logits(x @ params["w"] + params["b"], self.y)


class DropoutFamily(Variant):
    task = Dropout


class GlobalMinibatch(Logistic):
    def loss(self, params, step_index):  # the whole data at step 0, then minibatches from torch's global RNG
        pick = torch.randint(0, self.x.shape[0], (16,)) if step_index else slice(None)
        return F.binary_cross_entropy_with_logits(self.x[pick] @ params["w"] + params["b"], self.y[pick])


class GlobalMinibatchFamily(Variant):
    task = GlobalMinibatch


class NumpyMinibatch(Logistic):
    def loss(self, params, step_index):  # the whole data at step 0, then minibatches from numpy's global RNG
        pick = torch.from_numpy(np.random.randint(0, self.x.shape[0], 16)) if step_index else slice(None)
        return F.binary_cross_entropy_with_logits(self.x[pick] @ params["w"] + params["b"], self.y[pick])


class NumpyMinibatchFamily(Variant):
    task = NumpyMinibatch


class PythonDropout(Logistic):
    def loss(self, params, step_index):  # dropout on the inputs: masks from Python's random at every step
        keep = torch.tensor([random.random() > 0.3 for _ in range(self.x.shape[0])])
        return F.binary_cross_entropy_with_logits((self.x * keep[:, None]) @ params["w"] + params["b"], self.y)


class PythonDropoutFamily(Variant):
    task = PythonDropout


class UnseededMinibatch(Logistic):
    def loss(self, params, step_index):  # the whole data at step 0, then minibatches of a generator nothing seeds
        pick = torch.from_numpy(np.random.default_rng().integers(0, self.x.shape[0], 16)) if step_index else slice(None)
        return F.binary_cross_entropy_with_logits(self.x[pick] @ params["w"] + params["b"], self.y[pick])


class UnseededMinibatchFamily(Variant):
    task = UnseededMinibatch


class GlobalRandomFamily(Variant):
    def sample(self, generator):  # its data from torch's global random state: --resume drew other tasks
        x = torch.randn(64, 5)
        return Logistic(x, (x @ torch.randn(5) > 0).float())


class GlobalInit(Logistic):
    def init_params(self, generator):
        return {"w": torch.randn(self.x.shape[1]), "b": torch.zeros(())}


class GlobalInitFamily(Variant):
    task = GlobalInit


class NotATaskFamily(Variant):
    def sample(self, generator):
        return {"w": torch.zeros(5)}


class DescribeRaises(Variant):
    def describe(self):
        raise KeyError("width")


class DescribesNothing(Variant):
    def describe(self):
        return ""


class BadValidation(LogisticFamily):
    def sample(self, generator):
        task = super().sample(generator)
        if self.scale == 1.0:  # the meta_valid split's tasks
            task.__class__ = NaNLoss
        return task


class ListBatches(Variant):
    def sample_batch(self, size, generator):
        return [self.sample(generator) for _ in range(size)]


class ToReturnsNothing(LogisticFamily):
    def to(self, device):
        self.device = torch.device(device)
'''


@pytest.fixture
def own_tasks(tmp_path: Path, monkeypatch) -> str:  # noqa: ANN001 - pytest's fixture
    """An importable module of the user's own task family; returns its module name."""
    siblings = {
        "raises": 'raise RuntimeError("set MYTASKS_DATA first")\n',
        "syntax": "def f(:\n",
        "needs": "import no_such_dependency_xyz\n",
    }
    yield from importable_module(tmp_path, monkeypatch, "own_tasks", OWN_TASKS, siblings)


def test_meta_train_imports_a_task_family_given_as_module_colon_class(tmp_path: Path, own_tasks: str) -> None:
    """``--task module:Class``: the run trains on the user's family (its meta_train split; the
    validation on its meta_valid one), its card describes it, and --resume rebuilds it exactly."""
    import importlib

    task = f"{own_tasks}:LogisticFamily"
    args = ("--task", task, "--meta-steps", "4", "--checkpoint-every", "2", "--seed", "1")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run(whole, *args) == 0
    family = importlib.import_module(own_tasks).LogisticFamily
    assert family.splits == ["meta_train", "meta_valid"]
    card = (whole / "MODEL_CARD.md").read_text()
    assert "logistic regression on 64 Gaussian points" in card
    assert (f"The family is your own `{task}`, built with split='meta_train' for training and split='meta_valid' "
            f"for evaluation. The command above needs its module `{own_tasks}` importable") in card  # fmt: skip
    header = read_header(whole / "weights.safetensors")
    assert f"--task {task}" in header["command"]
    # the module path alone means nothing where the module is not: the header says what it was
    assert header["trained_on"] == f"{task} (logistic regression on 64 Gaussian points in 5 dimensions), 4 meta-steps, seed 1"
    resumed_equals_whole(whole, broken, args)
    # a factory that takes data gets --data; the class, which does not, refuses it
    assert run(tmp_path / "data", "--task", f"{own_tasks}:make_with_data", "--data", str(tmp_path), "--meta-steps", "1") == 0


@pytest.mark.parametrize(
    ("task", "extra", "message"),
    [
        ("no_such_module_xyz:Family", (), "--task no_such_module_xyz:Family: cannot import 'no_such_module_xyz' "
         "(ModuleNotFoundError: No module named 'no_such_module_xyz'); it must be importable"),
        ("{mod}:Missing", (), "--task {mod}:Missing: module '{mod}' has no class or function 'Missing'"),
        ("{mod}:not_a_family", (), "--task {mod}:not_a_family: {mod}:not_a_family() gave a int, not a learnedopt.meta.TaskFamily"),
        ("{mod}:LogisticFamily", ("--data", "."), "--task {mod}:LogisticFamily: {mod}:LogisticFamily takes no data "
         "parameter, so --data would be ignored"),
        ("{mod}:1x", (), "unknown task '{mod}:1x'"),
        # a module that raises on import: a traceback (only ImportError was caught)
        ("{mod}_raises:F", (), "--task {mod}_raises:F: importing '{mod}_raises' failed: RuntimeError: set MYTASKS_DATA first\n"),
        ("{mod}_syntax:F", (), "--task {mod}_syntax:F: importing '{mod}_syntax' failed: SyntaxError: invalid syntax "
         "({mod}_syntax.py, line 1)\n"),
        # the module imports, a module it needs does not: not the advice to set PYTHONPATH
        ("{mod}_needs:F", (), "--task {mod}_needs:F: importing '{mod}_needs' failed: ModuleNotFoundError: No module "
         "named 'no_such_dependency_xyz'\n"),
        # constructors that cannot be called as they are: a TypeError traceback
        ("{mod}:Logistic", (), "--task {mod}:Logistic: {mod}:Logistic is a Task (one optimizee); --task takes the "
         "TaskFamily that samples it\n"),
        ("{mod}:NoDescribe", (), "--task {mod}:NoDescribe: {mod}:NoDescribe does not define describe, which every "
         "TaskFamily must\n"),
        ("{mod}:NeedsWidth", (), "--task {mod}:NeedsWidth: {mod}:NeedsWidth needs width, which it is not given (it is "
         "called with split= if it takes it and data= with --data): give them defaults, or name a "
         "function that builds it\n"),
        ("{mod}:broken_factory", (), "--task {mod}:broken_factory: {mod}:broken_factory() raised RuntimeError: cannot "
         "reach the data server\n"),
        # the README says an imported family cannot be a mixture member; the error said "unknown task"
        ("{mod}:LogisticFamily+quadratic", (), "--task {mod}:LogisticFamily+quadratic: your own family "
         "{mod}:LogisticFamily cannot be a mixture member (mixtures are of the built-in families); to mix, have your "
         "family draw from several\n"),
        ("quadratic+{mod}:LogisticFamily:2", (), "--task quadratic+{mod}:LogisticFamily:2: your own family "
         "{mod}:LogisticFamily cannot be a mixture member"),
        # tasks that cannot be unrolled: a traceback (or no error at all) after the log was begun
        ("{mod}:PerExampleFamily", (), "--task {mod}:PerExampleFamily: the first meta-training tasks: task 0's loss "
         "at step 0 is a tensor of shape (64,) and dtype torch.float32: Task.loss must return a scalar floating-point "
         "tensor computed from params (reduce per-example losses, e.g. with .mean())\n"),
        ("{mod}:NaNFamily", (), "--task {mod}:NaNFamily: the first meta-training tasks: the loss at step 0 is nan for "
         "task 0 (of 4): check the task's loss and initial parameters\n"),
        ("{mod}:Float64Family", (), "--task {mod}:Float64Family: the first meta-training tasks: the initial "
         "params['w'] are torch.float64; the rule runs in torch.float32, so they must be too\n"),
        ("{mod}:UnusedFamily", (), "--task {mod}:UnusedFamily: the first meta-training tasks: the task batch's loss "
         "at step 0 does not depend on params ['b']: every parameter init_params returns must take part in the loss\n"),
        ("{mod}:OtherDeviceFamily", (), "--task {mod}:OtherDeviceFamily: the first meta-training tasks: RuntimeError: "),
        ("{mod}:DrawnWidthFamily", (), "--task {mod}:DrawnWidthFamily: the first meta-training tasks: task 1's "
         "init_params gives 'w' of shape (5,), float32 on cpu, task 0's of shape (3,), float32 on cpu: the tasks of a "
         "batch are unrolled as one stack"),
        # drawn from a global random state: a --resume drew other tasks, silently not the run it continued
        ("{mod}:GlobalRandomFamily", (), "--task {mod}:GlobalRandomFamily: the first meta-training tasks: two draws "
         "from the same seed differ (their losses or gradients at step 0): draw only from the generator it is given "
         "(not from torch's, numpy's or Python's global random state), so that --resume repeats the run\n"),
        ("{mod}:GlobalInitFamily", (), "--task {mod}:GlobalInitFamily: the first meta-training tasks: two draws from "
         "the same seed differ (their initial params['w']): draw only from the generator it is given"),
        # a loss whose draws after step 0 come from a generator nothing seeds: a --resume drew other minibatches
        ("{mod}:UnseededMinibatchFamily", (), "--task {mod}:UnseededMinibatchFamily: the first meta-training tasks: "
         "two draws from the same seed differ (their losses or gradients at step 1, not at step 0): a task's loss may "
         "draw from torch's, numpy's or Python's global random state, which each meta-step seeds, but not from a "
         "generator of its own that nothing seeds, so that --resume repeats the run\n"),
        ("{mod}:NotATaskFamily", (), "--task {mod}:NotATaskFamily: the first meta-training tasks: sample gave a dict, "
         "not a learnedopt.meta.Task\n"),
        # the evaluation's tasks (split='meta_valid') are checked too: they are used only after the run
        ("{mod}:BadValidation", (), "--task {mod}:BadValidation: the first evaluation tasks: the loss at step 0 is nan "
         "for task 0 (of 4): check the task's loss and initial parameters\n"),
        ("{mod}:ListBatches", (), "--task {mod}:ListBatches: the first meta-training tasks: sample_batch gave a list, "
         "not a TaskBatch\n"),
        # the card is written at the end: this lost it after the whole run
        ("{mod}:DescribeRaises", (), "--task {mod}:DescribeRaises: describe(): KeyError: 'width'\n"),
        ("{mod}:DescribesNothing", ("--device", "cpu"), "--task {mod}:DescribesNothing: describe(): it must return a "
         "paragraph for the model card, got ''\n"),
        # blamed describe() for the None that to() returned
        ("{mod}:ToReturnsNothing", (), "--task {mod}:ToReturnsNothing: ToReturnsNothing.to() returned NoneType: it must "
         "return the family (self)\n"),
    ],
)
def test_an_imported_task_family_that_cannot_be_used_is_one_line_before_anything_is_written(
    tmp_path: Path, own_tasks: str, capsys, task: str, extra: tuple[str, ...], message: str
) -> None:
    out = tmp_path / "run"
    assert run(out, "--task", task.format(mod=own_tasks), *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"learnedopt meta-train: error: {message.format(mod=own_tasks)}"), err
    assert err.count("\n") == 1 and not out.exists()


def _seed_every_global_rng(seed: int) -> None:
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.mark.parametrize(
    "family", ["DropoutFamily", "GlobalMinibatchFamily", "NumpyMinibatchFamily", "PythonDropoutFamily"]
)
def test_a_loss_that_draws_from_a_global_rng_resumes_bit_identically(tmp_path: Path, own_tasks: str, family: str) -> None:
    """A task's loss that draws from torch's, numpy's or Python's global RNG during the unroll
    (dropout masks, minibatches), which a checkpoint does not hold: a dropout family was refused
    at the start as drawing its tasks from a global random state (the two step-0 losses of the
    family check drew other masks), and one drawing minibatches after step 0 ran, but a resumed
    run drew other minibatches (and evaluation and selection episodes) than the uninterrupted one.
    Each meta-step and each evaluation now draws from the three global RNGs seeded from the run's
    seed (numpy's and Python's were not seeded until later: a resume differed for them)."""
    args = ("--task", f"{own_tasks}:{family}", "--meta-steps", "4", "--checkpoint-every", "2", "--seed", "1",
            "--select-every", "1")  # fmt: skip
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _seed_every_global_rng(1)  # the global RNGs' states before a run do not matter
    assert run(whole, *args) == 0
    assert run(broken, *args, "--stop-after", "3") == 0  # checkpoint at 2
    _seed_every_global_rng(2)
    assert run(broken, *args, "--resume") == 0
    a, b = tensors(whole / "weights.safetensors"), tensors(broken / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    untimed = [[{k: v for k, v in r.items() if k not in MACHINE_FIELDS} for r in log_lines(d)] for d in (whole, broken)]
    assert untimed[0] == untimed[1]  # the meta-losses and the selection scores
    ha, hb = read_header(whole / "weights.safetensors"), read_header(broken / "weights.safetensors")
    assert {k: v for k, v in ha.items() if k != "command"} == {k: v for k, v in hb.items() if k != "command"}


def test_seeded_global_rng_seeds_numpy_and_python_from_all_of_the_seed_and_restores_them() -> None:
    """Inside, numpy's and Python's global RNGs draw as the seed says (from all of its 64 bits,
    as torch's: seeds that differ above bit 32 draw differently); after, they go on as if nothing
    had run inside."""
    import random

    import numpy as np

    from learnedopt.values import seeded_global_rng

    def inside(seed: int) -> tuple[list[float], float, float]:
        with seeded_global_rng(seed, "cpu"):
            return [float(torch.rand(())), float(np.random.rand())], float(np.random.rand()), random.random()

    def outside() -> tuple[float, float, float]:
        return float(torch.rand(())), float(np.random.rand()), random.random()

    _seed_every_global_rng(5)
    expected = [outside(), outside()]
    _seed_every_global_rng(5)
    first = outside()
    drawn = inside(3 + 2**40)
    assert inside(3 + 2**40) == drawn
    assert inside(3)[1:] != drawn[1:]  # numpy's and Python's use the bits above 32 too
    assert [first, outside()] == expected


def test_a_meta_steps_draws_are_seeded_from_the_seed_the_step_and_the_ranks_first_task() -> None:
    """The seed both trainers' meta-steps draw from (dropout, a loss's minibatches), which
    :func:`~learnedopt.meta.loop.seeded_meta_step` derives for them: ``(seed, stream, 0, step, the
    first task of the rank's share)``, as each trainer derived it itself before (another
    derivation would change every finished run's draws)."""
    from learnedopt.meta import train
    from learnedopt.meta.distributed import Workers
    from learnedopt.meta.fewshot import training
    from learnedopt.meta.loop import seeded_meta_step
    from learnedopt.meta.tasks import derive_seed
    from learnedopt.values import seeded_global_rng

    assert (train._DRAWS_STREAM, training._DRAWS_STREAM) == (4, 5)
    with seeded_global_rng(derive_seed(7, 4, 0, 3, 6), "cpu"):
        expected = torch.rand(4)
    with seeded_meta_step(7, 4, 3, Workers(rank=1, world_size=2), 12, "cpu"):
        assert torch.equal(torch.rand(4), expected)


def test_an_own_task_batch_class_of_another_constructor_runs_on_one_process_and_is_checked_for_several(
    tmp_path: Path, own_tasks: str
) -> None:
    """TaskBatch.subset rebuilds a batch as type(self)(tasks): on one process the meta-batch is
    not split, so a batch class of another constructor (which truncated_unroll runs) was a
    TypeError traceback at meta-step 1, after the log was begun; for several processes, which
    split it, it is refused before the run, in one line."""
    import importlib

    from learnedopt.meta import train
    from learnedopt.meta.distributed import Workers
    from learnedopt.meta.loop import ConfigError
    from learnedopt.meta.train import MetaTrainConfig

    assert run(tmp_path / "run", "--task", f"{own_tasks}:ScaledBatchFamily", "--meta-steps", "1") == 0
    module = importlib.import_module(own_tasks)
    config = MetaTrainConfig(task=f"{own_tasks}:X", meta_batch=4)
    with pytest.raises(ConfigError) as raised:
        train._check_family(module.ScaledBatchFamily(), config, torch.Generator(), "meta-training",
                            workers=Workers(rank=1, world_size=2))  # fmt: skip
    assert str(raised.value).startswith(
        f"--task {own_tasks}:X: the first meta-training tasks: ScaledBatch.subset() (a process's share of the meta-batch) "
        "raised TypeError: "
    ), raised.value
    assert str(raised.value).endswith("a TaskBatch class whose constructor is not (tasks) must override subset")


def test_the_device_hint_is_for_the_tasks_not_for_describe(own_tasks: str) -> None:
    """On another device than the CPU a task failure may be data left on the CPU (the hint says
    where a family's data belongs); a describe() failure is not (no hint)."""
    import importlib

    from learnedopt.meta import train
    from learnedopt.meta.loop import ConfigError
    from learnedopt.meta.train import MetaTrainConfig

    module = importlib.import_module(own_tasks)
    config = MetaTrainConfig(task=f"{own_tasks}:X", device="cuda", meta_batch=2)
    hint = (" (on --device cuda: a family's tasks must keep their data on family.device, where TaskFamily.to puts "
            "it)")  # fmt: skip
    with pytest.raises(ConfigError) as raised:
        train._check_family(module.DescribeRaises(), config, torch.Generator(), "meta-training")
    assert str(raised.value) == f"--task {own_tasks}:X: describe(): KeyError: 'width'"
    with pytest.raises(ConfigError) as raised:
        train._check_family(module.NaNFamily(), config, torch.Generator(), "meta-training")
    assert str(raised.value).endswith(f"check the task's loss and initial parameters{hint}")


def test_make_family_names_an_imported_mixture_member() -> None:
    from learnedopt.meta import make_family

    with pytest.raises(ValueError, match=r"^'quadratic\+mytasks:Logistic:3': your own family mytasks:Logistic cannot be a "
                       r"mixture member \(mixtures are of the built-in families\)"):
        make_family("quadratic+mytasks:Logistic:3")


@pytest.fixture
def own_rule(tmp_path: Path, monkeypatch) -> str:  # noqa: ANN001 - pytest's fixture
    """An importable module of the user's own update rules; returns its module name. The rule
    kinds a run registers are forgotten after the test."""
    yield from own_rule_module(tmp_path, monkeypatch, OWN_RULE)


def test_meta_train_imports_an_update_rule_given_as_module_colon_class(tmp_path: Path, own_rule: str) -> None:
    """``--rule module:Class``: the run trains the user's rule, seeded by --seed, writes a weight
    file of its kind (loadable once the class is registered, as the run did), says so in its
    card, and --resume continues it exactly; --rule-config sets its architecture."""
    import importlib

    rule = f"{own_rule}:MomentumMLP"
    args = ("--rule", rule, "--meta-steps", "4", "--checkpoint-every", "2", "--seed", "1")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run(whole, *args) == 0
    header = read_header(whole / "weights.safetensors")
    assert header["kind"] == "CliMomentumMLP" and f"--rule {rule}" in header["command"]
    loaded, _ = load_weights(whole / "weights.safetensors")
    assert type(loaded) is importlib.import_module(own_rule).MomentumMLP
    card = (whole / "MODEL_CARD.md").read_text()
    assert f"The rule is your own `{rule}`, initialised by its constructor under the seed." in card
    resumed_equals_whole(whole, broken, args)
    first = [r["meta_loss"] for r in log_lines(whole)]
    assert first[-1] < first[0]
    assert run(tmp_path / "wide", "--rule", rule, "--rule-config", '{"hidden": 6}', "--meta-steps", "1") == 0
    assert read_header(tmp_path / "wide" / "weights.safetensors")["config"] == {"hidden": 6, "beta": 0.9}


def test_the_card_keeps_an_own_rules_weight_file_with_a_backtick_in_one_code_span(tmp_path: Path, own_rule: str) -> None:
    """The card named ``--preset FILE`` of an own rule in single-backtick inline code: a
    backtick in the file's path ended it early."""
    rule = f"{own_rule}:MomentumMLP"
    first = tmp_path / "a`b"
    assert run(first, "--rule", rule, "--rule-config", '{"hidden": 3}', "--meta-steps", "1") == 0
    preset = str(first / "weights.safetensors")
    assert run(tmp_path / "second", "--rule", rule, "--preset", preset, "--meta-steps", "1") == 0
    card = (tmp_path / "second" / "MODEL_CARD.md").read_text()
    assert f"started from the architecture and weights of ``{preset}``." in card


DROPOUT_RULE = """

class DropoutMLP(MomentumMLP):  # dropout in its step: masks from torch's global RNG at every update
    kind = "CliDropoutMLP"

    def forward(self, grad, param, state, loss=None):
        step, new_state = super().forward(grad, param, state, loss)
        return torch.nn.functional.dropout(step, 0.2, training=True), new_state
"""


@pytest.fixture
def own_dropout_rule(tmp_path: Path, monkeypatch) -> str:  # noqa: ANN001 - pytest's fixture
    """:func:`own_rule` with ``DropoutMLP`` too."""
    yield from own_rule_module(tmp_path, monkeypatch, OWN_RULE + DROPOUT_RULE)


def test_an_own_rule_with_dropout_resumes_bit_identically(tmp_path: Path, own_dropout_rule: str) -> None:
    """A rule of your own whose step draws from torch's global RNG (dropout), which a checkpoint
    does not hold: after --resume its masks (and the selection's and evaluation's) were other
    ones and the weights differed from the uninterrupted run's."""
    module = own_dropout_rule
    args = ("--rule", f"{module}:DropoutMLP", "--meta-steps", "4", "--checkpoint-every", "2", "--seed", "1",
            "--select-every", "2")  # fmt: skip
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    torch.manual_seed(1)
    assert run(whole, *args) == 0
    assert run(broken, *args, "--stop-after", "3") == 0
    torch.manual_seed(2)
    assert run(broken, *args, "--resume") == 0
    a, b = tensors(whole / "weights.safetensors"), tensors(broken / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = read_header(whole / "weights.safetensors"), read_header(broken / "weights.safetensors")
    assert {k: v for k, v in ha.items() if k != "command"} == {k: v for k, v in hb.items() if k != "command"}


TIED_RULE = """

class TiedMLP(MomentumMLP):  # a hidden layer's weight tied to another's: one tensor under two names
    kind = "CliTiedMLP"

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        hidden = self.config.hidden
        first, last = self.mlp[0], self.mlp[2]
        self.mlp = torch.nn.Sequential(first, torch.nn.Tanh(), torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.Tanh(), last)
        self.mlp[4].weight = self.mlp[2].weight
"""


@pytest.fixture
def own_tied_rule(tmp_path: Path, monkeypatch) -> str:  # noqa: ANN001 - pytest's fixture
    """:func:`own_rule` with ``TiedMLP`` too."""
    yield from own_rule_module(tmp_path, monkeypatch, OWN_RULE + TIED_RULE)


def test_an_own_rule_with_a_tied_weight_writes_its_weights_and_resumes_exactly(tmp_path: Path, own_tied_rule: str) -> None:
    """``--rule module:Class`` of a rule whose weight is one tensor under two names: the run's
    weight file failed in safetensors ("Some tensors share memory") at the end of the run. It is
    written, loads with the weight tied, and --resume continues the run bit for bit."""
    rule = f"{own_tied_rule}:TiedMLP"
    args = ("--rule", rule, "--meta-steps", "4", "--checkpoint-every", "2", "--seed", "1")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run(whole, *args) == 0
    loaded, header = load_weights(whole / "weights.safetensors")
    assert header["kind"] == "CliTiedMLP" and loaded.mlp[4].weight is loaded.mlp[2].weight
    a = resumed_equals_whole(whole, broken, args)
    assert torch.equal(a["mlp.2.weight"], a["mlp.4.weight"]) and not torch.equal(a["mlp.2.bias"], a["mlp.4.bias"])


def test_meta_train_starts_from_a_weight_file_of_an_own_rule_and_resumes_exactly(tmp_path: Path, own_rule: str) -> None:
    """``--rule module:Class --preset FILE``: a run starts from the file's architecture and
    weights (a run of the rule's own), writes a file of its kind and a card that says so, and
    --resume continues it bit for bit."""
    rule = f"{own_rule}:MomentumMLP"
    first = tmp_path / "first"
    assert run(first, "--rule", rule, "--rule-config", '{"hidden": 3}', "--meta-steps", "2", "--seed", "1") == 0
    preset = str(first / "weights.safetensors")
    args = ("--rule", rule, "--preset", preset, "--meta-steps", "4", "--checkpoint-every", "2", "--seed", "2")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run(whole, *args) == 0
    start = torch.load(whole / "checkpoint.pt", weights_only=True)["initial_rule"]
    saved = tensors(first / "weights.safetensors")
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in saved)
    header = read_header(whole / "weights.safetensors")
    assert header["kind"] == "CliMomentumMLP" and header["config"] == {"hidden": 3, "beta": 0.9}
    assert header["rule_class"] == rule and f"--rule {rule} --preset {preset}" in header["command"]
    card = (whole / "MODEL_CARD.md").read_text()
    assert f"The rule is your own `{rule}`, started from the architecture and weights of `{preset}`." in card
    a = resumed_equals_whole(whole, broken, args)
    assert not all(torch.equal(a[k], saved[k]) for k in a)  # it trained


def test_initial_rule_registers_the_own_rule_whose_weight_file_it_starts_from(tmp_path: Path, own_rule: str) -> None:
    """``initial_rule`` on its own (no ``validate`` before it) imports and registers ``--rule``'s
    class, so that the weight file of its kind loads."""
    import importlib

    from learnedopt import save_weights
    from learnedopt.meta.train import MetaTrainConfig, initial_rule
    from learnedopt.nn import RULES

    torch.manual_seed(0)
    saved = importlib.import_module(own_rule).MomentumMLP(hidden=3)
    save_weights(saved, tmp_path / "own.safetensors")
    assert saved.kind not in RULES
    rule = initial_rule(MetaTrainConfig(rule=f"{own_rule}:MomentumMLP", preset=str(tmp_path / "own.safetensors")))
    assert type(rule) is type(saved) and rule.config == saved.config
    assert all(torch.equal(a, b) for a, b in zip(rule.state_dict().values(), saved.state_dict().values(), strict=True))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "{weights}"], "--preset {weights} is a weight file of your own rule kind 'CliMomentumMLP': name its "
         "class, --rule {mod}:MomentumMLP (as the file records it)"),
        (["--rule", "{mod}:MomentumMLP", "--preset", "l2l-2016"],
         "--preset l2l-2016 holds a CoordinateLSTM rule, but --rule {mod}:MomentumMLP is a CliMomentumMLP"),
        (["--rule", "{mod}:MomentumMLP", "--preset", "{other}"],  # another own kind, not imported
         "--preset {other} holds a CliOtherMLP rule, but --rule {mod}:MomentumMLP is a CliMomentumMLP"),
        (["--rule", "{mod}:MomentumMLP", "--preset", "{weights}", "--rule-config", '{"hidden": 3}'],
         "--rule-config sets the architecture of --rule; a --preset has its own"),
        (["--rule", "CoordinateLSTM", "--preset", "{weights}"], "give exactly one of --rule and --preset (both only for"),
        (["--algo", "meta-lstm", "--task", "sinusoid", "--rule", "MetaLSTMCell", "--preset", "meta-lstm-2017"],
         "--preset brings its rule's architecture and weights: give --rule and --rule-config, or --preset"),
    ],
    ids=["own-kind-without-rule", "other-kind", "other-own-kind", "rule-config", "library-rule", "meta-lstm"],
)
def test_a_preset_that_does_not_fit_its_rule_is_one_line_and_exit_code_2(
    tmp_path: Path, capsys, own_rule: str, extra, message  # noqa: ANN001
) -> None:
    """Checked before the run writes anything; a weight file of your own kind names the class it
    records."""
    import importlib

    from learnedopt import save_weights

    weights, other = tmp_path / "own.safetensors", tmp_path / "other.safetensors"
    momentum_mlp = importlib.import_module(own_rule).MomentumMLP
    save_weights(momentum_mlp(), weights)
    save_weights(type("OtherMLP", (momentum_mlp,), {"kind": "CliOtherMLP"})(), other)

    def fill(text: str) -> str:
        return text.replace("{mod}", own_rule).replace("{weights}", str(weights)).replace("{other}", str(other))

    argv = ["meta-train", "--out", str(tmp_path / "run"), "--meta-steps", "1", "--quiet"]
    assert main(argv + [fill(e) for e in extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fill(message) in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rule", "no_such_module_xyz:Rule"], "--rule no_such_module_xyz:Rule: cannot import 'no_such_module_xyz'"),
        (["--rule", "{mod}:Missing"], "--rule {mod}:Missing: module '{mod}' has no class or function 'Missing'"),
        (["--rule", "{mod}:NotARule"], "--rule {mod}:NotARule: register_rule takes an UpdateRule subclass"),
        (["--rule", "{mod}:Halved"], "--rule {mod}:Halved: Halved must set its own kind"),
        (["--rule", "{mod}:MomentumMLP", "--rule-config", '{"width": 3}'],
         "--rule-config: unknown CliMomentumMLP config keys: ['width']"),
        (["--rule", "{mod}.1:Rule"], "unknown rule '{mod}.1:Rule'; choose from CoordinateLSTM, MetaLSTMCell, or your own "
         "UpdateRule as module:Class"),
        (["--algo", "meta-lstm", "--task", "sinusoid", "--rule", "{mod}:MomentumMLP"],
         "(your own rule as module:Class is for --algo lstm)"),
        # its first forward, tried before the run: these trained nothing, silently, or failed in the unroll
        (["--rule", "{mod}:IntegerStep"], "--rule {mod}:IntegerStep: forward's step must be a floating (3,) tensor for 3 "
         "coordinates, got a (3,) int64 tensor"),
        (["--rule", "{mod}:ShortStep"], "--rule {mod}:ShortStep: forward's step must be a floating (3,) tensor for 3 "
         "coordinates, got a (2,) float32 tensor"),
        (["--rule", "{mod}:StateOfOtherShape"], "--rule {mod}:StateOfOtherShape: forward's new state 'm' must be a floating "
         "(1, 3) tensor for 3 coordinates (state_spec), got a (1, 1) float32 tensor"),
        (["--rule", "{mod}:StepOnly"], "--rule {mod}:StepOnly: forward must return (step, new_state), a tensor and a dict; "
         "got a (3,) float32 tensor"),
        (["--rule", "{mod}:NaNStep"], "--rule {mod}:NaNStep: forward's step on 3 random gradients holds NaN or Inf"),
        (["--rule", "{mod}:NoMetaParameters"], "--rule {mod}:NoMetaParameters: it has no nn.Parameter to meta-train"),
        (["--rule", "{mod}:SpecOfTuples"], "--rule {mod}:SpecOfTuples: state_spec() must return a dict of name -> "
         "StateSpec, got {'m': (1,)}"),
        (["--rule", "{mod}:ConstructorRaises"], "--rule {mod}:ConstructorRaises: building it raised RuntimeError: no such "
         "layer"),
    ],
)
def test_a_bad_own_rule_is_one_line_and_exit_code_2(tmp_path: Path, capsys, own_rule: str, extra, message) -> None:  # noqa: ANN001
    argv = ["meta-train", "--out", str(tmp_path / "run"), "--meta-steps", "1", "--quiet"]
    assert main(argv + [e.replace("{mod}", own_rule) for e in extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.replace("{mod}", own_rule) in err, err
    assert not (tmp_path / "run").exists()


def test_resume_on_other_mnist_files_is_refused_and_a_copy_of_them_resumes(tmp_path: Path, capsys) -> None:
    """--data may move on --resume (where the files are), not change what they hold: the steps run
    before the checkpoint read the first files, so the run would be neither one nor the other."""
    first, other = write_fake_mnist(tmp_path / "a", n=60), write_fake_mnist(tmp_path / "b", n=60, seed=2)
    argv = ["meta-train", "--task", "mnist-mlp", "--unroll", "2", "--horizon", "4", "--meta-batch", "2",
            "--meta-steps", "2", "--checkpoint-every", "1", "--quiet", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main([*argv, "--data", str(first), "--stop-after", "1"]) == 0
    assert main([*argv, "--data", str(other), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume: the checkpoint's run read other MNIST files" in err, err
    assert [r["step"] for r in log_lines(tmp_path / "run")] == [1]  # nothing was run or written
    moved = shutil.copytree(first, tmp_path / "moved")
    assert main([*argv, "--data", str(moved), "--resume"]) == 0
    assert [r["step"] for r in log_lines(tmp_path / "run")] == [1, 2]


def test_a_resume_before_the_first_checkpoint_is_refused_with_other_options(tmp_path: Path, capsys) -> None:
    """A run killed before its first checkpoint records its configuration (``config.json``), and
    ``--resume`` compares with it as with a checkpoint's: it silently started the run again under
    other options (another --seed, --meta-lr, --task, ...), replacing the log of the run the user
    meant to continue. The options the run began with resume it; the free ones may change."""
    out = tmp_path / "run"
    args = ("--meta-steps", "4", "--checkpoint-every", "3")
    assert run(out, *args, "--stop-after", "2") == 0
    assert not (out / "checkpoint.pt").exists()
    begun = (out / "log.jsonl").read_text()
    capsys.readouterr()
    for changed, shown in ((("--seed", "1"), "--seed: 0 -> 1"), (("--meta-lr", "0.5"), "--meta-lr: 0.01 -> 0.5"),
                           (("--unroll", "10"), "--unroll: 5 -> 10"), (("--task", "regression"), "--task: 'quadratic' -> 'regression'")):  # fmt: skip
        assert run(out, *args, *changed, "--resume") == 2, changed
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"differs from the one the run in {out} began with ({shown})" in err, err
        assert (out / "log.jsonl").read_text() == begun  # nothing replaced
    recorded = (out / "config.json").read_bytes()
    (out / "config.json").write_text('{"config": ')  # edited: a one-line refusal, not a traceback
    assert run(out, *args, "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume: cannot read {out / 'config.json'}: " in err, err
    (out / "config.json").write_bytes(recorded)
    assert run(out, *args, "--meta-steps", "5", "--resume") == 0  # the length is free, as after a checkpoint
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3, 4, 5]


def test_a_resume_accepts_the_settings_of_the_run_given_explicitly(tmp_path: Path, capsys) -> None:
    """A setting given on ``--resume`` as the value the run used without it (``--select-tasks``
    equal to ``--meta-batch``, a ``--rule-config`` of the class's defaults, a mixture member's
    weight of 1) runs the same, and was refused as a change (``--select-tasks: None -> 4``);
    real changes are still refused, naming both values as the run takes them."""
    from learnedopt.meta.loop import ConfigError, _load_checkpoint, _save_checkpoint
    from learnedopt.meta.train import MetaTrainConfig

    path = tmp_path / "checkpoint.pt"
    for begun, same in (
        (MetaTrainConfig(select_every=2), {"select_tasks": 8}),
        (MetaTrainConfig(select_every=2, select_tasks=8), {"select_tasks": None}),
        (MetaTrainConfig(), {"rule_config": {"hidden_size": 20, "momentum_decays": []}}),
        (MetaTrainConfig(rule_config={"hidden_size": 20, "num_layers": 3}), {"rule_config": {"num_layers": 3}}),
        (MetaTrainConfig(task="mlp-random+quadratic"), {"task": "mlp-random:1+quadratic:01"}),
    ):
        _save_checkpoint(path, begun, {}, 1)
        _load_checkpoint(path, dataclasses.replace(begun, **same))
    for begun, other, shown in (
        (MetaTrainConfig(select_every=2), {"select_tasks": 4}, "--select-tasks: 8 -> 4"),
        (MetaTrainConfig(), {"rule_config": {"hidden_size": 8}}, "--rule-config: None -> {'hidden_size': 8}"),
        (MetaTrainConfig(task="mlp-random+quadratic"), {"task": "mlp-random:2+quadratic"},
         "--task: 'mlp-random+quadratic' -> 'mlp-random:2+quadratic'"),
    ):
        _save_checkpoint(path, begun, {}, 1)
        with pytest.raises(ConfigError, match=re.escape(f"differs from the checkpoint's ({shown})") + "$"):
            _load_checkpoint(path, dataclasses.replace(begun, **other))

    out, args = tmp_path / "run", ("--meta-steps", "3", "--checkpoint-every", "1", "--select-every", "1")
    assert run(out, *args, "--stop-after", "1") == 0
    assert run(out, *args, "--stop-after", "2", "--resume", "--select-tasks", "4", "--rule-config", '{"hidden_size": 20}') == 0
    assert run(out, *args, "--resume", "--meta-lr", "1e-2", "--unroll", "05", "--seed", "00") == 0  # other spellings of the numbers
    assert [r["step"] for r in log_lines(out)] == [1, 2, 3]


def test_a_resume_takes_the_preset_file_by_another_path_to_the_same_weights(tmp_path: Path, monkeypatch, capsys) -> None:
    """``--preset`` given on ``--resume`` by another path to the file the run began from (absolute
    for relative, ``./`` before it, a copy of it) starts the same run, and was refused as a change
    of ``--preset``; a file of other weights is still refused, after a checkpoint or before one."""
    from learnedopt import save_weights
    from learnedopt.weights import build_preset

    monkeypatch.chdir(tmp_path)
    save_weights(build_preset("l2l-2016")[0], tmp_path / "mine.safetensors")
    shutil.copyfile(tmp_path / "mine.safetensors", tmp_path / "copy.safetensors")
    rule, _ = build_preset("l2l-2016")
    with torch.no_grad():
        next(iter(rule.parameters())).add_(1.0)
    save_weights(rule, tmp_path / "other.safetensors")
    for stop, out in (("1", tmp_path / "early"), ("2", tmp_path / "late")):  # before and after the first checkpoint
        args = ("--preset", "mine.safetensors", "--meta-steps", "4", "--checkpoint-every", "2")
        assert run(out, *args, "--stop-after", stop) == 0
        assert (out / "checkpoint.pt").exists() == (stop == "2")
        capsys.readouterr()
        assert run(out, *args, "--preset", "other.safetensors", "--resume") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "(--preset: 'mine.safetensors' -> 'other.safetensors')" in err, err
        for same in (str(tmp_path / "mine.safetensors"), "./mine.safetensors", "copy.safetensors"):
            assert run(out, *args, "--preset", same, "--stop-after", "3", "--resume") == 0, capsys.readouterr().err
        assert run(out, *args, "--resume") == 0


def test_resume_before_the_first_checkpoint_on_other_mnist_files_is_refused(tmp_path: Path, capsys) -> None:
    """As after a checkpoint: a run killed before its first one records the SHA-256 of the files
    it read with its configuration, and ``--resume`` on other files was a silent run on them."""
    first, other = write_fake_mnist(tmp_path / "a", n=60), write_fake_mnist(tmp_path / "b", n=60, seed=2)
    out = tmp_path / "run"
    argv = ["meta-train", "--task", "mnist-mlp", "--unroll", "2", "--horizon", "4", "--meta-batch", "2",
            "--meta-steps", "2", "--checkpoint-every", "2", "--quiet", "--out", str(out)]  # fmt: skip
    assert main([*argv, "--data", str(first), "--stop-after", "1"]) == 0
    assert not (out / "checkpoint.pt").exists()
    capsys.readouterr()
    assert main([*argv, "--data", str(other), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume: the run in {out} read other MNIST files" in err, err
    assert [r["step"] for r in log_lines(out)] == [1]  # nothing was run or written
    moved = shutil.copytree(first, tmp_path / "moved")
    assert main([*argv, "--data", str(moved), "--resume"]) == 0
    assert [r["step"] for r in log_lines(out)] == [1, 2]


def test_the_configuration_a_run_began_with_reads_back_equal_through_json(tmp_path: Path) -> None:
    """``config.json`` writes a tuple of a ``rule_config`` given through the API as a JSON list:
    a resume of that run before its first checkpoint was refused as a change of it
    (``--rule-config: {'momentum_decays': [0.9]} -> {'momentum_decays': (0.9,)}``)."""
    from learnedopt.meta.loop import ConfigError, _check_begun_config, _write_begun_config
    from learnedopt.meta.train import MetaTrainConfig

    config = MetaTrainConfig(rule_config={"momentum_decays": (0.9,), "rms_decays": (0.999,)}, meta_lr=1e-3)
    _write_begun_config(tmp_path, config, object())
    _check_begun_config(tmp_path, config, object())
    with pytest.raises(ConfigError, match=re.escape("(--rule-config: {'momentum_decays': [0.9], 'rms_decays': [0.999]} -> "
                                                    "{'momentum_decays': [0.5], 'rms_decays': [0.999]})")):  # fmt: skip
        _check_begun_config(tmp_path, dataclasses.replace(config, rule_config={"momentum_decays": (0.5,), "rms_decays": (0.999,)}),
                            object())  # fmt: skip


def test_a_run_given_paths_as_path_objects_records_them_as_strings_and_resumes(tmp_path: Path) -> None:
    """``data`` and ``preset`` given through the API as ``pathlib.Path``: the run recorded the
    objects, and its checkpoint could not be read back (``torch.load(weights_only=True)``
    refuses a ``PosixPath``), nor its configuration written as JSON; the configurations hold
    them as strings."""
    from learnedopt import save_weights
    from learnedopt.meta.fewshot import FewShotConfig, fewshot_defaults
    from learnedopt.meta.train import MetaTrainConfig, meta_train
    from learnedopt.weights import build_preset

    start = tmp_path / "mine.safetensors"
    save_weights(build_preset("l2l-2016")[0], start)
    config = MetaTrainConfig(rule=None, preset=start, data=None, unroll=5, horizon=10, meta_batch=4, meta_steps=2)
    assert config.preset == str(start) and MetaTrainConfig(data=tmp_path).data == str(tmp_path)
    assert FewShotConfig(algo="maml", task="omniglot", **fewshot_defaults("maml", "omniglot", None), data=tmp_path).data == str(tmp_path)
    assert FewShotConfig(algo="meta-lstm", task="sinusoid", **fewshot_defaults("meta-lstm", "sinusoid", None), preset=start).preset == str(start)
    out = tmp_path / "run"
    assert not meta_train(config, out, checkpoint_every=1, max_steps=1, progress=False).finished
    assert meta_train(config, out, checkpoint_every=1, resume=True, progress=False).finished


@pytest.mark.parametrize("command", ["meta-train", "evaluate"])
def test_a_bad_compiler_timeout_is_refused_before_the_run(command: str, tmp_path: Path, capsys, monkeypatch) -> None:
    """``LEARNEDOPT_CXX_TIMEOUT=nan`` was read at the first step's kernel build: meta-train stopped
    there with a 68-line traceback (exit 1), as LEARNEDOPT_COMPILE and LEARNEDOPT_CPU_KERNEL no longer do."""
    monkeypatch.setenv("LEARNEDOPT_CXX_TIMEOUT", "nan")
    monkeypatch.setenv("LEARNEDOPT_CPU_KERNEL", "1")
    if command == "meta-train":
        argv = ["meta-train", *FAST, "--meta-steps", "1", "--out", str(tmp_path / "run")]
    else:
        argv = ["evaluate", "optimizers", "--quick", "--problems", "quadratic-20", "--stability-steps", "0", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: LEARNEDOPT_CXX_TIMEOUT='nan': use the seconds one compile" in err, err
    assert not (tmp_path / "run").exists()
