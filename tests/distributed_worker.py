"""The per-rank program of ``test_distributed.py``, launched with
``python -m torch.distributed.run --standalone --nproc_per_node=2 distributed_worker.py MODE OUT`` (3 for ``verdicts``).

Modes:
    meta OUT: ``learnedopt meta-train`` of every algorithm on 2 ranks (see :data:`META_RUNS`),
        then :func:`fsdp_checks`, :func:`ddp_checks`, :func:`sharding_checks` and
        :func:`zero_checks` (results in ``OUT/optimizers.json``).
    usage OUT: the optimizers as users of ``torch.distributed`` combine them, against
        ``torch.optim.Adam`` or one process (see :func:`usage_checks`; results in ``OUT/usage.json``).
    verdicts OUT: on 3 ranks, :func:`agree_finite`'s verdicts where the ranks list other tensors
        of one mesh in equal numbers (see :func:`verdict_checks`; results in ``OUT/verdicts.json``).
    groups OUT: on 3 ranks, param groups of which one holds no parameter of a mesh on one rank
        (see :func:`group_mesh_checks`; results in ``OUT/groups.json``).
    kill OUT: the ``lstm`` run of :data:`META_RUNS`, with rank 1 killed by SIGKILL at meta-step 3.
    hang OUT: the same, rank 1 stalls at meta-step 3 (``--dist-timeout 4``).
    term OUT: the same, rank 1 alone gets SIGTERM during meta-step 3.
    nan OUT: the same, rank 1's meta-loss is NaN at meta-step 3 (rank 0's is finite).
    resume OUT: the ``lstm`` run continued with ``--resume``.
    elsewhere OUT: the same ``--resume``, but rank 1 is given ``OUT/../elsewhere`` as its
        ``--out`` (an output folder not shared between machines: no checkpoint there).
    seeds OUT: the ``lstm`` run with ``--seed 3`` on rank 0 and ``--seed 4`` on rank 1.
    cuda-index OUT: the ``lstm`` run with ``--device cuda:0`` on both ranks, on a machine with 2
        CUDA devices stood in for (``torch.cuda.is_available`` and ``device_count``).

Not collected by pytest (no ``test_`` prefix); it imports only the library and torch.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

#: (name, arguments) of the meta-training runs; every run has --meta-batch 4 (2 tasks per rank)
META_RUNS: dict[str, list[str]] = {
    "lstm": ["--task", "quadratic", "--unroll", "3", "--horizon", "6", "--meta-steps", "4", "--select-every", "2"],
    # first-order meta-steps 1 and 2, second-order 3
    "maml": ["--algo", "maml", "--meta-steps", "3", "--meta-lr", "0.01", "--first-order-until", "2"],
    "fomaml": ["--algo", "fomaml", "--meta-steps", "3", "--meta-lr", "0.01", "--select-every", "2", "--head-only"],
    "reptile": ["--algo", "reptile", "--meta-steps", "3", "--inner-steps", "2", "--inner-batch", "4"],
    "meta-lstm": ["--algo", "meta-lstm", "--meta-steps", "3", "--inner-steps", "2"],
}
COMMON = ["--meta-batch", "4", "--checkpoint-every", "2", "--quiet", "--seed", "3"]
FEWSHOT_COMMON = ["--val-tasks", "2"]


def meta_args(name: str, out: Path) -> list[str]:
    """The ``meta-train`` arguments of run ``name`` writing to ``out``."""
    extra = FEWSHOT_COMMON if name != "lstm" else []
    return ["meta-train", *META_RUNS[name], *COMMON, *extra, "--out", str(out)]


def run_cli(args: list[str]) -> int:
    from learnedopt.cli import main

    return main(args)


def fail_at(step: int, how: str) -> None:
    """Make rank 1 die (``how="kill"``), stall (``"hang"``) or get SIGTERM (``"term"``) when it
    starts meta-step ``step``."""
    from learnedopt.meta import train

    original = train._RuleTrainer.step

    def step_or_fail(self: train._RuleTrainer, s: int) -> dict[str, float]:
        if s == step and dist.get_rank() == 1:
            if how == "term":  # to rank 1 alone, as a preempted node's processes get it
                os.kill(os.getpid(), signal.SIGTERM)
                return original(self, s)
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return original(self, s)

    train._RuleTrainer.step = step_or_fail


def nan_at(step: int) -> None:
    """Make rank 1's meta-loss NaN in meta-step ``step`` (a diverging task in its share)."""
    from learnedopt.meta import train

    original_unroll, original_step = train.truncated_unroll, train._RuleTrainer.step
    current = {"step": 0}

    def step_noting(self: train._RuleTrainer, s: int) -> dict[str, float]:
        current["step"] = s
        return original_step(self, s)

    def unroll(*args, update=None, **kwargs):  # noqa: ANN002, ANN003 - the wrapped function's
        if update is not None and current["step"] == step and dist.get_rank() == 1:
            real = update
            update = lambda loss: real(loss * float("nan"))  # noqa: E731
        return original_unroll(*args, update=update, **kwargs)

    train._RuleTrainer.step = step_noting
    train.truncated_unroll = unroll


# ----------------------------------------------------------------------------- FSDP
def _model(seed: int) -> torch.nn.Module:
    """Shapes whose first dimensions do not split evenly over 2 ranks (one rank gets 1 of 3 rows,
    and of the (1,) bias one rank gets nothing)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)
    )


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    """``steps`` steps on the same data on every rank (so FSDP's averaged gradient equals the
    one-process gradient exactly)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step(loss=loss.detach())


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def fsdp_checks(out: Path) -> dict[str, object]:
    """For both optimizers: 3 FSDP-sharded steps against 3 unsharded steps (parameters and
    states compared bit for bit), then a ``torch.distributed.checkpoint`` save of the sharded
    optimizer (in ``OUT/dcp-NAME``, with the parameters and full states at the save and the
    parameters after the next step in ``OUT/dcp-NAME.pt``), a load into a fresh sharded
    optimizer, and one more step of each."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    from learnedopt import LSTMOptimizer, MetaLSTMOptimizer
    from learnedopt.weights import UntrainedWeightsWarning

    warnings.simplefilter("ignore", UntrainedWeightsWarning)  # the presets' weights are fine here
    report: dict[str, object] = {}
    for cls in (LSTMOptimizer, MetaLSTMOptimizer):
        name = cls.__name__
        reference = _model(0)
        ref_opt = cls(reference.parameters())
        _train(reference, ref_opt, 3, seed=1)

        sharded = fully_shard(_model(0))
        opt = cls(sharded.parameters())
        _train(sharded, opt, 3, seed=1)
        shard_sizes = [p.to_local().numel() for p in sharded.parameters()]
        params_equal = all(
            torch.equal(_full(p), q) for p, q in zip(sharded.parameters(), reference.parameters(), strict=True)
        )
        ref_state = ref_opt.state_dict()["state"]
        states_equal = all(
            torch.equal(_full(value).reshape(ref_state[i][k].shape), ref_state[i][k])
            for i, entry in opt.state_dict()["state"].items()
            for k, value in entry.items()
            if k != "step"
        )

        folder = out / f"dcp-{name}"
        dcp.save({"optim": get_optimizer_state_dict(sharded, opt)}, checkpoint_id=str(folder))
        at_save = [p.full_tensor().clone() for p in sharded.parameters()]
        states_at_save = {i: {k: _full(v).clone() for k, v in entry.items()} for i, entry in opt.state_dict()["state"].items()}
        restored_model = fully_shard(_model(0))
        with torch.no_grad():  # the model's own checkpoint is not under test here
            for p, q in zip(restored_model.parameters(), sharded.parameters(), strict=True):
                p.to_local().copy_(q.to_local())
        restored = cls(restored_model.parameters())
        restored.init_state()
        template = {"optim": get_optimizer_state_dict(restored_model, restored)}
        dcp.load(template, checkpoint_id=str(folder))
        set_optimizer_state_dict(restored_model, restored, template["optim"])
        fresh_model = fully_shard(_model(0))  # control: the same parameters, no loaded state
        with torch.no_grad():
            for p, q in zip(fresh_model.parameters(), sharded.parameters(), strict=True):
                p.to_local().copy_(q.to_local())
        fresh = cls(fresh_model.parameters())
        plain_model = _model(0)  # the same checkpoint into an unsharded model on every rank
        with torch.no_grad():
            for p, q in zip(plain_model.parameters(), at_save, strict=True):
                p.copy_(q)
        plain = cls(plain_model.parameters())
        plain.init_state()
        plain_template = {"optim": get_optimizer_state_dict(plain_model, plain)}
        dcp.load(plain_template, checkpoint_id=str(folder))
        set_optimizer_state_dict(plain_model, plain, plain_template["optim"])
        for m, o in ((sharded, opt), (restored_model, restored), (fresh_model, fresh), (plain_model, plain)):
            _train(m, o, 1, seed=2)
        after = [p.full_tensor() for p in sharded.parameters()]
        if dist.get_rank() == 0:  # for the test that loads the checkpoint in one process
            torch.save({"params": at_save, "states": states_at_save, "after": after}, out / f"dcp-{name}.pt")
        plain_equal = all(
            torch.equal(p, q.full_tensor()) for p, q in zip(plain_model.parameters(), sharded.parameters(), strict=True)
        )
        resumed_equal = all(
            torch.equal(p.to_local(), q.to_local())
            for p, q in zip(restored_model.parameters(), sharded.parameters(), strict=True)
        )
        fresh_equal = all(
            torch.equal(p.full_tensor(), q.full_tensor())
            for p, q in zip(fresh_model.parameters(), sharded.parameters(), strict=True)
        )
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        full = get_optimizer_state_dict(sharded, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        report[name] = {
            "params_equal": params_equal,
            "states_equal": states_equal,
            "resumed_equal": resumed_equal,
            "fresh_equal": fresh_equal,
            "plain_resumed_equal": plain_equal,
            "shard_sizes": shard_sizes,
            "full_state_dict_shapes": [list(v["h"].shape) for v in full.get("state", {}).values()],  # rank 0 only
        }
        skipping = cls(sharded.parameters(), nan_policy="skip")
        _train(sharded, skipping, 1, seed=3)
        params = list(sharded.parameters())
        if cls is MetaLSTMOptimizer:  # a NaN loss on one rank only: every rank skips, none waits
            before = [p.to_local().clone() for p in params]
            skipping.zero_grad()
            loss = torch.nn.functional.mse_loss(sharded(torch.ones(4, 6)), torch.zeros(4, 1))
            loss.backward()
            skipping.step(loss=float("nan") if dist.get_rank() == 1 else loss.item())
            report[name]["one_rank_nan_loss_skipped"] = all(
                torch.equal(p.to_local(), b) for p, b in zip(params, before, strict=True)
            )
        # a NaN in rank 1's shard of the first gradient: the tensor is skipped as a whole (rank 0's
        # shard too), the others step
        before = [p.to_local().clone() for p in params]
        skipping.zero_grad()
        loss = torch.nn.functional.mse_loss(sharded(torch.ones(4, 6)), torch.zeros(4, 1))
        loss.backward()
        if dist.get_rank() == 1:
            params[0].grad.to_local()[0] = float("nan")
        skipping.step(loss=loss.item()) if cls is MetaLSTMOptimizer else skipping.step()
        report[name]["one_shard_nan_skips_the_whole_tensor"] = torch.equal(params[0].to_local(), before[0]) and any(
            not torch.equal(p.to_local(), b) for p, b in zip(params[1:], before[1:], strict=True)
        )
    return report


def sharding_checks() -> dict[str, bool]:
    """What FSDP's 1-D mesh and equal placements do not reach, on both ranks (all ranks must
    agree for a True):

    - ``replicated_state_loads``: an optimizer state dict whose ``DTensor`` states were
      redistributed to ``Replicate`` loads back into the sharded optimizer as its own local states;
    - ``verdict_spans_every_mesh_dim``: on a ``(1, 2)`` mesh (the ranks differ on its second
      dimension) a NaN in rank 1's part makes the tensor non-finite on both ranks;
    - ``meshes_judged_apart``: a tensor on a 1-rank sub-mesh keeps its own rank's verdict when
      judged together with one on the 2-rank mesh;
    - ``strided_states_equal``: a parameter with FSDP2's ``_StridedShard`` placement (what it
      gives a dimension that tensor parallelism shards too; here rows 0, 1, 4, 5 on rank 0) steps
      like the full tensor, and ``state_dict()`` gives its states (a ValueError before), equal to
      the full tensor's and loading back into a fresh optimizer.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from learnedopt import LSTMOptimizer
    from learnedopt.optim import sharding
    from learnedopt.weights import UntrainedWeightsWarning

    warnings.simplefilter("ignore", UntrainedWeightsWarning)
    model = fully_shard(_model(0))
    opt = LSTMOptimizer(model.parameters())
    _train(model, opt, 1, seed=4)
    saved = opt.state_dict()
    replicated = {
        **saved,
        "state": {
            index: {k: v.redistribute(v.device_mesh, [Replicate()]) if sharding.is_sharded(v) else v for k, v in entry.items()}
            for index, entry in saved["state"].items()
        },
    }
    loaded = LSTMOptimizer(model.parameters())
    try:
        loaded.load_state_dict(replicated)
    except (ValueError, RuntimeError) as err:  # reported, so that the other checks still run
        print(f"rank {dist.get_rank()}: the replicated state did not load: {err}", file=sys.stderr)
        replicated_state_loads = False
    else:
        replicated_state_loads = all(
            torch.equal(loaded.state[p][k], v)
            for p in model.parameters()
            for k, v in opt.state[p].items()
            if isinstance(v, torch.Tensor) and k != "step"
        )

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("outer", "inner"))
    across = distribute_tensor(torch.zeros(4, 3), mesh, [Replicate(), Shard(0)])
    own = distribute_tensor(torch.zeros(3), mesh["outer"], [Replicate()])  # a 1-rank mesh
    verdict = sharding.agree_finite([across, own], [rank != 1, rank != 1])

    from torch.distributed.tensor.placement_types import _StridedShard

    strided = [_StridedShard(0, split_factor=2)]
    values, grad = torch.linspace(-1, 1, 24).reshape(8, 3), torch.linspace(0.5, -0.5, 24).reshape(8, 3).flip(0)
    param, plain = torch.nn.Parameter(distribute_tensor(values, mesh["inner"], strided)), torch.nn.Parameter(values.clone())
    param.grad, plain.grad = distribute_tensor(grad, mesh["inner"], strided), grad.clone()
    strided_opt, plain_opt = LSTMOptimizer([param]), LSTMOptimizer([plain])
    strided_opt.step()
    plain_opt.step()
    try:
        saved = strided_opt.state_dict()
    except ValueError as err:  # reported, so that the other checks still run
        print(f"rank {rank}: no state_dict for a _StridedShard parameter: {err}", file=sys.stderr)
        strided_states_equal = False
    else:
        reloaded = LSTMOptimizer([param])
        reloaded.load_state_dict(saved)
        strided_states_equal = torch.equal(param.full_tensor(), plain) and all(
            torch.equal(value.full_tensor(), plain_opt.state_dict()["state"][0][k])
            and torch.equal(reloaded.state[param][k], strided_opt.state[param][k])
            for k, value in saved["state"][0].items()
            if k != "step"
        )
    mine = {
        "replicated_state_loads": replicated_state_loads,
        "verdict_spans_every_mesh_dim": verdict[0] is False,
        "meshes_judged_apart": verdict[1] is (rank != 1),
        "strided_states_equal": strided_states_equal,
    }
    everyone: list[dict[str, bool]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    return {key: all(r[key] for r in everyone) for key in mine}


def ddp_checks() -> dict[str, bool]:
    """For both optimizers: 3 steps of a DDP model, each rank on its own data, against one
    process stepping with the mean of both ranks' gradients (what DDP's all-reduce gives)."""
    from torch.nn.parallel import DistributedDataParallel

    from learnedopt import LSTMOptimizer, MetaLSTMOptimizer
    from learnedopt.weights import UntrainedWeightsWarning

    warnings.simplefilter("ignore", UntrainedWeightsWarning)
    report = {}
    world = dist.get_world_size()
    for cls in (LSTMOptimizer, MetaLSTMOptimizer):
        model = DistributedDataParallel(_model(0))
        opt = cls(model.parameters())
        reference = _model(0)
        ref_opt = cls(reference.parameters())
        for step in range(3):
            batches = [torch.randn(16, 6, generator=torch.Generator().manual_seed(100 * step + r)) for r in range(world)]
            opt.zero_grad()
            loss = model(batches[dist.get_rank()]).square().mean()
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            opt.step(loss=mean_loss / world)
            # the reference: per-rank gradients averaged as DDP does (divide, then sum)
            ref_opt.zero_grad()
            grads = [torch.zeros_like(p) for p in reference.parameters()]
            losses = []
            for x in batches:
                reference.zero_grad()
                out = reference(x).square().mean()
                out.backward()
                losses.append(out.detach())
                for acc, p in zip(grads, reference.parameters(), strict=True):
                    acc.add_(p.grad / world)
            for p, g in zip(reference.parameters(), grads, strict=True):
                p.grad = g
            ref_opt.step(loss=sum(losses) / world)
        report[cls.__name__] = max(
            float((p.detach() - q.detach()).abs().max()) for p, q in zip(model.module.parameters(), reference.parameters(), strict=True)
        )
    return report


def zero_checks() -> dict[str, object]:
    """For both optimizers under ``ZeroRedundancyOptimizer`` of a DDP model, each rank on its own
    data: 3 steps against the same optimizer stepping the whole DDP model (the largest
    difference); which ranks own parameters; then ``consolidate_state_dict`` and ``state_dict``
    on rank 0, loaded into a fresh ZeRO optimizer on both ranks, and one more step of each
    (equal on every rank for a True)."""
    import copy

    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from learnedopt import LSTMOptimizer, MetaLSTMOptimizer
    from learnedopt.weights import UntrainedWeightsWarning

    warnings.simplefilter("ignore", UntrainedWeightsWarning)
    rank, world = dist.get_rank(), dist.get_world_size()

    def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(100 * step + rank))
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        optimizer.step(loss=mean_loss / world)  # ZeRO passes step's keywords to the optimizer

    report: dict[str, object] = {}
    for cls in (LSTMOptimizer, MetaLSTMOptimizer):
        model = DistributedDataParallel(_model(0))
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls)
        whole = DistributedDataParallel(_model(0))
        whole_opt = cls(whole.parameters())
        for step in range(3):
            train(model, zero, step)
            train(whole, whole_opt, step)
        gap = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), whole.parameters(), strict=True))
        zero.consolidate_state_dict(to=0)
        saved = [copy.deepcopy(zero.state_dict()) if rank == 0 else None]  # live views otherwise
        dist.broadcast_object_list(saved, src=0)
        restored_model = DistributedDataParallel(_model(0))
        with torch.no_grad():
            for p, q in zip(restored_model.parameters(), model.parameters(), strict=True):
                p.copy_(q)
        restored = ZeroRedundancyOptimizer(restored_model.parameters(), optimizer_class=cls)
        restored.load_state_dict(saved[0])
        train(model, zero, 3)
        train(restored_model, restored, 3)
        resumed = all(torch.equal(p, q) for p, q in zip(restored_model.parameters(), model.parameters(), strict=True))
        everyone: list[object] = [None] * world
        dist.all_gather_object(everyone, (gap, resumed))
        report[cls.__name__] = {
            "gap": max(g for g, _ in everyone),
            "owners": sorted(set(zero._param_to_rank.values())),
            "resumed_equal": all(r for _, r in everyone),
        }
    return report


class _Adam(torch.optim.Adam):
    """``torch.optim.Adam`` (lr 0.01) as the checks step the learned optimizers: ``step(loss=...)``
    (Adam reads no loss), and options such as ``nan_policy`` ignored."""

    def __init__(self, params: list[torch.Tensor], **options: object) -> None:  # noqa: ARG002
        super().__init__(params, lr=0.01)

    def step(self, closure: None = None, *, loss: object = None) -> None:  # noqa: ARG002
        super().step()


def wrapper_checks() -> dict[str, bool]:
    """For both optimizers and Adam, each True where it holds on this rank:

    - ``nested fully_shard``: each Linear and the root ``fully_shard``-ed, with
      ``reshard_after_forward`` True and False: 3 steps give the unsharded parameters bit for bit;
    - ``full state dict resumes``: ``get_optimizer_state_dict`` with
      ``StateDictOptions(full_state_dict=True, cpu_offload=True)`` (the full dict on rank 0 only),
      loaded into a fresh sharded optimizer with ``broadcast_from_rank0=True``: the next 2 steps
      equal the original's bit for bit;
    - ``DDP bucket views and static graph``: ``gradient_as_bucket_view=True, static_graph=True``
      gives plain DDP's parameters bit for bit;
    - ``ZeRO with a rank owning nothing``: one parameter tensor (rank 1 owns none): 2 steps equal
      the whole DDP model's optimizer, and ``consolidate_state_dict`` on rank 0, loaded on both
      ranks, resumes exactly.
    """
    import copy

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from learnedopt import LSTMOptimizer, MetaLSTMOptimizer

    rank, world = dist.get_rank(), dist.get_world_size()

    def ddp_train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        x = torch.randn(16, model.module[0].in_features, generator=torch.Generator().manual_seed(100 * step + rank))
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        optimizer.step(loss=mean_loss / world)

    mine: dict[str, bool] = {}
    for name, cls in (("LSTMOptimizer", LSTMOptimizer), ("MetaLSTMOptimizer", MetaLSTMOptimizer), ("Adam", _Adam)):
        reference = _model(0)
        _train(reference, cls(reference.parameters()), 3, seed=1)
        equal = []
        for reshard in (True, False):
            nested = _model(0)
            for layer in nested:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, reshard_after_forward=reshard)
            fully_shard(nested, reshard_after_forward=reshard)
            _train(nested, cls(nested.parameters()), 3, seed=1)
            equal.append(all(torch.equal(_full(p), q) for p, q in zip(nested.parameters(), reference.parameters(), strict=True)))
        mine[f"{name}: nested fully_shard"] = all(equal)

        models = [fully_shard(_model(0)) for _ in range(2)]
        optimizer = cls(models[0].parameters())
        _train(models[0], optimizer, 2, seed=1)
        full = get_optimizer_state_dict(models[0], optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with torch.no_grad():
            for p, q in zip(models[1].parameters(), models[0].parameters(), strict=True):
                p.to_local().copy_(q.to_local())
        restored = cls(models[1].parameters())
        if cls is not _Adam:
            restored.init_state()
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(models[1], restored, copy.deepcopy(full) if rank == 0 else {}, options=options)
        _train(models[0], optimizer, 2, seed=5)
        _train(models[1], restored, 2, seed=5)
        mine[f"{name}: full state dict resumes"] = (rank != 0 or bool(full["state"])) and all(
            torch.equal(p.to_local(), q.to_local()) for p, q in zip(models[1].parameters(), models[0].parameters(), strict=True)
        )

        plain = DistributedDataParallel(_model(0))
        viewed = DistributedDataParallel(_model(0), gradient_as_bucket_view=True, static_graph=True)
        optimizers = [cls(plain.parameters()), cls(viewed.parameters())]
        for step in range(3):
            ddp_train(plain, optimizers[0], step)
            ddp_train(viewed, optimizers[1], step)
        mine[f"{name}: DDP bucket views and static graph"] = all(
            torch.equal(p, q) for p, q in zip(viewed.parameters(), plain.parameters(), strict=True)
        )

        def one_tensor() -> torch.nn.Module:
            torch.manual_seed(0)
            return DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(4, 1, bias=False)))

        zero_model, whole_model, restored_model = one_tensor(), one_tensor(), one_tensor()
        zero = ZeroRedundancyOptimizer(zero_model.parameters(), optimizer_class=cls)
        whole = cls(whole_model.parameters())
        for step in range(2):
            ddp_train(zero_model, zero, step)
            ddp_train(whole_model, whole, step)
        stepped_alike = torch.equal(zero_model.module[0].weight, whole_model.module[0].weight)
        zero.consolidate_state_dict(to=0)
        saved = [copy.deepcopy(zero.state_dict()) if rank == 0 else None]
        dist.broadcast_object_list(saved, src=0)
        with torch.no_grad():
            restored_model.module[0].weight.copy_(zero_model.module[0].weight)
        restored_zero = ZeroRedundancyOptimizer(restored_model.parameters(), optimizer_class=cls)
        restored_zero.load_state_dict(saved[0])
        ddp_train(zero_model, zero, 2)
        ddp_train(restored_model, restored_zero, 2)
        mine[f"{name}: ZeRO with a rank owning nothing"] = (
            stepped_alike
            and set(zero._param_to_rank.values()) == {0}
            and torch.equal(restored_model.module[0].weight, zero_model.module[0].weight)
        )
    return mine


def gradient_placement_checks() -> dict[str, bool]:
    """For both optimizers and ``torch.optim.Adam``: a ``DTensor`` parameter whose gradient has
    other placements than itself (a replicated parameter's ``Partial`` gradient, as tensor
    parallelism leaves it; a sharded parameter's replicated one; a replicated parameter's
    sharded one) steps like the full parameter on the full gradient, bit for bit (True on every
    rank for a True)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from learnedopt import LSTMOptimizer, MetaLSTMOptimizer

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    values, grad = torch.linspace(-1, 1, 8), torch.linspace(0.5, -0.3, 8)
    cases = {
        "partial grad, replicated param": ([Replicate()], [Partial()]),
        "replicated grad, sharded param": ([Shard(0)], [Replicate()]),
        "sharded grad, replicated param": ([Replicate()], [Shard(0)]),
    }
    mine: dict[str, bool] = {}
    for cls in (LSTMOptimizer, MetaLSTMOptimizer, torch.optim.Adam):
        for case, (param_placements, grad_placements) in cases.items():
            param = torch.nn.Parameter(distribute_tensor(values.clone(), mesh, param_placements))
            if grad_placements == [Partial()]:  # each rank's share of the sum (exact: halves of floats)
                param.grad = DTensor.from_local(grad / dist.get_world_size(), mesh, grad_placements)
            else:
                param.grad = distribute_tensor(grad.clone(), mesh, grad_placements)
            plain = torch.nn.Parameter(values.clone())
            plain.grad = grad.clone()
            for p in (param, plain):
                optimizer = cls([p])
                try:
                    optimizer.step(loss=torch.tensor(0.5)) if cls is MetaLSTMOptimizer else optimizer.step()
                except RuntimeError as err:  # reported, so that the other checks still run
                    print(f"rank {dist.get_rank()}: {cls.__name__}, {case}: {err}", file=sys.stderr)
            mine[f"{cls.__name__}: {case}"] = torch.equal(param.full_tensor(), plain) and not torch.equal(plain, values)
    return mine


def uneven_list_checks() -> dict[str, bool]:
    """For both optimizers and ``torch.optim.Adam``: rank 1 gives its optimizer only the FSDP
    parameters whose shard is not empty there (4 of the 6; rank 0 all 6). 3 steps give the
    unsharded parameters bit for bit; then (the learned optimizers, ``nan_policy="skip"``) a NaN
    in rank 0's shard of a gradient that rank 1's optimizer does not list skips the sharded
    parameters on every rank, which go on to step together (True on every rank for a True)."""
    from torch.distributed.fsdp import fully_shard

    from learnedopt import LSTMOptimizer, MetaLSTMOptimizer

    mine: dict[str, bool] = {}
    for name, cls in (("LSTMOptimizer", LSTMOptimizer), ("MetaLSTMOptimizer", MetaLSTMOptimizer), ("Adam", _Adam)):
        reference, sharded = _model(0), fully_shard(_model(0))
        listed = [p for p in sharded.parameters() if p.to_local().numel()]
        optimizer = cls(listed, nan_policy="skip")
        try:
            _train(reference, cls(reference.parameters()), 3, seed=1)
            _train(sharded, optimizer, 3, seed=1)
        except RuntimeError as err:  # reported, so that the other checks still run
            print(f"rank {dist.get_rank()}: {name} with other parameter lists: {err}", file=sys.stderr)
            mine[f"{name}: empty shards left out on one rank"] = False
            continue
        mine[f"{name}: empty shards left out on one rank"] = len(listed) == (6 if dist.get_rank() == 0 else 4) and all(
            torch.equal(_full(p), q) for p, q in zip(sharded.parameters(), reference.parameters(), strict=True)
        )
        if cls is _Adam:
            continue
        before = [p.to_local().clone() for p in sharded.parameters()]
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(sharded(torch.ones(4, 6)), torch.zeros(4, 1))
        loss.backward()
        if dist.get_rank() == 0:
            list(sharded.parameters())[-1].grad.to_local()[0] = float("nan")
        optimizer.step(loss=loss.detach())
        skipped = all(torch.equal(p.to_local(), b) for p, b in zip(sharded.parameters(), before, strict=True))
        _train(sharded, optimizer, 1, seed=2)
        stepped = any(not torch.equal(p.to_local(), b) for p, b in zip(sharded.parameters(), before, strict=True))
        mine[f"{name}: a NaN where the lists differ skips on every rank"] = skipped and stepped
    return mine


def equal_mesh_checks() -> dict[str, bool]:
    """Two sharded parameters on one mesh, which rank 0 holds as two equal ``DeviceMesh``
    objects and rank 1 as one (DTensor's caches hand out an equal mesh object of an earlier
    model, as they please on each rank): with ``nan_policy="skip"`` a step equals the unsharded
    one bit for bit, and a NaN in rank 1's shard of the second gradient skips that parameter on
    both ranks while the first steps (True on this rank for a True)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from learnedopt import LSTMOptimizer

    first = init_device_mesh("cpu", (dist.get_world_size(),))
    # a 1-D mesh of every rank uses the default group, so rank 0 alone can build a second one
    second = init_device_mesh("cpu", (dist.get_world_size(),)) if dist.get_rank() == 0 else first
    values, grad = torch.linspace(-1, 1, 8), torch.linspace(0.5, -0.3, 8)
    params = [torch.nn.Parameter(distribute_tensor(values.clone(), mesh, [Shard(0)])) for mesh in (first, second)]
    plain = [torch.nn.Parameter(values.clone()) for _ in params]
    optimizer, reference = LSTMOptimizer(params, nan_policy="skip"), LSTMOptimizer(plain)
    for p, q, mesh in zip(params, plain, (first, second), strict=True):
        p.grad, q.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)]), grad.clone()
    optimizer.step()
    reference.step()
    stepped = all(torch.equal(p.full_tensor(), q) for p, q in zip(params, plain, strict=True))
    before = [p.to_local().clone() for p in params]
    if dist.get_rank() == 1:
        params[1].grad.to_local()[0] = float("nan")
    optimizer.step()
    skipped = torch.equal(params[1].to_local(), before[1]) and not torch.equal(params[0].to_local(), before[0])
    return {"LSTMOptimizer: equal meshes judged as one": stepped and skipped}


def verdict_checks() -> dict[str, object]:
    """``agree_finite`` on a 1-D mesh of every rank (3), tensors ``A``..``D`` of distinct global
    shapes. Each case lists, per rank, the tensors it holds and those whose shard is NaN there;
    the result is, per case, rank and tensor, the verdict that rank got (``None``: not listed)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from learnedopt.optim import sharding

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sizes = {"A": 2, "B": 3, "C": 4, "D": 5}  # local sizes: the global shapes differ
    cases = {
        # the same tensors on every rank: only the NaN one is skipped
        "same lists": ({0: "ABC", 1: "ABC", 2: "ABC"}, {2: "B"}),
        # equal counts, other tensors: rank 2 lists B where the others list A
        "equal counts, other tensors": ({0: "ABC", 1: "ABC", 2: "BCD"}, {2: "B"}),
        "equal counts, NaN on a rank listing the others": ({0: "ABC", 1: "ABC", 2: "BCD"}, {0: "C"}),
    }
    mine: dict[str, object] = {}
    for case, (lists, nan) in cases.items():
        names = lists[rank]
        tensors = [
            DTensor.from_local(torch.zeros(sizes[n]), mesh, [Shard(0)], run_check=False) for n in names
        ]
        finite = [n not in nan.get(rank, "") for n in names]
        mine[case] = dict(zip(names, sharding.agree_finite(tensors, finite), strict=True))
    # two lists (param groups) judged apart in one call: the first alike on every rank, the
    # second longer on rank 0 (D left out elsewhere), a NaN in one list or the other
    for case, nan in (("lists, NaN in the list alike", "A"), ("lists, NaN in the list that differs", "C")):
        names = ["AB", "CD" if rank == 0 else "C"]
        tensors = [[DTensor.from_local(torch.zeros(sizes[n]), mesh, [Shard(0)], run_check=False) for n in ns] for ns in names]
        finite = [[not (rank == 1 and n == nan) for n in ns] for ns in names]
        agreed = sharding.agree_finite_lists(tensors, finite)
        mine[case] = {n: v for ns, vs in zip(names, agreed, strict=True) for n, v in zip(ns, vs, strict=True)}
    return mine


def group_mesh_checks() -> dict[str, object]:
    """Two param groups of ``LSTMOptimizer`` (``nan_policy="skip"``) on a 1-D mesh of every
    rank (3): group 0 holds ``A`` (a shard on every rank), group 1 holds ``B`` (global shape
    (2,), its shard empty on rank 2, which leaves it out: its group 1 is empty). Two steps, the
    second with a NaN in rank 0's shard of ``B``; the result is, per step, whether each tensor
    this rank lists stepped."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from learnedopt import LSTMOptimizer

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    a = torch.nn.Parameter(DTensor.from_local(torch.linspace(-1, 1, 2) + rank, mesh, [Shard(0)], run_check=False))
    b_local = torch.tensor([0.5 - rank]) if rank < 2 else torch.zeros(0)
    b = torch.nn.Parameter(DTensor.from_local(b_local, mesh, [Shard(0)], run_check=False, shape=torch.Size([2]), stride=(1,)))
    listed = {"A": a, "B": b} if rank < 2 else {"A": a}
    optimizer = LSTMOptimizer([{"params": [a]}, {"params": [b] if rank < 2 else []}], nan_policy="skip")
    mine: dict[str, object] = {}
    for step in range(2):
        before = {n: p.to_local().clone() for n, p in listed.items()}
        for n, p in listed.items():
            p.grad = DTensor.from_local(
                torch.full_like(p.to_local(), 0.25), mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride()
            )
        if step == 1 and rank == 0:
            b.grad.to_local()[0] = float("nan")
        optimizer.step()
        mine[f"step {step}"] = {n: not torch.equal(p.to_local(), before[n]) for n, p in listed.items()}
    return mine


def no_gradient_checks() -> dict[str, bool]:
    """``LSTMOptimizer`` (``nan_policy="skip"``) on a 1-D mesh of both ranks: ``A`` has a shard
    on each rank, ``B`` (global shape (1,)) only on rank 0, and rank 1 leaves its empty shard of
    ``B`` out, so that in steps where only ``B`` has a gradient no parameter of rank 1's optimizer
    has one. Step 0: ``B``'s gradient is finite, and ``B`` steps on rank 0; step 1: it is NaN, and
    ``B`` is skipped; step 2: only ``A`` has a gradient, and it steps on both ranks as the full
    tensor steps in one process, bit for bit (True on this rank for a True)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from learnedopt import LSTMOptimizer

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    values = torch.linspace(-1, 1, 2 * dist.get_world_size())
    a = torch.nn.Parameter(DTensor.from_local(values.chunk(dist.get_world_size())[rank].clone(), mesh, [Shard(0)], run_check=False))
    b_local = torch.tensor([0.5]) if rank == 0 else torch.zeros(0)
    b = torch.nn.Parameter(DTensor.from_local(b_local, mesh, [Shard(0)], run_check=False, shape=torch.Size([1]), stride=(1,)))
    optimizer = LSTMOptimizer([a, b] if rank == 0 else [a], nan_policy="skip")

    def sharded_like(p: torch.Tensor, value: float) -> torch.Tensor:
        return DTensor.from_local(torch.full_like(p.to_local(), value), mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())

    stepped = []
    for step, (b_grad, a_grad) in enumerate(((0.25, None), (float("nan"), None), (None, 0.25))):
        before = (a.to_local().clone(), b.to_local().clone())
        a.grad = None if a_grad is None else sharded_like(a, a_grad)
        b.grad = None if b_grad is None else sharded_like(b, b_grad)
        try:
            optimizer.step()
        except RuntimeError as err:  # a rank left waiting (gloo's timeout): reported, so that the other checks still run
            print(f"rank {rank}: step {step} with gradients only rank 0's optimizer lists: {err}", file=sys.stderr)
            return {"LSTMOptimizer: a rank without gradients joins the others' step": False}
        stepped.append((not torch.equal(a.to_local(), before[0]), not torch.equal(b.to_local(), before[1])))
    plain = torch.nn.Parameter(values.clone())
    plain.grad = torch.full_like(plain, 0.25)
    LSTMOptimizer([plain]).step()
    expected = [(False, True), (False, False), (True, False)] if rank == 0 else [(False, False)] * 2 + [(True, False)]
    return {"LSTMOptimizer: a rank without gradients joins the others' step": stepped == expected and torch.equal(a.full_tensor(), plain)}


def usage_checks() -> dict[str, bool]:
    """The checks of the ``usage`` mode, each True only where it holds on every rank."""
    from learnedopt.weights import UntrainedWeightsWarning

    warnings.simplefilter("ignore", UntrainedWeightsWarning)
    mine = {**no_gradient_checks(), **wrapper_checks(), **gradient_placement_checks(), **uneven_list_checks(), **equal_mesh_checks()}
    everyone: list[dict[str, bool]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    return {key: all(r[key] for r in everyone) for key in mine}


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "meta":
        dist.init_process_group("gloo")  # the CLI uses this group and leaves it open
        for name in META_RUNS:
            if run_cli(meta_args(name, out / name)) != 0:
                return 1
        report = {"fsdp": fsdp_checks(out), "ddp": ddp_checks(), "sharding": sharding_checks(), "zero": zero_checks()}
        if dist.get_rank() == 0:
            (out / "optimizers.json").write_text(json.dumps(report))
        dist.destroy_process_group()
        return 0
    if mode == "usage":
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a check that hangs fails soon
        report = usage_checks()
        if dist.get_rank() == 0:
            (out / "usage.json").write_text(json.dumps(report))
        dist.destroy_process_group()
        return 0
    if mode in ("verdicts", "groups"):  # every rank's report, gathered into <mode>.json
        checks, seconds = {"verdicts": (verdict_checks, 30), "groups": (group_mesh_checks, 20)}[mode]
        dist.init_process_group("gloo", timeout=timedelta(seconds=seconds))  # a rank left waiting fails soon
        everyone: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(everyone, checks())
        if dist.get_rank() == 0:
            (out / f"{mode}.json").write_text(json.dumps(everyone))
        dist.destroy_process_group()
        return 0
    if mode in ("kill", "hang", "term"):
        fail_at(3, mode)
        return run_cli([*meta_args("lstm", out), "--dist-timeout", "4"])
    if mode == "nan":
        nan_at(3)
        return run_cli([*meta_args("lstm", out), "--dist-timeout", "20"])
    if mode == "resume":
        return run_cli([*meta_args("lstm", out), "--resume"])
    if mode == "elsewhere":
        own = out.parent / "elsewhere" if int(os.environ["RANK"]) == 1 else out
        return run_cli([*meta_args("lstm", own), "--resume", "--dist-timeout", "20"])
    if mode == "cuda-index":  # a 2-GPU machine stood in for, after joining the job on gloo
        dist.init_process_group("gloo")
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: 2
        return run_cli([*meta_args("lstm", out), "--device", "cuda:0", "--dist-timeout", "20"])
    if mode == "seeds":
        return run_cli([*meta_args("lstm", out), "--seed", str(3 + int(os.environ["RANK"])), "--dist-timeout", "20"])
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    from learnedopt.meta.distributed import exit_process

    exit_process(main())
