"""Memory of one MAML meta-step against the number of inner steps: second-order, second-order
with gradient checkpointing (``MAML(checkpoint_steps=True)``), and first-order; with ``--modes``
also ANIL (second-order, ``adapt_only`` the output layer), whose inner loop runs the fixed body
once per task, and ANIL with that body rerun at every step (the model wrapped in a module that
is not an ``nn.Sequential``, as before the library ran it once).

Each cell runs in a fresh process (one thread): it builds the conv-4 model of the MAML paper and
a meta-batch of random 28x28 N-way K-shot episodes (15 queries per class), warms up on one
task, then runs one meta-step (meta-loss, backward). Reported: the process's peak resident
memory after that meta-step minus its resident memory just before (the model and data are
allocated before), and the meta-step's wall time.

    python benchmarks/maml_memory.py [--steps 1 2 5 10] [--meta-batch 4] [--ways 5] [--shots 5] \
        [--modes MODE ...] [--name maml_memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Distinct, fail, positive_int, write_results  # noqa: E402

from learnedopt.evaluation import check_report_name  # noqa: E402

MODES = {
    "second-order": {"first_order": False, "checkpoint_steps": False},
    "second-order, checkpointed": {"first_order": False, "checkpoint_steps": True},
    "first-order": {"first_order": True, "checkpoint_steps": False},
}
#: opt-in (--modes): ANIL, and ANIL with its body rerun at every inner step
EXTRA_MODES = {
    "anil": {"first_order": False, "checkpoint_steps": False, "head_only": True},
    "anil-body-every-step": {"first_order": False, "checkpoint_steps": False, "head_only": True, "wrapped": True},
}
ALL_MODES = {**MODES, **EXTRA_MODES}


def _rss_mb() -> float:
    """Current resident memory of this process (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def cell(mode: str, steps: int, meta_batch: int, ways: int, shots: int) -> dict[str, float]:
    """One meta-step in this process; returns its peak-RSS rise (MB) and seconds."""
    import torch

    from learnedopt.meta.fewshot.learner import output_layer_name
    from learnedopt.meta.loop import peak_rss_mb
    from learnedopt.meta.maml import MAML
    from learnedopt.models import conv4

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = conv4(1, ways, 64, 28)
    options = dict(ALL_MODES[mode])
    if options.pop("wrapped", False):
        model = _Wrapped(model)
    if options.pop("head_only", False):
        options["adapt_only"] = (output_layer_name(model),)

    def episode(batch: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, ways * shots, 1, 28, 28), torch.arange(ways).repeat_interleave(shots).repeat(batch, 1),
                torch.randn(batch, ways * 15, 1, 28, 28), torch.arange(ways).repeat_interleave(15).repeat(batch, 1))  # fmt: skip

    # warm-up on one task and one step: lazy imports and first-call allocations happen here
    MAML(model, inner_lr=0.4, inner_steps=1, vectorize=False, **options)(*episode(1)).backward()
    model.zero_grad(set_to_none=True)
    maml = MAML(model, inner_lr=0.4, inner_steps=steps, vectorize=False, **options)
    batch = episode(meta_batch)
    before = _rss_mb()
    began = time.perf_counter()
    maml(*batch).backward()
    seconds = time.perf_counter() - began
    peak = peak_rss_mb()
    return {"peak_rise_mb": peak - before, "seconds": seconds}


def _Wrapped(model):  # noqa: N802 - a class made on demand, so that the module imports no torch
    import torch

    class Wrapped(torch.nn.Module):
        """``model`` inside a module that is not an ``nn.Sequential``: the same computation, which
        MAML cannot split into a fixed body and a head."""

        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    return Wrapped()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, nargs="+", action=Distinct, default=[1, 2, 5, 10])
    parser.add_argument("--meta-batch", type=positive_int, default=4)
    parser.add_argument("--ways", type=positive_int, default=5)
    parser.add_argument("--shots", type=positive_int, default=5)
    parser.add_argument("--modes", nargs="+", action=Distinct, choices=sorted(ALL_MODES), default=list(MODES), metavar="MODE",
                        help=f"modes to run (default: {', '.join(MODES)}; also {', '.join(EXTRA_MODES)})")
    parser.add_argument("--name", default="maml_memory", help="results file name (default maml_memory)")
    parser.add_argument("--cell", nargs=2, metavar=("MODE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:  # before the runs: a name that is a path was a traceback once they had run
        check_report_name(common.RESULTS, args.name, ("json", "md"))
    except ValueError as err:
        fail(parser, str(err))
    if args.cell:
        print(json.dumps(cell(args.cell[0], int(args.cell[1]), args.meta_batch, args.ways, args.shots)))
        return

    import torch

    # the cells run on one thread each (cell()); this process only waits for them, and its count
    # is what the results' machine record says (torch's default here: every core)
    torch.set_num_threads(1)
    results: dict[str, dict[int, dict[str, float]]] = {}
    modes = args.modes
    for mode in modes:
        for steps in args.steps:
            command = [sys.executable, __file__, "--cell", mode, str(steps),
                       "--meta-batch", str(args.meta_batch), "--ways", str(args.ways), "--shots", str(args.shots)]  # fmt: skip
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.setdefault(mode, {})[steps] = json.loads(out.strip().splitlines()[-1])
            print(mode, steps, results[mode][steps], flush=True)
    lines = [
        "| inner steps | " + " | ".join(f"{m}: MB / s" for m in modes) + " |",
        "|---:|" + "---:|" * len(modes),
    ]
    for steps in args.steps:
        cells = [f"{results[m][steps]['peak_rise_mb']:.0f} / {results[m][steps]['seconds']:.2f}" for m in modes]
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    setting = (f"conv-4 (64 filters), {args.ways}-way {args.shots}-shot, 15 queries per class, 28x28, meta-batch "
               f"{args.meta_batch}, tasks in a loop, one thread; peak-RSS rise over the RSS before one meta-step "
               "(after a warm-up step on one task), and its seconds")  # fmt: skip
    write_results(args.name, {"setting": setting, "results": results},
                  f"{setting}.\n\n" + "\n".join(lines))  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
