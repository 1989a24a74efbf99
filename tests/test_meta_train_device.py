"""``learnedopt meta-train --device``: task families keep their data on their device while drawing
on the CPU; on a CUDA machine a run matches the CPU run and resumes across devices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fake_cuda import fake_cuda
from safetensors.torch import load_file
from test_meta_unroll import write_fake_mnist

from learnedopt.cli import main
from learnedopt.meta.tasks import (
    MixtureFamily,
    MnistMLPFamily,
    QuadraticFamily,
    RandomMLPFamily,
    RegressionFamily,
    TaskFamily,
    generator_for,
)


def test_task_families_keep_their_data_on_their_device_and_draw_the_same_tasks() -> None:
    # the meta device holds no values but keeps devices and shapes: enough to follow the data
    quadratic = QuadraticFamily(dim=3).to("meta")
    batch = quadratic.sample_batch(2, torch.Generator().manual_seed(0))
    assert batch.weight.device.type == "meta" and batch.target.device.type == "meta"

    moved = RandomMLPFamily(source="synthetic").to("meta")
    assert moved.inputs.device.type == "meta" and moved.labels.device.type == "meta"
    on_meta = moved.sample_batch(3, torch.Generator().manual_seed(4))
    on_cpu = RandomMLPFamily(source="synthetic").sample_batch(3, torch.Generator().manual_seed(4))
    assert on_meta.architecture == on_cpu.architecture
    for a, b in zip(on_meta.tasks, on_cpu.tasks, strict=True):
        assert (a.seed, a.input_scale, a.init_scale) == (b.seed, b.input_scale, b.init_scale)
        (xa, ya), (xb, yb) = a.minibatch(7), b.minibatch(7)
        assert xa.device.type == ya.device.type == "meta" and xa.shape == xb.shape and ya.shape == yb.shape
        # initial parameters are drawn on the CPU and made where the data lives
        pa, pb = a.init_params(torch.Generator().manual_seed(1)), b.init_params(torch.Generator().manual_seed(1))
        assert pa.keys() == pb.keys()
        assert all(pa[k].device.type == "meta" and pa[k].shape == pb[k].shape for k in pb)


def small_families(tmp_path: Path) -> dict[str, TaskFamily]:
    """Each built-in family (small, float64), and a mixture: built afresh per call."""
    mnist = write_fake_mnist(tmp_path / "mnist")
    return {
        "quadratic": QuadraticFamily(dim=3, dtype=torch.float64),
        "mnist-mlp": MnistMLPFamily(mnist, hidden=(3,), batch_size=4, dtype=torch.float64),
        "mlp-random": RandomMLPFamily(source="synthetic", width=(2, 4), batch_size=(3, 5), dtype=torch.float64),
        "regression": RegressionFamily(points=6, width=(2, 4), dtype=torch.float64),
        "mixture": MixtureFamily([QuadraticFamily(dim=2, dtype=torch.float64), RegressionFamily(points=5, dtype=torch.float64)]),
    }


@pytest.mark.parametrize("name", ["quadratic", "mnist-mlp", "mlp-random", "regression", "mixture"])
def test_init_params_are_made_on_the_family_device_in_the_loss_dtype(tmp_path: Path, name: str) -> None:
    """``family.to("cuda")`` moves everything the tasks own, as a module's ``.to`` does: their
    initial parameters were CPU tensors beside the data on the GPU, so ``task.loss(task.init_params(g), t)``
    raised (only the trainer moved them). They are the CPU family's draws, on its device."""
    cpu = small_families(tmp_path)[name]
    want_batch = cpu.sample_batch(2, generator_for(3))
    want = want_batch.init_params(generator_for(4))
    with fake_cuda():
        family = small_families(tmp_path)[name].to("cuda")
        batch = family.sample_batch(2, generator_for(3))
        params = batch.init_params(generator_for(4))
        assert params.keys() == want.keys()
        for k, v in params.items():
            assert (v.device.type, v.dtype) == ("cuda", torch.float64), k
            assert torch.equal(v.cpu(), want[k]), k
        # (not batch.loss: vmap's results lose fake_cuda's mark, so it sees them as CPU tensors)
        for task, want_task in zip(batch.tasks, want_batch.tasks, strict=True):
            own = task.init_params(generator_for(5))
            assert all((v.device.type, v.dtype) == ("cuda", torch.float64) for v in own.values())
            loss = task.loss(own, 2)  # raised: cpu parameters beside cuda data
            assert (loss.device.type, loss.dtype) == ("cuda", torch.float64)
            torch.testing.assert_close(loss.cpu(), want_task.loss(want_task.init_params(generator_for(5)), 2))


RUNS = {
    "lstm": (["--task", "quadratic", "--unroll", "3", "--horizon", "6", "--meta-batch", "2"], "weights.safetensors"),
    "maml": (["--algo", "maml", "--meta-batch", "2", "--val-tasks", "2"], "model.safetensors"),
    "reptile": (["--algo", "reptile", "--meta-batch", "2", "--val-tasks", "2", "--inner-batch", "4"], "model.safetensors"),
    "meta-lstm": (["--algo", "meta-lstm", "--meta-batch", "2", "--inner-steps", "2", "--val-tasks", "2"], "model.safetensors"),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/run_gpu.sh)")
@pytest.mark.parametrize("algo", list(RUNS))
def test_a_cuda_run_matches_the_cpu_run_and_resumes_on_the_cpu(tmp_path: Path, algo: str) -> None:
    extra, weights = RUNS[algo]
    args = ["meta-train", "--quiet", "--meta-steps", "4", "--checkpoint-every", "2", "--seed", "1", *extra]
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    assert main([*args, "--out", str(tmp_path / "cuda"), "--device", "cuda"]) == 0
    cpu, cuda = load_file(tmp_path / "cpu" / weights), load_file(tmp_path / "cuda" / weights)
    assert cpu.keys() == cuda.keys()
    for name in cpu:  # the same draws; float32 rounding differs between the devices
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-3, atol=1e-5, msg=name)

    broken = tmp_path / "broken"
    assert main([*args, "--out", str(broken), "--device", "cuda", "--stop-after", "3"]) == 0
    assert main([*args, "--out", str(broken), "--resume"]) == 0  # the rest on the CPU
    resumed = load_file(broken / weights)
    for name in cpu:
        torch.testing.assert_close(resumed[name], cpu[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["quadratic", "mnist-mlp", "mlp-random", "regression", "mixture"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_to_a_dtype_is_refused_naming_the_dtype_argument(tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    """A family's dtype is a constructor argument (its data is made in it); ``family.to(torch.float64)``,
    as a module takes it, raised torch.device's "received an invalid combination of arguments"."""
    family = small_families(tmp_path)[name]
    want = family.sample_batch(2, generator_for(3)).init_params(generator_for(4))
    cls = type(family).__name__  # a mixture's, not its first member's
    with pytest.raises(TypeError, match=rf"^{cls}\.to\(\) takes a device, got the dtype torch\.float(64|32): .*dtype=") as err:
        family.to(dtype)
    assert "\n" not in str(err.value)
    assert family.device == torch.device("cpu")  # unchanged, and it still draws the same
    got = family.sample_batch(2, generator_for(3)).init_params(generator_for(4))
    assert all(torch.equal(got[k], want[k]) for k in want)
