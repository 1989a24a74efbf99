"""Meta-training throughput on 1 and more processes: ``learnedopt meta-train`` under ``torchrun``.

Each configuration runs the same meta-training job (same global ``--meta-batch``, so the same
work per meta-step) with P processes of T threads each, launched as

    python -m torch.distributed.run --standalone --nproc_per_node=P -m learnedopt.meta.train ...

and reads the per-meta-step wall times that rank 0 logs in ``log.jsonl`` (the first meta-step is
dropped as warm-up). It reports meta-steps/s and the ratios against the 1-process runs.

    python benchmarks/distributed_scaling.py [--configs 1x1 1x2 2x1] [--task mnist-mlp] \
        [--meta-batch 8] [--horizon 40] [--unroll 20] [--meta-steps 5] [--tag NAME]

``PxT`` is P processes with T threads each; on a machine with more cores add e.g. ``4x1 8x1``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Distinct, fail, positive_int, results_tag, thread_count, write_results  # noqa: E402

from learnedopt.cli import most_threads  # noqa: E402


def run(procs: int, threads: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One meta-training job; its per-meta-step seconds (after the first) and wall time. Raises
    ValueError with the meta-train command's one-line error when it refused the job."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
        "-m", "learnedopt.meta.train",
        "--task", args.task, "--meta-batch", str(args.meta_batch), "--horizon", str(args.horizon),
        "--unroll", str(args.unroll), "--meta-steps", str(args.meta_steps), "--seed", "0",
        "--checkpoint-every", str(args.meta_steps), "--quiet", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        # the meta-train command's own one-line error (a bad --task, a missing data folder), as
        # such; anything else with the end of its output
        refused = [line for line in done.stderr.splitlines() if line.startswith("learnedopt meta-train: error: ")]
        if refused:
            raise ValueError(refused[0])
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    wall = time.perf_counter() - began
    seconds = [json.loads(line)["seconds"] for line in (out / "log.jsonl").read_text().splitlines()]
    steady = seconds[1:]  # the first meta-step dropped as warm-up (--meta-steps is at least 2)
    return {
        "seconds_per_meta_step": statistics.median(steady),
        "meta_steps_per_s": 1.0 / statistics.median(steady),
        "wall_s": wall,
        "per_step_seconds": seconds,
    }


def pxt(text: str) -> str:
    """``type=`` of ``--configs``: ``PxT`` with P processes and T threads each, both thread counts
    (:func:`~learnedopt.cli.thread_count`: from 1 to the most a command takes), written without
    leading zeros so that one config has one spelling (``01x1`` is ``1x1``)."""
    parts = text.split("x")
    try:
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise argparse.ArgumentTypeError
        procs, threads = (thread_count(p) for p in parts)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not PxT (P processes of T threads, each from 1 to {most_threads()}, e.g. 2x1)"
        ) from None
    return f"{procs}x{threads}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=pxt, nargs="+", action=Distinct, default=["1x1", "1x2", "2x1"], help="PxT: P processes of T threads")
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--meta-batch", type=positive_int, default=8)
    parser.add_argument("--horizon", type=positive_int, default=40)
    parser.add_argument("--unroll", type=positive_int, default=20)
    parser.add_argument("--meta-steps", type=positive_int, default=5)
    parser.add_argument("--tag", type=results_tag("distributed_scaling"), help="suffix of the results file name (a run that should not replace the committed one)")
    args = parser.parse_args()
    if args.meta_steps < 2:  # the first is dropped as warm-up: with one, the warm-up was reported
        fail(parser, "--meta-steps must be at least 2 (the first meta-step of each run is dropped as warm-up)")

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            procs, threads = (int(x) for x in config.split("x"))
            try:
                measured = run(procs, threads, args, Path(tmp) / config)
            except ValueError as err:
                fail(parser, f"the {config} run was refused: {err}")
            rows[config] = {"processes": procs, "threads_per_process": threads, **measured}
            print(f"{config}: {rows[config]['meta_steps_per_s']:.4f} meta-steps/s", flush=True)

    base = {t: r for r in rows.values() if r["processes"] == 1 for t in [r["threads_per_process"]]}
    lines = [
        "| processes x threads | s / meta-step | meta-steps / s | vs 1 process, same threads/process | vs 1 process, same total threads |",
        "|---|---:|---:|---:|---:|",
    ]
    for config, r in rows.items():
        same_threads = base.get(r["threads_per_process"])
        same_total = base.get(r["processes"] * r["threads_per_process"])
        ratio = lambda b: f"{r['meta_steps_per_s'] / b['meta_steps_per_s']:.2f}x" if b else "-"  # noqa: E731
        r["ratio_vs_1_process_same_threads"] = same_threads and r["meta_steps_per_s"] / same_threads["meta_steps_per_s"]
        r["ratio_vs_1_process_same_total_threads"] = same_total and r["meta_steps_per_s"] / same_total["meta_steps_per_s"]
        lines.append(f"| {config} | {r['seconds_per_meta_step']:.3f} | {r['meta_steps_per_s']:.3f} | "
                     f"{ratio(same_threads)} | {ratio(same_total)} |")  # fmt: skip
    job = (f"--task {args.task} --meta-batch {args.meta_batch} (global) --horizon {args.horizon} "
           f"--unroll {args.unroll}, {args.meta_steps} meta-steps, first dropped; median")  # fmt: skip
    table = f"Job: {job}.\n\n" + "\n".join(lines)
    write_results("distributed_scaling" + (f"_{args.tag}" if args.tag else ""), {"job": job, "cpu_count": os.cpu_count(), "results": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
