"""The built-in task families draw from the CPU ``torch.Generator`` they are given, and refuse
anything else in one line: ``None`` (which drew from the global RNG, so the tasks were not those of
any seed), a seed in its place, or a generator on another device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_meta_train_device import small_families

from learnedopt.meta.tasks import TaskFamily, generator_for

FAMILIES = ["quadratic", "mnist-mlp", "mlp-random", "regression", "mixture"]


class CudaGenerator(torch.Generator):
    """A CPU generator that says it is on ``cuda`` (a CUDA generator cannot be made without a GPU;
    torch itself draws from this one on the CPU, so only the families' check can refuse it)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda")


def _calls(family: TaskFamily) -> dict[str, object]:
    """Each way of handing a family and its tasks a generator, as ``name -> call(generator)``."""
    batch = family.sample_batch(2, generator_for(0))
    return {
        "sample": family.sample,
        "sample_batch": lambda g: family.sample_batch(2, g),
        "TaskBatch.init_params": batch.init_params,
        "Task.init_params": batch.tasks[0].init_params,
    }


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("bad", [None, 7, "seed"], ids=["none", "int", "str"])
def test_a_value_that_is_not_a_generator_is_refused(tmp_path: Path, name: str, bad: object) -> None:
    family = small_families(tmp_path)[name]
    for call, draw in _calls(family).items():
        before = torch.get_rng_state()
        with pytest.raises(TypeError, match=r"generator must be a torch\.Generator on the CPU.*got") as err:
            draw(bad)
        assert "\n" not in str(err.value), call
        assert torch.equal(torch.get_rng_state(), before), f"{call} drew from the global RNG"


@pytest.mark.parametrize("name", FAMILIES)
def test_a_generator_on_another_device_is_refused(tmp_path: Path, name: str) -> None:
    family = small_families(tmp_path)[name]
    for call, draw in _calls(family).items():
        with pytest.raises(ValueError, match=r"generator must be on the CPU, got one on cuda: .*whatever the family's device") as err:
            draw(CudaGenerator().manual_seed(0))
        assert "\n" not in str(err.value), call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_cuda_generator_is_refused(tmp_path: Path) -> None:
    family = small_families(tmp_path)["mlp-random"].to("cuda")
    with pytest.raises(ValueError, match="generator must be on the CPU, got one on cuda"):
        family.sample_batch(2, torch.Generator(device="cuda").manual_seed(0))
