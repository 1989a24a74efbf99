"""A change to the fused CPU LSTM kernel, measured: its source at another git revision against the
working tree's, on meta-training truncations, in one process.

Both builds of ``kernels/lstm_layer_cpu.cpp`` are loaded side by side and the library's
truncation (the unroll of ``--unroll`` steps and its backward, as in
``meta_train_throughput.py``'s "batched" row) runs with one and then the other, in rounds of one
timed truncation each (each right after an untimed one of its own), best of ``--rounds``: the
shared machines these ran on have slow spells minutes long, which a run of one build and then a
run of the other would put on one side. The script also says whether the two meta-gradients are
the same bits (a change that only reorders the machine's work should keep them); where they are
not, their largest relative difference, and it exits with an error, writing nothing, when that
is above ``common.AB_TOLERANCE`` (the builds compute different things). Both builds
run under the working tree's launcher (``lstm_layer_cpu.py``), so ``--against`` must name a
revision whose kernel has the same C interface (the ``extern "C"`` parameters; they changed when
the launcher began passing ``x``'s strides, commit 8d2e458): another is refused in one line.

    python benchmarks/kernel_ab.py --against REV [--preset NAME] [--meta-batch 2] [--unroll 20] [--threads 1] [--rounds 9] [--tag NAME]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AB_TOLERANCE, ab_inputs, ab_parser, fail, relative_difference, require_equal_gradients, write_ab_results  # noqa: E402
from truncation_worker import truncation  # noqa: E402

from learnedopt.freed_memory import keep_freed_memory  # noqa: E402
from learnedopt.kernels import lstm_layer_cpu  # noqa: E402

SOURCE_PATH = "kernels/lstm_layer_cpu.cpp"


def source_at(revision: str) -> str:
    """The kernel's source at a git revision (a one-line error where git does not have it)."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["git", "show", f"{revision}:{SOURCE_PATH}"], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"no {SOURCE_PATH} at {revision!r}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'git failed'}")
    return done.stdout


def c_interface(source: str) -> dict[str, str]:
    """The kernel source's ``extern "C"`` functions: name -> parameter list, whitespace folded."""
    return {name: " ".join(params.split()) for name, params in re.findall(r'extern "C" void (\w+)\(([^)]*)\)', source)}


def main() -> None:
    parser = ab_parser("kernel_ab", __doc__.split("\n")[0], "git revision whose kernel source is the baseline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as learnedopt meta-train does
    try:
        baseline_source = source_at(args.against)
    except (OSError, ValueError) as err:
        fail(parser, str(err))
    family, rule = ab_inputs(parser, args)
    # both builds run under the working tree's launcher (lstm_layer_cpu.py): another calling
    # convention would pass its pointers to the wrong parameters
    if c_interface(baseline_source) != c_interface(lstm_layer_cpu.SOURCE.read_text()):
        fail(parser, f"the kernel's C interface at {args.against!r} is not the working tree's (its extern \"C\" functions' "
                     "parameters differ): both builds run under the working tree's launcher, so compare revisions of one "
                     "interface")  # fmt: skip
    builds = {}
    with tempfile.TemporaryDirectory() as folder:
        baseline_path = Path(folder) / "lstm_layer_cpu.cpp"
        baseline_path.write_text(baseline_source)
        working_tree = lstm_layer_cpu.SOURCE
        for name, source in (("baseline", baseline_path), ("working tree", working_tree)):
            lstm_layer_cpu.SOURCE = source
            lstm_layer_cpu._libraries.clear()
            truncation(rule, family, args)  # builds this source's kernels, and warms up
            builds[name] = dict(lstm_layer_cpu._libraries)
            if not builds[name]:
                fail(parser, "the fused CPU LSTM kernel did not run (LEARNEDOPT_CPU_KERNEL=0, no compiler, or a build error)")
        lstm_layer_cpu.SOURCE = working_tree
    times = {name: [] for name in builds}
    grads = {}
    for _ in range(args.rounds):
        for name, libraries in builds.items():
            lstm_layer_cpu._libraries.clear()
            lstm_layer_cpu._libraries.update(libraries)
            truncation(rule, family, args)
            seconds, grads[name] = truncation(rule, family, args)
            times[name].append(seconds)
    lstm_layer_cpu._libraries.clear()
    lstm_layer_cpu._libraries.update(builds["working tree"])
    same_bits = all(torch.equal(a, b) for a, b in zip(grads["baseline"], grads["working tree"], strict=True))
    # other bits may be other rounding (reordered work); a larger difference is other work, not to be timed as the same
    diff = relative_difference(grads["working tree"], grads["baseline"])
    require_equal_gradients(f"the kernel at {args.against!r} against the working tree's", diff, AB_TOLERANCE)
    write_ab_results("kernel_ab", args, times, same_bits, "against the working tree's, loaded side by side and alternated", "kernel source",
                     rel_diff=diff)  # fmt: skip


if __name__ == "__main__":
    main()
