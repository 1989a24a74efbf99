"""A change to the library, measured: the library at another git revision against the working
tree, on meta-training truncations, in two processes run in turn.

Each side is a process of its own (``truncation_worker.py`` with that side's source tree first on
``PYTHONPATH``; the revision's tree comes from ``git archive``), so any change is measured: Python,
the kernels, their interfaces. The two processes run one at a time, in rounds of one timed
truncation each (each right after an untimed one of its own), best and median of ``--rounds``:
the shared machines these ran on have slow spells minutes long, which a run of one side and then
a run of the other would put on one side. The script also says whether the two meta-gradients are
the same bits (a change that only reorders work, or drops work whose result was not used, keeps
them); where they are not, their largest relative difference, and it exits with an error,
writing nothing, when that is above ``common.AB_TOLERANCE`` (the sides compute different things). Both processes keep freed memory mapped, as ``learnedopt meta-train`` does (glibc's
malloc settings of :mod:`learnedopt.freed_memory`, given as ``GLIBC_TUNABLES``, so for any
revision). ``kernel_ab.py`` measures a kernel change alone, both builds in one process.

    python benchmarks/revision_ab.py --against REV [--preset NAME] [--task mnist-mlp] [--meta-batch 2] [--unroll 20] [--threads 1] [--rounds 9] [--tag NAME]
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AB_TOLERANCE, ab_inputs, ab_parser, fail, relative_difference, require_equal_gradients, write_ab_results  # noqa: E402

from learnedopt.freed_memory import MMAP_THRESHOLD, TRIM_THRESHOLD  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "truncation_worker.py"


def tree_at(revision: str, folder: Path) -> None:
    """Write the repository's files at a git revision into ``folder`` (a one-line error where git
    does not have the revision)."""
    done = subprocess.run(["git", "archive", "--format=tar", revision], cwd=ROOT, capture_output=True)
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise ValueError(f"no revision {revision!r} in {ROOT}: {message[-1] if message else 'git failed'}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        # extraction filters came with Python 3.10.12 and 3.11.4; git's own archive needs none
        archive.extractall(folder, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))


class Side:
    """One worker process: the library of one source tree."""

    def __init__(self, tree: Path, worker_args: list[str], threads: int) -> None:
        # glibc keeps freed memory mapped in both, as learnedopt meta-train does (freed_memory.py),
        # set here for any revision: where it hands memory back to the OS depends on a process's
        # allocation history, and took one side's truncations 1.2x longer than the other's on
        # the same code (tens of thousands of page faults each; benchmarks/results/README.md)
        tunables = f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "GLIBC_TUNABLES": tunables}
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), *worker_args], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.library = self._reply()["library"]
        if not Path(self.library).resolve().is_relative_to(tree.resolve()):
            raise ValueError(f"the worker for {tree} imported the library at {self.library} (an installed copy?), not the tree's")

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise ValueError(f"a truncation worker ended (exit status {self.process.wait()}); its error is above")
        return json.loads(line)

    def run(self) -> dict:
        """One untimed and one timed truncation: ``{"seconds", "meta_gradient_sha256", "meta_gradient"}``."""
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> None:
    parser = ab_parser("revision_ab", __doc__.split("\n")[0], "git revision whose library is the baseline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the results' machine record says the workers' count
    ab_inputs(parser, args)  # the working tree's verdict on --task and --preset, before the workers
    worker_args = ["--task", args.task, "--meta-batch", str(args.meta_batch), "--unroll", str(args.unroll),
                   "--seed", str(args.seed), "--threads", str(args.threads), *(["--preset", args.preset] if args.preset else [])]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        sides: dict[str, Side] = {}
        try:
            tree_at(args.against, Path(folder))
            sides["baseline"] = Side(Path(folder), worker_args, args.threads)
            sides["working tree"] = Side(ROOT, worker_args, args.threads)
            results = {name: [] for name in sides}
            for name, side in sides.items():
                side.run()  # warm-up (and the kernel's build)
            for _ in range(args.rounds):
                for name, side in sides.items():
                    results[name].append(side.run())
        except ValueError as err:
            fail(parser, str(err))
        finally:
            for side in sides.values():
                side.close()
    times = {name: [r["seconds"] for r in runs] for name, runs in results.items()}
    hashes = {name: {r["meta_gradient_sha256"] for r in runs} for name, runs in results.items()}
    same_bits = len(hashes["baseline"]) == 1 and hashes["baseline"] == hashes["working tree"]
    # other bits may be other rounding (reordered work); a larger difference is other work, not to be timed as the same
    grads = {name: [torch.tensor(values) for values in runs[-1]["meta_gradient"]] for name, runs in results.items()}
    diff = relative_difference(grads["working tree"], grads["baseline"])
    require_equal_gradients(f"the library at {args.against!r} against the working tree", diff, AB_TOLERANCE)
    write_ab_results("revision_ab", args, times, same_bits, "against the working tree, each in a process of its own, alternated", "library",
                     rel_diff=diff)  # fmt: skip


if __name__ == "__main__":
    main()
