"""The meta-train command's malloc setting (``learnedopt.freed_memory``), measured: ``learnedopt
meta-train`` runs with ``LEARNEDOPT_KEEP_FREED_MEMORY=1`` (the default) and ``=0``, alternated.

Each round runs the same command once with each setting, in a fresh process, for
``--meta-steps`` meta-steps of the default's rule on the MNIST MLP (each meta-step 5 truncations
of 20 steps, as the command's defaults); a setting's time is the median over its runs of the
meta-steps' ``seconds`` in the log, the first meta-step of each run left out (it builds the
kernels and warms up). Also per run: the minor page faults and system CPU seconds of the whole
process (``getrusage`` of the child), and its peak resident memory (the log's ``peak_rss_mb``).
The meta-steps compute the same values either way (only where tensors are placed differs); the
script checks that the two settings' logs agree in every metric but the timing and memory.

    python benchmarks/freed_memory.py [--preset l2l-blend] [--task mnist-mlp] [--meta-batch 2] [--meta-steps 6] [--rounds 3] [--threads 1] [--tag NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fail, positive_int, results_tag, thread_count, write_results  # noqa: E402

from learnedopt.freed_memory import SWITCH  # noqa: E402

SETTINGS = {"keep": "1", "default malloc": "0"}
#: the log's fields that depend on the machine, not on the computation
MACHINE_FIELDS = ("seconds", "peak_rss_mb")


def run_once(args: argparse.Namespace, switch: str, out: Path) -> dict:
    """One ``meta-train`` run: its log's rows, and the process's faults and system seconds."""
    env = {**os.environ, SWITCH: switch, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("GLIBC_TUNABLES", None)  # the setting under test, not one from the shell
    command = [sys.executable, "-m", "learnedopt.train", "--task", args.task, "--meta-batch", str(args.meta_batch),
               "--meta-steps", str(args.meta_steps), "--out", str(out), "--quiet",
               *(["--preset", args.preset] if args.preset else [])]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise ValueError(f"meta-train failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {
        "seconds": [row["seconds"] for row in rows[1:]],
        "peak_rss_mb": rows[-1]["peak_rss_mb"],
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "system_s": after.ru_stime - before.ru_stime,
        "metrics": [{k: v for k, v in row.items() if k not in MACHINE_FIELDS} for row in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="l2l-blend")
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--meta-batch", type=positive_int, default=2)
    parser.add_argument("--meta-steps", type=positive_int, default=6)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--threads", type=thread_count, default=1)
    parser.add_argument("--tag", type=results_tag("freed_memory"), help="suffix of the results file name")
    args = parser.parse_args()
    if args.meta_steps < 2:
        fail(parser, "--meta-steps must be at least 2 (the first of each run is left out)")
    torch.set_num_threads(args.threads)  # the results' machine record says the runs' count
    runs = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as folder:
        try:
            for r in range(args.rounds):
                for name, switch in SETTINGS.items():
                    runs[name].append(run_once(args, switch, Path(folder) / f"{switch}_{r}"))
        except ValueError as err:
            fail(parser, str(err))
    metrics = {json.dumps(run["metrics"]) for side in runs.values() for run in side}
    if len(metrics) != 1:
        fail(parser, "the two settings' meta-training logs differ in a metric: the setting changed the computation")
    row = {
        name: {
            "median_seconds_per_meta_step": statistics.median(s for run in side for s in run["seconds"]),
            "minor_faults_per_run": [run["minor_faults"] for run in side],
            "system_s_per_run": [round(run["system_s"], 3) for run in side],
            "peak_rss_mb": [run["peak_rss_mb"] for run in side],
            "seconds": [run["seconds"] for run in side],
        }
        for name, side in runs.items()
    }
    speedup = row["default malloc"]["median_seconds_per_meta_step"] / row["keep"]["median_seconds_per_meta_step"]
    payload = {"preset": args.preset, "task": args.task, "meta_batch": args.meta_batch, "meta_steps": args.meta_steps,
               "rounds": args.rounds, "threads": args.threads, "settings": row, "speedup": speedup,
               "same_metrics": True}  # fmt: skip
    print(json.dumps(payload)[:2000])
    lines = [
        f"`learnedopt meta-train --preset {args.preset} --task {args.task} --meta-batch {args.meta_batch} --meta-steps "
        f"{args.meta_steps}` ({args.threads} thread(s)), with `{SWITCH}=1` (the default: `keep`) and `=0`, alternated, "
        f"{args.rounds} runs each. Seconds: the median meta-step, each run's first left out.\n",
        "| setting | s / meta-step | minor page faults / run | system CPU s / run | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {r['median_seconds_per_meta_step']:.3f} | {', '.join(f'{f:,}' for f in r['minor_faults_per_run'])} | "
          f"{', '.join(f'{s:.2f}' for s in r['system_s_per_run'])} | {', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} |"
          for name, r in row.items()),  # fmt: skip
        f"\nWith the setting a meta-step is {speedup:.2f}x faster; every metric of every meta-step is the same in all runs.",
    ]
    write_results("freed_memory" + (f"_{args.tag}" if args.tag else ""), payload, "\n".join(lines))


if __name__ == "__main__":
    main()
