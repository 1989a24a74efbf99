"""Multi-process meta-training and the optimizers under FSDP, on 2 CPU processes (gloo) launched
with ``torchrun`` (``python -m torch.distributed.run``); the per-rank program is
``distributed_worker.py``. One launch runs every algorithm and the FSDP checks (the
module-scoped fixture), three more test a killed rank, the resumed run and a stalled rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_worker import META_RUNS, meta_args
from safetensors.torch import load_file

from learnedopt.cli import main
from learnedopt.meta import loop, train
from learnedopt.meta.loop import MACHINE_FIELDS
from learnedopt.meta.distributed import SINGLE, Workers
from learnedopt.meta.fewshot import FewShotLearner, load_learner

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(mode: str, out: Path, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """Run the worker on 2 processes; returns the finished process and its wall time in seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(WORKER), mode, str(out)]  # fmt: skip
    began = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    return result, time.monotonic() - began


def tail(result: subprocess.CompletedProcess) -> str:
    return f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    name = "weights.safetensors" if (folder / "weights.safetensors").exists() else "model.safetensors"
    return load_file(str(folder / name))


def log_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two_ranks")
    result, _ = torchrun("meta", out)
    assert result.returncode == 0, tail(result)
    return out


# ----------------------------------------------------------------------------- meta-training
@pytest.mark.parametrize("name", list(META_RUNS))
def test_two_ranks_give_the_meta_parameters_of_one_rank(two_ranks: Path, tmp_path: Path, name: str) -> None:
    """2 ranks x 2 tasks against 1 rank x 4 tasks (``--meta-batch 4`` is the global batch).

    The two runs differ only in the order of floating-point sums (each rank's mean over 2 tasks,
    then the all-reduce, against one mean over 4 tasks: relative differences ~1e-7 per sum), and
    Adam normalises each meta-update, so after a few meta-updates the meta-parameters agree to
    ~1e-6 relative; training moved them by far more than the tolerance.
    """
    one = tmp_path / name
    assert main(meta_args(name, one)) == 0
    two = two_ranks / name
    got, expected = weights_of(two), weights_of(one)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    assert [r["step"] for r in log_of(two)] == [r["step"] for r in log_of(one)]
    for a, b in zip(log_of(two), log_of(one), strict=True):
        assert a["meta_loss"] == pytest.approx(b["meta_loss"], rel=1e-5)
        assert ("select_loss" in a) == ("select_loss" in b)  # --select-every runs
        if "select_loss" in b:
            assert a["select_loss"] == pytest.approx(b["select_loss"], rel=1e-5)
    if "--select-every" in META_RUNS[name]:  # the ranks agreed on what to keep, as one rank does
        selected = [read_header(folder)["selected_step"] for folder in (two, one)]
        assert selected[0] == selected[1], selected
    assert "It ran on 2 processes under `torchrun`" in (two / "MODEL_CARD.md").read_text()
    assert "processes under `torchrun`" not in (one / "MODEL_CARD.md").read_text()
    # not vacuous: meta-training moved the meta-parameters far beyond the tolerance
    initial = initial_weights(name, one)
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    assert moved > 1e-3


def read_header(folder: Path) -> dict:
    from safetensors import safe_open

    name = "weights.safetensors" if (folder / "weights.safetensors").exists() else "model.safetensors"
    with safe_open(str(folder / name), framework="pt") as f:
        metadata = f.metadata()
    return json.loads(metadata.get("learnedopt") or metadata["learnedopt_model"])


def initial_weights(name: str, folder: Path) -> dict[str, torch.Tensor]:
    """The meta-parameters run ``name`` (seed 3) started from."""
    if name == "lstm":
        return train.initial_rule(train.MetaTrainConfig(seed=3)).state_dict()
    learner, _ = load_learner(folder / "model.safetensors")
    return FewShotLearner(learner.spec, seed=3).tensors()


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_keeps_the_status_and_the_buffered_output(world_size: str) -> None:
    """Under torchrun (WORLD_SIZE 2) the process ends by ``os._exit``, which drops whatever
    stdout still buffers unless it is flushed first; with output block-buffered into a pipe
    (no PYTHONUNBUFFERED) the printed line must still arrive."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"WORLD_SIZE": world_size}
    code = "from learnedopt.meta.distributed import exit_process; print('all written'); exit_process(3)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert (result.returncode, result.stdout) == (3, "all written\n"), result.stderr


def test_meta_batch_must_split_over_the_ranks() -> None:
    assert Workers(rank=1, world_size=2).share(4) == slice(2, 4)
    assert SINGLE.share(3) == slice(0, 3)
    with pytest.raises(ValueError, match="--meta-batch 3 does not split evenly over 2 processes"):
        Workers(rank=0, world_size=2).share(3)
    with pytest.raises(loop.ConfigError, match="use a multiple of 2"):
        loop.check_shares(3, Workers(rank=0, world_size=2))


# ----------------------------------------------------------------------------- FSDP
@pytest.mark.parametrize("optimizer", ["LSTMOptimizer", "MetaLSTMOptimizer"])
def test_fsdp_sharded_steps_equal_unsharded_steps_and_checkpoint(two_ranks: Path, optimizer: str) -> None:
    """``fully_shard`` over 2 ranks with shards of unequal size (and an empty one): 3 steps give
    bit-identical parameters and states to 3 unsharded steps; the optimizer state saved with
    ``torch.distributed.checkpoint`` and loaded into a fresh sharded optimizer continues
    bit-identically, while the same fresh optimizer without the loaded state does not."""
    report = json.loads((two_ranks / "optimizers.json").read_text())["fsdp"][optimizer]
    assert report["shard_sizes"] == [18, 3, 10, 2, 3, 1]  # rank 0's; rank 1 holds 12, 2, 5, 1, 0, 0
    assert report["params_equal"] and report["states_equal"]
    assert report["resumed_equal"]
    assert not report["fresh_equal"]
    assert report["plain_resumed_equal"]  # the sharded checkpoint continues in an unsharded model too
    # torch.distributed.checkpoint's consolidated form works too (state_dtype is saved by name)
    layers = 2 if optimizer == "LSTMOptimizer" else 1
    shapes = [[5, 6], [5], [3, 5], [3], [1, 3], [1]]
    assert report["full_state_dict_shapes"] == [[layers, *shape, 20] for shape in shapes]
    if optimizer == "MetaLSTMOptimizer":  # a NaN loss on one rank: both skip together, no hang
        assert report["one_rank_nan_loss_skipped"]
    assert report["one_shard_nan_skips_the_whole_tensor"]  # under nan_policy="skip"


@pytest.mark.parametrize("optimizer", ["LSTMOptimizer", "MetaLSTMOptimizer"])
def test_ddp_model_steps_like_one_process_on_the_averaged_gradient(two_ranks: Path, optimizer: str) -> None:
    """A ``DistributedDataParallel`` model, each rank on its own data: 3 steps match one process
    stepping on the mean gradient. DDP sums gradients pre-divided by the world size, in the same
    order as the reference, so the match is exact up to the all-reduce's summation order (with
    two ranks: none)."""
    gap = json.loads((two_ranks / "optimizers.json").read_text())["ddp"][optimizer]
    assert gap == 0.0


# ----------------------------------------------------------------------------- failures
def test_a_killed_rank_fails_the_job_fast_and_resume_continues_exactly(two_ranks: Path, tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed at meta-step 3 (the checkpoint is at step 2): the job ends at once
    with torchrun naming the rank and the signal; ``--resume`` then finishes the run with the
    meta-parameters and log of the uninterrupted 2-rank run, bit for bit. Resumed on one process
    instead, it matches to the tolerance of the 2-rank-against-1-rank test."""
    out = tmp_path / "lstm"
    result, seconds = torchrun("kill", out)
    assert result.returncode != 0, tail(result)
    assert seconds < 60, f"the job took {seconds:.0f} s to fail"
    assert "SIGKILL" in result.stderr and "rank      : 1" in result.stderr, tail(result)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert [r["step"] for r in log_of(out)] == [1, 2]
    # the same checkpoint also resumes on one process (the state does not depend on the ranks)
    alone = tmp_path / "alone"
    shutil.copytree(out, alone)
    assert main([*meta_args("lstm", alone), "--resume"]) == 0
    one_rank, two_ranks_done = weights_of(alone), weights_of(two_ranks / "lstm")
    for key in two_ranks_done:
        torch.testing.assert_close(one_rank[key], two_ranks_done[key], rtol=1e-4, atol=1e-6, msg=key)

    result, _ = torchrun("resume", out)
    assert result.returncode == 0, tail(result)
    finished, uninterrupted = weights_of(out), weights_of(two_ranks / "lstm")
    assert all(torch.equal(finished[k], uninterrupted[k]) for k in uninterrupted)
    def measured(records):  # the run's own fields: not wall-clock and memory
        return [{k: v for k, v in r.items() if k not in MACHINE_FIELDS} for r in records]

    assert measured(log_of(out)) == measured(log_of(two_ranks / "lstm"))


def test_a_stalled_rank_fails_the_job_after_the_timeout(tmp_path: Path) -> None:
    """Rank 1 stops answering at meta-step 3 (alive, so torchrun does not notice): rank 0's
    all-reduce gives up after ``--dist-timeout 4`` and the job ends with one clear line."""
    result, seconds = torchrun("hang", tmp_path / "lstm")
    assert result.returncode != 0, tail(result)
    assert seconds < 60, f"the job took {seconds:.0f} s to fail"
    assert "rank 0 of 2: a collective failed (another rank died, or did not arrive within 4 s)" in result.stderr
    assert "continue the job from the last checkpoint with --resume" in result.stderr


def test_a_non_finite_meta_loss_on_one_rank_stops_every_rank_with_its_reason(tmp_path: Path) -> None:
    """Rank 1's meta-loss is NaN at meta-step 3, rank 0's finite: both ranks see the verdict
    and stop with the meta-training error (not a collective timeout)."""
    result, _ = torchrun("nan", tmp_path / "lstm")
    assert result.returncode != 0, tail(result)
    assert "meta-step 3: the meta-loss is not finite on every rank" in result.stderr, tail(result)
    assert "a collective failed" not in result.stderr, tail(result)

