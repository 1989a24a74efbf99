"""Multi-process meta-training and the optimizers under FSDP, on 2 CPU processes (gloo; 3 for one check) launched
with ``torchrun`` (``python -m torch.distributed.run``); the per-rank program is
``distributed_worker.py``. One launch runs every algorithm and the FSDP checks (the
module-scoped fixture), another (a few seconds) the optimizers as users combine them with
``torch.distributed`` (the ``usage`` fixture), more test a killed rank, the resumed run and a
stalled rank. The
last section tests the collectives' wrappers and the sharding helpers in this one process (with
``torch.distributed``'s collectives stood in for, or a one-process group).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import socket
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
from learnedopt.meta.distributed import SINGLE, DistributedError, Workers
from learnedopt.meta.fewshot import FewShotLearner, load_learner

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(mode: str, out: Path, timeout: float = 300, processes: int = 2) -> tuple[subprocess.CompletedProcess, float]:
    """Run the worker on ``processes`` processes; returns the finished process and its wall time in seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
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
    if name == "lstm":  # an update rule's weight file records them too
        assert (read_header(two)["processes"], read_header(one)["processes"]) == (2, 1)
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


@pytest.mark.parametrize("optimizer", ["LSTMOptimizer", "MetaLSTMOptimizer"])
def test_a_two_rank_fsdp_checkpoint_loads_in_one_process_without_a_process_group(two_ranks: Path, optimizer: str) -> None:
    """The worker's ``torch.distributed.checkpoint`` of a 2-rank FSDP optimizer, loaded by the
    README's recipe into an unsharded model in this one process (no process group), gives
    the states saved, bit for bit, and the next step gives the parameters the 2 ranks reached."""
    import torch.distributed.checkpoint as dcp
    from distributed_worker import _model, _train
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    import learnedopt

    assert not dist.is_initialized()
    reference = torch.load(two_ranks / f"dcp-{optimizer}.pt", weights_only=True)
    model = _model(0)
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference["params"], strict=True):
            p.copy_(q)
    opt = getattr(learnedopt, optimizer)(model.parameters())
    opt.init_state()
    state = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=str(two_ranks / f"dcp-{optimizer}"))
    set_optimizer_state_dict(model, opt, state["optim"])
    loaded = opt.state_dict()["state"]
    assert {i: set(entry) for i, entry in loaded.items()} == {i: set(entry) for i, entry in reference["states"].items()}
    assert all(torch.equal(loaded[i][k], v) for i, entry in reference["states"].items() for k, v in entry.items())
    _train(model, opt, 1, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference["after"], strict=True))


@pytest.mark.parametrize("optimizer", ["LSTMOptimizer", "MetaLSTMOptimizer"])
def test_zero_redundancy_optimizer_on_two_ranks_steps_like_the_whole_model_and_resumes(two_ranks: Path, optimizer: str) -> None:
    """``ZeroRedundancyOptimizer`` on 2 ranks, each owning some parameters (see ``zero_checks``
    in the worker): 3 steps give the parameters of the optimizer stepping the whole DDP model,
    bit for bit, and the state consolidated on rank 0 loads on both ranks and continues
    exactly (the load raised "the parameter changed size" before)."""
    report = json.loads((two_ranks / "optimizers.json").read_text())["zero"][optimizer]
    assert report == {"gap": 0.0, "owners": [0, 1], "resumed_equal": True}


def test_sharded_states_load_from_other_placements_and_nan_verdicts_follow_the_meshes(two_ranks: Path) -> None:
    """Beyond FSDP's one 1-D mesh (see ``sharding_checks`` in the worker): a state dict with
    replicated states loads into the sharded optimizer (redistributed to its shards); the NaN
    verdict on a 2-D mesh reaches the rank that differs on its second dimension; tensors on
    different meshes are judged over their own mesh each; a parameter with FSDP2's
    ``_StridedShard`` placement (FSDP over tensor parallelism) gives its states in
    ``state_dict()`` (a ValueError before), as the full tensor's."""
    report = json.loads((two_ranks / "optimizers.json").read_text())["sharding"]
    assert report == {
        "replicated_state_loads": True,
        "verdict_spans_every_mesh_dim": True,
        "meshes_judged_apart": True,
        "strided_states_equal": True,
    }


@pytest.fixture(scope="module")
def usage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bool]:
    """The worker's ``usage`` checks on 2 ranks (one launch, a few seconds)."""
    out = tmp_path_factory.mktemp("usage")
    result, _ = torchrun("usage", out, timeout=120)
    assert result.returncode == 0, tail(result)
    return json.loads((out / "usage.json").read_text())


@pytest.mark.parametrize("optimizer", ["LSTMOptimizer", "MetaLSTMOptimizer", "Adam"])
@pytest.mark.parametrize(
    "check",
    ["nested fully_shard", "full state dict resumes", "DDP bucket views and static graph", "ZeRO with a rank owning nothing"],
)
def test_the_optimizers_under_torch_distributed_wrappers_as_users_combine_them(
    usage: dict[str, bool], optimizer: str, check: str
) -> None:
    """See ``wrapper_checks`` in the worker: nested ``fully_shard`` (``reshard_after_forward``
    True and False) steps like one process; the consolidated state (``full_state_dict=True,
    cpu_offload=True``, on rank 0) loaded with ``broadcast_from_rank0`` resumes bit for bit; DDP
    with gradient bucket views and a static graph steps like plain DDP; ZeRO where one rank owns
    no parameter steps, consolidates and resumes. Adam alongside, as the behaviour to match."""
    assert usage[f"{optimizer}: {check}"]


@pytest.mark.parametrize("optimizer", ["LSTMOptimizer", "MetaLSTMOptimizer", "Adam"])
@pytest.mark.parametrize(
    "case", ["partial grad, replicated param", "replicated grad, sharded param", "sharded grad, replicated param"]
)
def test_a_gradient_placed_otherwise_than_its_parameter_steps_on_the_full_gradient(
    usage: dict[str, bool], optimizer: str, case: str
) -> None:
    """Tensor parallelism leaves a replicated parameter's gradient ``Partial`` (each rank holds a
    part of the sum); the step read each rank's local part as the gradient, so the replicated
    parameter took another step than the full gradient gives (and its copies could part),
    and a gradient sharded where its parameter is replicated failed part-way through the step
    with a size mismatch. ``torch.optim.Adam`` steps on the full gradient (DTensor's operations
    redistribute it); the learned optimizers now too, bit for bit."""
    assert usage[f"{optimizer}: {case}"]



@pytest.mark.parametrize("optimizer", ["LSTMOptimizer", "MetaLSTMOptimizer", "Adam"])
def test_ranks_whose_optimizers_list_other_sharded_parameters_step_like_one_process(
    usage: dict[str, bool], optimizer: str
) -> None:
    """A rank that leaves its empty FSDP shards out of its optimizer (Adam steps such lists
    like one process): the NaN/Inf verdict's all-reduce had as many flags as the rank's own
    sharded parameters, so the ranks' collectives differed in size and gloo aborted the
    process at the first step. The ranks now agree first on one summary of fixed size; steps
    give the unsharded parameters bit for bit, and a NaN in a gradient only one rank lists
    skips the mesh's parameters on every rank, which then step on together."""
    assert usage[f"{optimizer}: empty shards left out on one rank"]
    if optimizer != "Adam":
        assert usage[f"{optimizer}: a NaN where the lists differ skips on every rank"]



def test_ranks_listing_other_tensors_of_a_mesh_in_equal_numbers_never_take_another_tensors_verdict(tmp_path: Path) -> None:
    """3 ranks (see ``verdict_checks`` in the worker). Where the ranks list equal numbers of a
    mesh's tensors, the verdicts were combined by position in each rank's list, so rank 2's
    NaN in B (its first tensor) skipped A on ranks 0 and 1, which stepped B on a finite verdict:
    B's shards parted. Now each rank's list of (global shape, placements) is compared as well,
    and where the lists differ every tensor of the mesh is skipped on every rank (as where the
    counts differ); where they agree, only the non-finite tensor is."""
    result, _ = torchrun("verdicts", tmp_path, timeout=120, processes=3)
    assert result.returncode == 0, tail(result)
    everyone = json.loads((tmp_path / "verdicts.json").read_text())
    # a tensor's verdict is the same on every rank that lists it, False where any shard is NaN
    assert [r["same lists"] for r in everyone] == [{"A": True, "B": False, "C": True}] * 3
    for case in ("equal counts, other tensors", "equal counts, NaN on a rank listing the others"):
        assert [r[case] for r in everyone] == [{"A": False, "B": False, "C": False}] * 2 + [
            {"B": False, "C": False, "D": False}
        ], case
    # lists judged apart: only the list holding the NaN is affected, all of it where it differs
    assert [r["lists, NaN in the list alike"] for r in everyone] == [
        {"A": False, "B": True, "C": True, "D": True}, {"A": False, "B": True, "C": True}, {"A": False, "B": True, "C": True}
    ]
    assert [r["lists, NaN in the list that differs"] for r in everyone] == [
        {"A": True, "B": True, "C": False, "D": False}, {"A": True, "B": True, "C": False}, {"A": True, "B": True, "C": False}
    ]


def test_a_param_group_holding_no_parameter_of_a_mesh_on_one_rank_steps_with_the_others(tmp_path: Path) -> None:
    """3 ranks (see ``group_mesh_checks`` in the worker): rank 2 leaves its empty shard of ``B``
    out, so its second param group holds no parameter of the mesh. The NaN/Inf verdicts were
    agreed group by group, and rank 2 made no all-reduce for that group: the others waited for
    it (gloo's timeout, here 20 s, failed them) while rank 2 went on. The verdicts of every group
    are now agreed together, over every mesh the optimizer holds on each rank: both steps run,
    and the NaN in rank 0's shard of ``B`` skips ``B`` on ranks 0 and 1 while ``A`` steps."""
    result, _ = torchrun("groups", tmp_path, timeout=150, processes=3)
    assert result.returncode == 0, tail(result)
    everyone = json.loads((tmp_path / "groups.json").read_text())
    assert [r["step 0"] for r in everyone] == [{"A": True, "B": True}] * 2 + [{"A": True}]
    assert [r["step 1"] for r in everyone] == [{"A": True, "B": False}] * 2 + [{"A": True}]


def test_parameters_on_equal_meshes_are_judged_together_whatever_mesh_objects_each_rank_holds(
    usage: dict[str, bool],
) -> None:
    """The NaN/Inf verdict grouped sharded tensors by the identity of their ``DeviceMesh``
    object, but DTensor's caches give equal meshes as other objects on each rank (an FSDP
    model's parameters came out on one mesh object per layer on one rank): ranks holding
    other numbers of mesh objects made other numbers of all-reduces, and the job hung. Tensors
    are now grouped by equal meshes; see ``equal_mesh_checks`` in the worker."""
    assert usage["LSTMOptimizer: equal meshes judged as one"]


def test_a_rank_on_which_no_parameter_has_a_gradient_joins_the_others_nan_verdict(usage: dict[str, bool]) -> None:
    """Rank 1 leaves its empty shard of ``B`` out of its optimizer; in a step where only ``B``
    has a gradient no parameter of rank 1's optimizer has one. That step returned at once, as
    ``torch.optim``'s do, while rank 0 waited for it in the NaN/Inf verdict's all-reduce (gloo's
    timeout failed it; a later collective of rank 1 could have been taken for it). A rank without
    gradients now joins the verdict: ``B`` steps on rank 0, is skipped where its gradient is NaN,
    and ``A`` then steps on both ranks like the full tensor. See ``no_gradient_checks`` in the worker."""
    assert usage["LSTMOptimizer: a rank without gradients joins the others' step"]


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


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_checkpointed_meta_step(tmp_path: Path) -> None:
    """Rank 1 alone gets SIGTERM during meta-step 3 (the checkpoints are every 2): both ranks
    finish step 3, rank 0 checkpoints it, and both stop with code 143 instead of rank 0 waiting
    in the next collective for a rank that has gone."""
    out = tmp_path / "lstm"
    result, seconds = torchrun("term", out)
    assert result.returncode != 0, tail(result)
    assert seconds < 60, f"the job took {seconds:.0f} s to stop"
    assert "stopped by SIGTERM after meta-step 3 of 4" in result.stderr, tail(result)
    assert "exitcode  : 143" in result.stderr and "a collective failed" not in result.stderr, tail(result)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert [r["step"] for r in log_of(out)] == [1, 2, 3]


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



def test_a_check_that_fails_on_one_rank_only_is_reported_and_stops_every_rank(tmp_path: Path) -> None:
    """``--resume`` where rank 1's ``--out`` holds no checkpoint (an output folder not shared
    between machines): rank 1's own refusal is the job's error line, named by its rank, and both
    ranks stop with code 2. Before, only rank 0 printed refusals, so the user saw just rank 0's
    collective failing and the advice to ``--resume``, the command that had failed."""
    out = tmp_path / "lstm"
    assert main([*meta_args("lstm", out), "--stop-after", "2"]) == 0
    result, seconds = torchrun("elsewhere", out)
    assert result.returncode != 0, tail(result)
    assert seconds < 60, f"the job took {seconds:.0f} s to fail"
    assert f"error: rank 1 of 2: --resume: no checkpoint at {tmp_path / 'elsewhere' / 'checkpoint.pt'}" in result.stderr, tail(result)
    assert "a collective failed" not in result.stderr, tail(result)
    assert result.stderr.count("learnedopt meta-train: error:") == 1, tail(result)
    assert "exitcode  : 1" not in result.stderr, tail(result)  # every rank ends as a refused configuration


def test_ranks_resuming_checkpoints_of_other_content_are_refused(tmp_path: Path) -> None:
    """Rank 1's ``--out`` holds a copy of the checkpoint at the same meta-step whose
    meta-parameters differ (a stale or edited copy where ``--out`` is not shared): the ranks
    would continue from other meta-parameters, so the job is refused; before, it ran, and rank
    0 wrote its own weights."""
    out = tmp_path / "lstm"
    assert main([*meta_args("lstm", out), "--stop-after", "2"]) == 0
    (tmp_path / "elsewhere").mkdir()
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    rule = payload["trainer"]["rule"] if "trainer" in payload else payload["rule"]
    next(iter(rule.values())).add_(1e-3)
    torch.save(payload, tmp_path / "elsewhere" / "checkpoint.pt")
    result, _ = torchrun("elsewhere", out)
    assert result.returncode != 0, tail(result)
    assert "error: the ranks were given different options (the meta-parameters and meta-training state: " in result.stderr, tail(result)
    assert "weights.safetensors" not in {p.name for p in out.iterdir()}


def test_ranks_given_different_options_are_refused_before_the_run(tmp_path: Path) -> None:
    """Rank 0 is given ``--seed 3``, rank 1 ``--seed 4`` (a library caller's or a launcher's
    slip): the ranks would start from other meta-parameters and draw other tasks, and their
    averaged meta-gradients train neither run; before, such a job ran to the end and rank 0
    wrote its weights as if nothing were wrong. Now it is refused before anything is written."""
    out = tmp_path / "lstm"
    result, _ = torchrun("seeds", out)
    assert result.returncode != 0, tail(result)
    assert "error: the ranks were given different options (--seed: 3 on rank 0 vs 4 on rank 1)" in result.stderr, tail(result)
    assert not out.exists()



def test_a_torchrun_job_given_cuda_n_is_refused_on_every_rank_before_the_run(tmp_path: Path) -> None:
    """``learnedopt meta-train --device cuda:0`` under ``torchrun`` (2 processes, 2 GPUs stood
    in for): every rank would run on GPU 0; before, that was accepted. Now the job stops with
    the one-line refusal, said once, before anything is written."""
    out = tmp_path / "lstm"
    result, _ = torchrun("cuda-index", out)
    assert result.returncode != 0, tail(result)
    message = ("learnedopt meta-train: error: --device cuda:0: every one of the 2 processes would run on cuda:0; use "
               "--device cuda, which runs each process on the GPU of its local rank")  # fmt: skip
    assert result.stderr.count(message) == 1, tail(result)
    assert not out.exists()


def test_a_resume_on_ranks_that_do_not_split_the_meta_batch_names_the_counts_that_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A run's --meta-batch (and --select-tasks) is fixed once it began, so a ``--resume`` on 3
    processes of a run with --meta-batch 4 is told the numbers of processes that can continue it;
    it was told to "use a multiple of 3", which the resumed run then refused as another
    configuration. A new run is still told to change --meta-batch."""
    monkeypatch.setattr(dist, "all_gather_object", lambda into, value, *a, **k: into.__setitem__(slice(None), [value] * len(into)))
    three = Workers(rank=0, world_size=3)
    config = train.MetaTrainConfig(unroll=2, horizon=2, meta_steps=2, meta_batch=4)
    with pytest.raises(loop.ConfigError, match=r"^--resume: the run's --meta-batch 4 does not split evenly over 3 "
                       r"processes: continue it on 1, 2 or 4 processes$"):  # fmt: skip
        train.meta_train(config, tmp_path / "run", resume=True, workers=three, progress=False)
    selecting = dataclasses.replace(config, meta_batch=12, select_every=1, select_tasks=8)
    with pytest.raises(loop.ConfigError, match=r"--select-tasks 8 does not split evenly over 3 processes: "
                       r"continue it on 1, 2 or 4 processes$"):  # fmt: skip
        train.meta_train(selecting, tmp_path / "run", resume=True, workers=three, progress=False)
    with pytest.raises(loop.ConfigError, match=r"^--meta-batch 4 does not split evenly over 3 processes; use a multiple of 3$"):
        train.meta_train(config, tmp_path / "new", workers=three, progress=False)



# ----------------------------------------------------------------------------- in one process
class _OtherRank:
    """Stands in for ``torch.distributed`` under a :class:`Workers` of 2 ranks in one process:
    ``all_reduce`` adds the other rank's ``contribution`` (a function of the tensor it gets),
    ``barrier`` is counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, contribution=torch.zeros_like) -> None:  # noqa: ANN001
        self.reduced: list[torch.Tensor] = []
        self.barriers = 0
        self.contribution = contribution
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)
        monkeypatch.setattr(dist, "barrier", self.barrier)

    def all_reduce(self, tensor: torch.Tensor, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.reduced.append(tensor.clone())
        tensor.add_(self.contribution(tensor))

    def barrier(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.barriers += 1


def test_gradients_are_averaged_over_the_ranks_and_a_missing_one_counts_as_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 of 2, the other rank's gradients all 1: each ``.grad`` becomes the mean (not the
    sum, which Adam's normalisation would all but hide in the two-rank runs); a parameter this
    rank has no gradient for takes part with zeros (the ranks must reduce the same tensors)."""
    other = _OtherRank(monkeypatch, torch.ones_like)
    a, b = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))
    a.grad = torch.full((2, 3), 3.0)
    Workers(rank=0, world_size=2).average_gradients_([a, b])
    assert len(other.reduced) == 1 and other.reduced[0].numel() == 10  # one collective for both
    torch.testing.assert_close(a.grad, torch.full((2, 3), 2.0), rtol=0, atol=0)
    torch.testing.assert_close(b.grad, torch.full((4,), 0.5), rtol=0, atol=0)
    # one process: nothing reduced, and a missing gradient stays missing (an optimizer skips it)
    c = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.full((2, 3), 3.0)
    SINGLE.average_gradients_([a, c])
    assert c.grad is None and torch.equal(a.grad, torch.full((2, 3), 3.0))
    assert len(other.reduced) == 1


def test_a_frozen_parameter_takes_no_part_in_gradient_averaging(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen rule parameter keeps ``grad=None`` on every rank (a zero gradient would let AdamW's
    weight decay move it) and is not reduced."""
    other = _OtherRank(monkeypatch, torch.ones_like)
    a, frozen = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(2), requires_grad=False)
    a.grad = torch.full((3,), 3.0)
    Workers(rank=0, world_size=2).average_gradients_([a, frozen])
    assert frozen.grad is None and other.reduced[0].numel() == 3
    torch.testing.assert_close(a.grad, torch.full((3,), 2.0), rtol=0, atol=0)
    meta_optimizer = torch.optim.AdamW([a, frozen], lr=0.1, weight_decay=0.5)
    meta_optimizer.step()
    assert torch.equal(frozen, torch.ones(2))
    # one frozen with a gradient left from before (on this rank only) is left out too: the ranks
    # must reduce the same tensors, which requires_grad, the same on every rank, decides
    frozen.grad = torch.full((2,), 5.0)
    Workers(rank=0, world_size=2).average_gradients_([a, frozen])
    assert other.reduced[1].numel() == 3 and torch.equal(frozen.grad, torch.full((2,), 5.0))


def test_sums_and_means_over_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    other = _OtherRank(monkeypatch, lambda t: torch.full_like(t, 10.0))
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])
    two = Workers(rank=1, world_size=2)
    two.all_reduce_sum_([x, y])
    assert torch.equal(x, torch.tensor([11.0, 12.0])) and torch.equal(y, torch.tensor([[13.0]]))
    two.all_reduce_sum_([])  # nothing to sum: no collective (and no torch.cat of nothing)
    assert len(other.reduced) == 1
    assert two.mean(4.0) == 7.0


def test_a_flag_on_any_rank_is_seen_by_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM reaching one rank stops every rank after the same meta-step: ``any`` agrees."""
    assert Workers().any(True) and not Workers().any(False)  # one process: no collective
    other = _OtherRank(monkeypatch, torch.zeros_like)  # the other rank's flag: false
    assert Workers(rank=0, world_size=2).any(True)
    assert not Workers(rank=0, world_size=2).any(False)
    _OtherRank(monkeypatch, torch.ones_like)  # the other rank's flag: true
    assert Workers(rank=1, world_size=2).any(False)
    assert len(other.reduced) == 2


def test_a_non_finite_value_on_any_rank_stops_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """The verdict is the ranks' together: a rank whose own value is finite stops too when the
    other rank's is not."""
    finite_elsewhere = _OtherRank(monkeypatch, torch.ones_like)  # the other rank: finite
    Workers(rank=0, world_size=2).require_finite("the meta-loss", torch.tensor([1.0, -2.0]))
    with pytest.raises(FloatingPointError, match=r"^the meta-loss is not finite on every rank \(rank 0's: nan\)$"):
        Workers(rank=0, world_size=2).require_finite("the meta-loss", float("nan"))
    assert len(finite_elsewhere.reduced) == 2
    _OtherRank(monkeypatch, torch.zeros_like)  # the other rank: not finite
    with pytest.raises(FloatingPointError, match=r"^the support loss is not finite on every rank \(rank 0's: 1.0\)$"):
        Workers(rank=0, world_size=2).require_finite("the support loss", 1.0)


def test_one_non_finite_element_of_a_tensor_is_enough_to_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The message shows a tensor of several values as a list (``float()`` of it raised a
    ValueError instead of the FloatingPointError)."""
    with pytest.raises(FloatingPointError, match=r"^the meta-loss is \[1.0, nan\]$"):
        SINGLE.require_finite("the meta-loss", torch.tensor([1.0, float("nan")]))
    _OtherRank(monkeypatch, torch.ones_like)  # the other rank: finite
    with pytest.raises(FloatingPointError, match=r"\(rank 0's: \[inf, 2.0\]\)$"):
        Workers(rank=0, world_size=2).require_finite("the meta-loss", torch.tensor([float("inf"), 2.0]))


def test_a_failed_collective_names_the_rank_the_timeout_and_the_first_line_of_the_cause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise RuntimeError("[gloo] Timed out waiting 4000ms for recv operation\nmore detail\nand more")

    monkeypatch.setattr(dist, "all_reduce", fail)
    monkeypatch.setattr(dist, "barrier", fail)
    expected = ("rank 1 of 2: a collective failed (another rank died, or did not arrive within {}): "
                "[gloo] Timed out waiting 4000ms for recv operation")  # fmt: skip
    with pytest.raises(DistributedError) as raised:
        Workers(rank=1, world_size=2, timeout_s=4.0).all_reduce_sum_([torch.ones(2)])
    assert str(raised.value) == expected.format("4 s")
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    with pytest.raises(DistributedError) as raised:
        Workers(rank=1, world_size=2).barrier()
    assert str(raised.value) == expected.format("its timeout")


def test_the_ranks_checks_become_one_verdict_naming_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``agree_checks`` on rank 0 of 4, the other ranks' reports stood in for: refusals grouped
    by message and named by their ranks (not where every rank failed alike), and options that
    differ named with each value's ranks, the values apart by "vs" (joined by commas, as the
    ranks are, "1 on ranks 0, 1, 2 on ranks 2, 3" read as rank 2 given both); ranks that agree
    pass."""
    others: list[tuple] = []

    def gather(into: list, value: tuple, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        into[:] = [value, *others]

    monkeypatch.setattr(dist, "all_gather_object", gather)
    four = Workers(rank=0, world_size=4)
    others[:] = [("A", None), ("B", None), ("A", None)]
    with pytest.raises(loop.ConfigError, match=r"^ranks 1, 3 of 4: A; rank 2 of 4: B$"):
        loop.agree_checks(four, None, {"seed": 1})
    with pytest.raises(loop.ConfigError, match=r"^ranks 0, 1, 3 of 4: A; rank 2 of 4: B$"):
        loop.agree_checks(four, loop.ConfigError("A"))
    others[:] = [("A", None)] * 3
    with pytest.raises(loop.ConfigError, match=r"^A$"):  # every rank alike: said once, as one process says it
        loop.agree_checks(four, loop.ConfigError("A"))
    others[:] = [(None, {"seed": 1, "data_sha256": "f" * 64}), (None, {"seed": 2, "data_sha256": "f" * 64}),
                 (None, {"seed": 2, "data_sha256": "e" * 64})]  # fmt: skip
    with pytest.raises(loop.ConfigError, match=r"^the ranks were given different options \(the data files' SHA-256: "
                       r"f{12} on ranks 0, 1, 2 vs e{12} on rank 3; --seed: 1 on ranks 0, 1 vs 2 on ranks 2, 3\)"):  # fmt: skip
        loop.agree_checks(four, None, {"seed": 1, "data_sha256": "f" * 64})
    others[:] = [(None, {"seed": 1})] * 3
    loop.agree_checks(four, None, {"seed": 1})


def test_the_barrier_waits_for_the_other_ranks_only_when_there_are_some(monkeypatch: pytest.MonkeyPatch) -> None:
    other = _OtherRank(monkeypatch)
    SINGLE.barrier()
    assert other.barriers == 0
    Workers(rank=1, world_size=2).barrier()
    assert other.barriers == 1


def test_each_rank_unrolls_its_share_of_the_meta_batch() -> None:
    """Every rank draws the whole meta-batch and unrolls only its contiguous share: rank ``r`` of
    2 the tasks ``2r, 2r + 1`` of 4, whose losses are those of one process's episode."""
    from learnedopt.meta.tasks import generator_for

    config = train.MetaTrainConfig(unroll=2, horizon=3, meta_batch=4)
    family, rule = train._family(config, "meta_train"), train.initial_rule(config).requires_grad_(False)
    whole, _ = train.episode(rule, family, config, generator_for(0, 2))
    for rank in (0, 1):
        part, _ = train.episode(rule, family, config, generator_for(0, 2), workers=Workers(rank=rank, world_size=2))
        assert part.shape == (3, 2)
        torch.testing.assert_close(part, whole[:, 2 * rank : 2 * rank + 2], rtol=1e-6, atol=0)


def test_a_failed_collective_ends_the_command_with_code_1_and_no_final_barrier(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    """Another rank died or hung: ``meta-train`` exits with code 1 (not a configuration's 2)
    and one line pointing at ``--resume``, and leaves the group without the final barrier,
    which the missing rank would never reach."""
    from learnedopt.meta import command, distributed

    waits = []
    monkeypatch.setattr(distributed, "shutdown", lambda *, wait_for_all: waits.append(wait_for_all))

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - meta_train's signature
        raise DistributedError("rank 0 of 2: a collective failed")

    with monkeypatch.context() as patch:
        patch.setattr(command, "meta_train", failing)
        assert main(["meta-train", "--quiet", "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == (
        "learnedopt meta-train: error: rank 0 of 2: a collective failed; continue the job from the last "
        "checkpoint with --resume\n"
    )
    assert waits == [False]
    assert main(["meta-train", "--quiet", "--out", str(tmp_path / "done"), *"--unroll 1 --horizon 1 --meta-batch 2 --meta-steps 1".split()]) == 0
    assert waits == [False, True]  # a finished run waits for every rank before leaving


def test_shutdown_leaves_only_the_group_init_from_env_created(monkeypatch: pytest.MonkeyPatch) -> None:
    """``init_from_env`` under a (one-process) torchrun environment creates the default group with
    its timeout, and ``shutdown`` waits at a barrier (unless told not to) and destroys it; a group
    the caller created is used as it is and survives ``shutdown``, also after an earlier one."""
    import socket

    from learnedopt.meta import distributed

    assert not dist.is_initialized()
    assert distributed.current() is SINGLE  # no group: one process, no torch.distributed call
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(distributed, "_timeout_s", None)
    waits: list[bool] = []
    monkeypatch.setattr(Workers, "barrier", lambda self: waits.append(True))
    try:
        for wait_for_all in (True, False):
            assert distributed.init_from_env(timeout_s=7.0) == Workers(0, 1, 7.0)
            assert dist.is_initialized()
            distributed.shutdown(wait_for_all=wait_for_all)
            assert not dist.is_initialized()
            assert waits == [True]  # only the first shutdown waited
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        assert distributed.init_from_env() == distributed.current() == Workers(0, 1, 7.0)
        distributed.shutdown()
        assert dist.is_initialized()  # the caller's group is the caller's to destroy
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_more_processes_than_gpus_run_on_the_cpu_and_a_process_seeing_one_gpu_runs_cuda_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Local rank 1 of a torchrun job on a machine with 1 CUDA device: joining the job pinned
    the process to CUDA device 1, which does not exist, so a CPU run of 2 processes on a
    1-GPU machine failed with "cannot join the torchrun job: ... invalid device ordinal". Now
    only a rank with a GPU of its own is pinned to it. A ``--device cuda`` (or ``cuda:0``) run
    of a process that sees one GPU runs on it whatever its local rank: a launcher that binds one
    GPU to each process (``CUDA_VISIBLE_DEVICES``, SLURM's ``--gpus-per-task=1``) gives every
    process one, and it was refused as "local rank 1 has no CUDA device of its own"; ranks that
    share it are refused by their GPU agreement instead
    (test_ranks_that_would_share_one_gpu_are_refused_before_the_run)."""
    from learnedopt.meta import distributed

    pinned: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", pinned.append)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: None)
    monkeypatch.setattr(distributed, "current", lambda: Workers(1, 2))
    monkeypatch.setattr(distributed, "_owns_group", False)
    monkeypatch.setattr(distributed, "_timeout_s", None)
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.init_from_env() == Workers(1, 2)
    assert pinned == []
    config = train.MetaTrainConfig(unroll=2, horizon=2, meta_batch=2, device="cuda")
    for device in ("cuda", "cuda:0"):
        assert loop.check_run(dataclasses.replace(config, device=device), 1, Workers(1, 2)) == Workers(1, 2)
        assert loop.check_device(device, world_size=2, local_rank=1, cuda_count=1) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.init_from_env() == Workers(1, 2)
    assert pinned == [0]


def test_each_rank_resolves_cuda_to_the_gpu_of_its_local_rank_and_an_explicit_index_is_refused() -> None:
    """The device a process runs on, for a given world size and local rank (no GPU needed: the
    number of CUDA devices is given). Under several processes ``cuda`` is the local rank's GPU
    and ``cuda:N`` is refused: ``torchrun`` gives every rank the same options, so every rank
    ran on GPU N; before, that was accepted. One process keeps ``cuda:N``."""
    check = loop.check_device
    assert check("cuda", world_size=2, local_rank=1, cuda_count=2) == torch.device("cuda", 1)
    assert check("cuda", world_size=8, local_rank=0, cuda_count=1) == torch.device("cuda", 0)  # 8 machines
    assert check("cuda", world_size=2, cuda_count=2) == torch.device("cuda")  # a caller's group: its current device
    assert check("cpu", world_size=2, local_rank=1, cuda_count=0) == torch.device("cpu")
    for device, rank in (("cuda:0", 1), ("cuda:1", 1), ("cuda:0", None)):
        with pytest.raises(loop.ConfigError, match=rf"^--device {device}: every one of the 2 processes would run on "
                           rf"{device}; use --device cuda, which runs each process on the GPU of its local rank$"):  # fmt: skip
            check(device, world_size=2, local_rank=rank, cuda_count=2)
    assert check("cuda", world_size=4, local_rank=3, cuda_count=1) == torch.device("cuda", 0)  # one GPU bound to each
    assert check("cuda:0", world_size=4, local_rank=3, cuda_count=1) == torch.device("cuda", 0)
    with pytest.raises(loop.ConfigError, match=r"^--device cuda:1: this machine has 1 CUDA device\(s\)$"):
        check("cuda:1", world_size=2, local_rank=1, cuda_count=1)  # not "every one of the 2 processes would run on cuda:1"
    with pytest.raises(loop.ConfigError, match=r"^--device cuda: local rank 2 has no CUDA device of its own \(this "
                       r"machine has 2 for 4 processes\): start at most 2 processes per machine"):  # fmt: skip
        check("cuda", world_size=4, local_rank=2, local_world_size=4, cuda_count=2)
    assert check("cuda:1", cuda_count=2) == torch.device("cuda", 1)
    with pytest.raises(loop.ConfigError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\)$"):
        check("cuda:2", cuda_count=2)
    with pytest.raises(loop.ConfigError, match=r"^--device cuda: CUDA is not available to this torch"):
        check("cuda", world_size=2, local_rank=0, cuda_count=0)


def test_a_torchrun_job_given_an_explicit_cuda_index_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """``learnedopt meta-train --device cuda:0`` on every rank of a 2-process job on a 2-GPU
    machine: ``check_run`` refuses it on every rank (before, both ranks ran on GPU 0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    config = train.MetaTrainConfig(unroll=2, horizon=2, meta_batch=2, device="cuda:0")
    with pytest.raises(loop.ConfigError, match=r"^--device cuda:0: every one of the 2 processes would run on cuda:0; "):
        loop.check_run(config, 1, Workers(1, 2))
    assert loop.check_run(dataclasses.replace(config, device="cuda"), 1, Workers(1, 2)) == Workers(1, 2)


def test_ranks_on_the_cpu_and_on_cuda_are_refused_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller's job whose rank 0 is given ``device="cpu"`` and rank 1 ``"cuda"``: each
    collective would run on gloo on one rank and NCCL on the other and hang until the timeout;
    before, the ranks' checks agreed (the device was a rank's own). Now the kind of device is
    part of what the ranks agree on; the data folder and ``cpu`` against ``cpu:0`` are not."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # CUDA stood in for
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"GPU-{i}"))
    trainer = SimpleNamespace(state_dict=dict, data_sha256=None)
    config = train.MetaTrainConfig(unroll=2, horizon=2, meta_batch=2)

    def identity(**changes: str) -> dict:
        return loop.run_identity(dataclasses.replace(config, **changes), trainer)

    assert identity(device="cpu") == identity(device="cpu:0") == identity(data="/elsewhere")
    assert identity(device="cpu") != identity(device="cuda")
    monkeypatch.setattr(dist, "all_gather_object", lambda into, value: into.__setitem__(
        slice(None), [value, (None, identity(device="cuda"))]))  # fmt: skip
    with pytest.raises(loop.ConfigError, match=r"^the ranks were given different options \(--device: 'cpu' on rank 0 vs "
                       r"'cuda' on rank 1\): "):  # fmt: skip
        loop.agree_checks(Workers(0, 2), None, identity(device="cpu"))


def test_ranks_that_would_share_one_gpu_are_refused_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller's own process group whose ranks pass ``device="cuda"`` without
    ``torch.cuda.set_device``: every rank ran on its current device, GPU 0, side by side (and
    NCCL fails on a GPU shared by two ranks). Now the ranks compare the UUIDs of their GPUs
    (CUDA stood in for) and refuse a GPU named by more than one rank; distinct GPUs (each
    process seeing its own as ``cuda:0``, or other machines) and CPU runs pass."""
    from types import SimpleNamespace

    current = [0]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"GPU-{i}"))
    assert loop.gpu_identity("cuda") == "GPU-0" and loop.gpu_identity("cuda:1") == "GPU-1"
    assert loop.gpu_identity("cpu") is None
    trainer = SimpleNamespace(state_dict=dict, data_sha256=None)
    config = train.MetaTrainConfig(unroll=2, horizon=2, meta_batch=2, device="cuda")
    mine = loop.run_identity(config, trainer)
    assert mine["gpu"] == "GPU-0"
    others: list = []
    monkeypatch.setattr(dist, "all_gather_object", lambda into, value: into.__setitem__(slice(None), [value, *others]))
    three = Workers(0, 3)
    others[:] = [(None, {**mine, "gpu": "GPU-1"}), (None, mine)]
    with pytest.raises(loop.ConfigError, match=r"^ranks 0, 2 of 3 would run on one GPU \(GPU-0\): each rank needs a GPU "
                       r"of its own; under torchrun give --device cuda with at most one process per GPU; in a process "
                       r"group of your own call torch.cuda.set_device\(local_rank\) first$"):  # fmt: skip
        loop.agree_checks(three, None, mine)
    others[:] = [(None, {**mine, "gpu": "GPU-1"}), (None, {**mine, "gpu": "GPU-2"})]
    loop.agree_checks(three, None, mine)
    cpu = loop.run_identity(dataclasses.replace(config, device="cpu"), trainer)
    others[:] = [(None, cpu)] * 2
    loop.agree_checks(three, None, cpu)


def test_gpu_identity_without_a_uuid_names_the_gpu_by_its_pci_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch gives no GPU UUID, two processes each bound to a GPU of their own (each seeing
    it as ``cuda:0`` through ``CUDA_VISIBLE_DEVICES``) were both named ``host/cuda:0`` and refused
    as sharing one GPU. The PCI address names the GPU whichever index the process sees it at."""
    from types import SimpleNamespace

    monkeypatch.setattr(socket, "gethostname", lambda: "node7")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    bus = [0x41]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        uuid=None, pci_domain_id=0, pci_bus_id=bus[0], pci_device_id=0))  # fmt: skip
    first = loop.gpu_identity("cuda")
    bus[0] = 0x81  # the other process's GPU, also its cuda:0
    assert first == "node7/pci:0000:41:00" and loop.gpu_identity("cuda") == "node7/pci:0000:81:00"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace())  # neither: as before
    assert loop.gpu_identity("cuda:1") == "node7/cuda:1"


def test_state_placements_shift_shards_past_the_leading_dimensions_and_keep_replicas() -> None:
    """A state ``(*lead, *param.shape, *trail)`` is sharded on the parameter's dimension moved by
    ``len(lead)`` (not by ``len(trail)``); a replicated dimension stays replicated; a partial
    (pending-sum) parameter is refused; FSDP2's ``_StridedShard`` keeps its split factor."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from learnedopt.nn import StateSpec
    from learnedopt.optim.sharding import state_placements

    param = SimpleNamespace(placements=(Replicate(), Shard(1)))  # 2-D mesh: HSDP-like
    assert state_placements(param, StateSpec((2,))) == (Replicate(), Shard(2))
    assert state_placements(param, StateSpec((2, 3), (20,))) == (Replicate(), Shard(3))
    strided = SimpleNamespace(placements=(_StridedShard(0, split_factor=2), Shard(0)))  # FSDP2 over TP
    assert state_placements(strided, StateSpec((2,), (20,))) == (_StridedShard(1, split_factor=2), Shard(1))
    with pytest.raises(ValueError, match="Shard/_StridedShard/Replicate placements, got"):
        state_placements(SimpleNamespace(placements=(Shard(0), Partial())), StateSpec((1,), (4,)))


def test_a_sharded_parameter_refuses_a_saved_state_of_another_shape() -> None:
    """On a one-process mesh: a ``DTensor`` state of the wrong global shape, and a plain tensor
    that is not the local flat state, are refused with messages that say what fits."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from learnedopt.nn import StateSpec
    from learnedopt.optim import sharding

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = distribute_tensor(torch.randn(5, 6), mesh, [Shard(0)])
        spec = StateSpec((2,), (4,))
        state = torch.randn(2, 30, 4)
        saved = sharding.to_global(state, param, spec)
        assert tuple(saved.shape) == (2, 5, 6, 4) and tuple(saved.placements) == (Shard(1),)
        assert torch.equal(sharding.to_local(saved, param, spec, "h"), state)
        assert torch.equal(sharding.to_local(state, param, spec, "h"), state)  # already local and flat
        wrong = distribute_tensor(torch.randn(2, 6, 5, 4), mesh, [Shard(1)])
        with pytest.raises(ValueError, match=r"^h has global shape \(2, 6, 5, 4\), expected \(2, 5, 6, 4\) for a sharded"):
            sharding.to_local(wrong, param, spec, "h")
        with pytest.raises(ValueError, match=r"h is a plain \(2, 5, 6, 4\) tensor; a sharded \(5, 6\) parameter"):
            sharding.to_local(torch.randn(2, 5, 6, 4), param, spec, "h")
    finally:
        dist.destroy_process_group()


def test_the_nan_verdict_reduces_over_meshes_in_an_order_every_rank_shares(monkeypatch) -> None:
    """``agree_finite`` makes its all-reduces mesh by mesh. A rank may leave a tensor whose shard
    is empty out of its optimizer, so the mesh of its first tensor can be another than on the
    other ranks: reduced in the order the tensors first name them, one rank would wait in one
    mesh's all-reduce while another waits in the other's. The order is now the meshes' own (here
    on one process: two meshes, listed either way round, are reduced in one order)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from learnedopt.optim import sharding

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        meshes = [init_device_mesh("cpu", (1,), mesh_dim_names=(name,)) for name in ("dp", "tp")]
        first, second = (distribute_tensor(torch.randn(4), mesh, [Shard(0)]) for mesh in meshes)
        reduced: list[tuple[str, ...]] = []
        real = sharding._all_reduce_over
        monkeypatch.setattr(
            sharding, "_all_reduce_over", lambda mesh, tensor, op: (reduced.append(mesh.mesh_dim_names), real(mesh, tensor, op))
        )
        orders = []
        for tensors, finite in (([first, second], [True, False]), ([second, first], [False, True])):
            reduced.clear()
            assert sharding.agree_finite(tensors, finite) == finite
            orders.append(list(reduced))
        # each mesh's summary, then the flags of the mesh holding the non-finite tensor
        assert orders[0] == orders[1] and sorted(orders[0]) == [("dp",), ("tp",), ("tp",)]
    finally:
        dist.destroy_process_group()


def _readme_checkpoint_round_trip(build, make_optimizer, folder: Path, planner=None) -> tuple:
    """The README's ``torch.distributed.checkpoint`` recipe in one process (no process group):
    2 steps, save, load (with ``planner``) into a fresh model and optimizer; returns both
    (model, optimizer) pairs after one more step of each on the same data."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        optimizer.zero_grad()
        loss = model(torch.randn(5, 3, generator=g)).square().mean()
        loss.backward()
        optimizer.step(loss=loss.detach())

    model = build()
    optimizer = make_optimizer(model)
    for seed in range(2):
        train(model, optimizer, seed)
    dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder))
    restored_model = build()
    with torch.no_grad():
        for p, q in zip(restored_model.parameters(), model.parameters(), strict=True):
            p.copy_(q)
    restored = make_optimizer(restored_model)
    restored.init_state()
    state = {"optim": get_optimizer_state_dict(restored_model, restored)}
    dcp.load(state, checkpoint_id=str(folder), planner=planner)
    set_optimizer_state_dict(restored_model, restored, state["optim"])
    for m, o in ((model, optimizer), (restored_model, restored)):
        train(m, o, 2)
    return (model, optimizer), (restored_model, restored)


@pytest.mark.parametrize("optimizer", ["LSTMOptimizer", "MetaLSTMOptimizer"])
def test_the_readme_checkpoint_recipe_works_with_a_frozen_parameter(tmp_path: Path, optimizer: str) -> None:
    """A frozen layer gets no gradient, so no step gives it a state and the checkpoint holds
    none; ``init_state()`` gave it one, and ``dcp.load`` then failed with "Missing key in
    checkpoint state_dict". Now it is skipped, and the loaded optimizer continues exactly."""
    import learnedopt

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        model[0].requires_grad_(False)
        return model

    cls = getattr(learnedopt, optimizer)
    (model, _), (restored_model, restored) = _readme_checkpoint_round_trip(build, lambda m: cls(m.parameters()), tmp_path)
    assert [p in restored.state for p in restored_model.parameters()] == [False, False, True, True]
    assert all(torch.equal(p, q) for p, q in zip(restored_model.parameters(), model.parameters(), strict=True))


@pytest.mark.parametrize("optimizer", ["LSTMOptimizer", "MetaLSTMOptimizer"])
def test_the_readme_checkpoint_recipe_with_a_partial_load_for_a_parameter_without_gradients(
    tmp_path: Path, optimizer: str
) -> None:
    """A trainable parameter that the loss never used had no gradient, so no state in the
    checkpoint (as with torch.optim), while ``init_state()`` gives it one: the strict load fails
    with "Missing key", and the README's partial load keeps the fresh state its first step would
    make. Training then continues exactly."""
    import torch.distributed.checkpoint as dcp

    import learnedopt

    class WithUnusedHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.unused = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return WithUnusedHead()

    cls = getattr(learnedopt, optimizer)
    with pytest.raises(dcp.api.CheckpointException, match="Missing key"):
        _readme_checkpoint_round_trip(build, lambda m: cls(m.parameters()), tmp_path / "strict")
    (model, optimizer_), (restored_model, restored) = _readme_checkpoint_round_trip(
        build, lambda m: cls(m.parameters()), tmp_path / "partial", dcp.DefaultLoadPlanner(allow_partial_load=True)
    )
    assert all(torch.equal(p, q) for p, q in zip(restored_model.parameters(), model.parameters(), strict=True))
    fresh = cls(build().unused.parameters())
    fresh.init_state()
    for p, q in zip(restored_model.unused.parameters(), fresh.param_groups[0]["params"], strict=True):
        assert restored.state[p].keys() == fresh.state[q].keys()
        assert all(torch.equal(restored.state[p][k], fresh.state[q][k]) for k in fresh.state[q])
    for p, q in zip(restored_model.body.parameters(), model.body.parameters(), strict=True):
        assert all(torch.equal(restored.state[p][k], optimizer_.state[q][k]) for k in optimizer_.state[q])


@pytest.mark.parametrize("flatten", [False, True])
def test_a_distributed_checkpoint_refuses_an_optimizer_with_other_weights(tmp_path: Path, flatten: bool) -> None:
    """``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups``, so the rule's
    fingerprint at the top of ``state_dict()`` was dropped and the README's recipe loaded the
    states of one rule's weights into an optimizer running another's. The param groups' copy
    of the fingerprint keeps the check; the same weights still load. With
    ``flatten_optimizer_state_dict`` torch rebuilds each loaded group from the keys of the live
    groups, which did not hold the copy: it loaded other weights' states in silence."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

    from learnedopt import LSTMOptimizer

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2)

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model = build()
    optimizer = LSTMOptimizer(model.parameters(), weights="l2l-short")
    model(torch.ones(4, 3)).square().mean().backward()
    optimizer.step()
    dcp.save({"optim": get_optimizer_state_dict(model, optimizer, options=options)}, checkpoint_id=str(tmp_path))
    for weights in ("l2l-random", "l2l-short"):  # the same architecture, other weights; the same
        fresh_model = build()
        fresh = LSTMOptimizer(fresh_model.parameters(), weights=weights)
        fresh.init_state()
        state = {"optim": get_optimizer_state_dict(fresh_model, fresh, options=options)}
        dcp.load(state, checkpoint_id=str(tmp_path))
        if weights == "l2l-random":
            with pytest.raises(ValueError, match="saved by an optimizer with other weights"):
                set_optimizer_state_dict(fresh_model, fresh, state["optim"], options=options)
        else:
            set_optimizer_state_dict(fresh_model, fresh, state["optim"], options=options)
            assert json.loads(fresh.param_groups[0]["learned_rule"]) == fresh.state_dict()["learned_rule"]
            assert all(torch.equal(fresh.state[p]["h"], optimizer.state[q]["h"])
                       for p, q in zip(fresh_model.parameters(), model.parameters(), strict=True))  # fmt: skip


def test_meta_lstm_optimizer_takes_a_dtensor_loss_as_its_value() -> None:
    """Under tensor parallelism the loss is a ``DTensor`` (replicated: the same on every rank);
    ``step(loss=...)`` failed inside the update with "got mixed torch.Tensor and DTensor". It
    now steps as with the plain loss (here on a one-process mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from learnedopt import MetaLSTMOptimizer

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 6)) for _ in range(2)]
        optimizers = [MetaLSTMOptimizer([p]) for p in params]
        losses = [torch.tensor(0.75), distribute_tensor(torch.tensor(0.75), mesh, [Replicate()])]
        for p, optimizer, loss in zip(params, optimizers, losses, strict=True):
            p.grad = torch.linspace(0.5, -0.5, 6)
            optimizer.step(loss=loss)
        assert torch.equal(params[1], params[0]) and not torch.equal(params[0], torch.linspace(-1, 1, 6))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["LSTMOptimizer", "MetaLSTMOptimizer"])
def test_zero_redundancy_optimizer_loading_a_nan_state_is_refused_by_the_next_step(optimizer: str) -> None:
    """``ZeroRedundancyOptimizer.load_state_dict`` puts each saved state into its local
    optimizer's ``state[p]`` itself, past ``load_state_dict``'s NaN/Inf check: a NaN state turned
    its parameter NaN at the next step, in silence. That step refuses it, naming it as
    ``load_state_dict`` does, and changes no parameter."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import learnedopt

    cls = getattr(learnedopt, optimizer)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    def train(zero: ZeroRedundancyOptimizer) -> None:
        zero.zero_grad()
        loss = model(torch.randn(5, 3, generator=torch.Generator().manual_seed(0))).square().mean()
        loss.backward()
        zero.step(loss=loss.detach())

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls)
        train(zero)
        zero.consolidate_state_dict()
        saved = copy.deepcopy(zero.state_dict())
        saved["state"][2]["c"][(0,) * saved["state"][2]["c"].dim()] = float("nan")
        restored = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls)
        restored.load_state_dict(saved)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=r"^state \['c'\] of parameter 2 \(param_groups\[0\]\['params'\]\[2\], shape \(1, 4\)\) holds NaN"):
            train(restored)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["LSTMOptimizer", "MetaLSTMOptimizer"])
def test_zero_redundancy_optimizer_resumes_exactly_from_its_consolidated_state_dict(optimizer: str) -> None:
    """``ZeroRedundancyOptimizer.load_state_dict`` puts each saved state into its local
    optimizer's ``state[p]`` itself, in the parameter's shape that ``state_dict()`` gives,
    ``(layers, *param.shape, hidden)``, not through ``load_state_dict``: the next step raised "the
    parameter changed size since its state was created" for every parameter of more than one
    dimension. Now the step takes such states, and training continues exactly (on one rank
    here; ``step(loss=...)`` reaches the optimizer through ZeRO's ``**kwargs``)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    import learnedopt

    cls = getattr(learnedopt, optimizer)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    def train(model: torch.nn.Module, zero: ZeroRedundancyOptimizer, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        zero.zero_grad()
        loss = model(torch.randn(5, 3, generator=g)).square().mean()
        loss.backward()
        zero.step(loss=loss.detach())

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = build()
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls)
        for seed in range(2):
            train(model, zero, seed)
        zero.consolidate_state_dict()
        saved = copy.deepcopy(zero.state_dict())
        restored_model = build()
        with torch.no_grad():
            for p, q in zip(restored_model.parameters(), model.parameters(), strict=True):
                p.copy_(q)
        restored = ZeroRedundancyOptimizer(restored_model.parameters(), optimizer_class=cls)
        restored.load_state_dict(saved)
        for m, o in ((model, zero), (restored_model, restored)):
            train(m, o, 2)
        assert all(torch.equal(p, q) for p, q in zip(restored_model.parameters(), model.parameters(), strict=True))
        assert all(torch.equal(restored.optim.state[p][k], zero.optim.state[q][k])
                   for p, q in zip(restored_model.parameters(), model.parameters(), strict=True)
                   for k in zero.optim.state[q])  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_zero_redundancy_optimizer_passes_the_optimizers_weights() -> None:
    """ZeroRedundancyOptimizer adds every keyword argument to each param group it gives the
    optimizer, ``weights`` too, which was refused as "weights cannot differ between param
    groups": a learned optimizer under ZeRO could only run its default weights."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from learnedopt import LSTMOptimizer

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 6)) for _ in range(2)]
        zero = ZeroRedundancyOptimizer([params[0]], optimizer_class=LSTMOptimizer, weights="l2l-short")
        plain = LSTMOptimizer([params[1]], weights="l2l-short")
        for p, optimizer in zip(params, (zero, plain), strict=True):
            p.grad = torch.linspace(0.5, -0.5, 6)
            optimizer.step()
        assert zero.optim.weights_header == plain.weights_header
        assert torch.equal(params[0], params[1]) and not torch.equal(params[0], torch.linspace(-1, 1, 6))
    finally:
        dist.destroy_process_group()


def test_zero_redundancy_optimizer_refuses_a_state_of_other_weights_at_the_next_step() -> None:
    """ZeroRedundancyOptimizer.load_state_dict assigns the saved states itself, so the
    optimizer's check of the rule's fingerprint did not run: the states of one rule's weights
    were loaded into an optimizer running another's and stepped in silence. The saved groups'
    fingerprints it copies are checked at the next step, before anything is changed."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from learnedopt import LSTMOptimizer

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        param = torch.nn.Parameter(torch.linspace(-1, 1, 6))
        zero = ZeroRedundancyOptimizer([param], optimizer_class=LSTMOptimizer, weights="l2l-short")
        param.grad = torch.linspace(0.5, -0.5, 6)
        zero.step()
        zero.consolidate_state_dict()
        saved = copy.deepcopy(zero.state_dict())
        for weights in ("l2l-random", "l2l-short"):  # the same architecture, other weights; the same
            loaded = ZeroRedundancyOptimizer([param], optimizer_class=LSTMOptimizer, weights=weights)
            loaded.load_state_dict(copy.deepcopy(saved))
            before = param.detach().clone()
            if weights == "l2l-random":
                with pytest.raises(ValueError, match="param group 0 holds the state of an optimizer with other weights"):
                    loaded.step()
                assert torch.equal(param, before)
            else:
                loaded.step()
                assert not torch.equal(param, before)
    finally:
        dist.destroy_process_group()


def test_init_from_env_refuses_a_timeout_no_timedelta_holds(monkeypatch) -> None:
    """``init_from_env(timeout_s=1e14)`` under torchrun raised OverflowError from
    ``datetime.timedelta`` (a traceback past the CLI's ValueError catch); now ValueError, before
    any process group is made."""
    import torch.distributed as dist

    from learnedopt.meta import distributed

    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("made a process group"))
    for timeout in (1e14, float("nan"), 0.0):
        with pytest.raises(ValueError, match="^timeout_s must be"):
            distributed.init_from_env(timeout_s=timeout)
