"""The cost of an optimizer's first step: building the LSTM step's fused CPU kernel
(:mod:`learnedopt.kernels.lstm_layer_cpu`), or, with it off, ``torch.compile`` of the step's
pointwise functions.

Each measurement is a fresh Python process that builds a small model (``nn.Linear(100, 10)``,
1,010 parameters), one ``LSTMOptimizer`` (the default preset) and times its first three
``step()`` calls:

- cold: empty caches (``LEARNEDOPT_CACHE_DIR`` and ``TORCHINDUCTOR_CACHE_DIR`` set to new
  folders), as on a fresh machine;
- warm: the same caches again, as in every later process on that machine;
- the same two with the kernel off (``LEARNEDOPT_CPU_KERNEL=0``, a new Inductor cache): what the
  first step cost before the kernel;
- eager: ``LEARNEDOPT_COMPILE=0``, nothing compiled.

    python benchmarks/first_step.py [--threads 1] [--tag NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import results_tag, thread_count, write_results  # noqa: E402

CHILD = """
import json, time, torch
torch.set_num_threads({threads})
from learnedopt import LSTMOptimizer
model = torch.nn.Linear(100, 10)
optimizer = LSTMOptimizer(model.parameters())
model(torch.randn(4, 100)).sum().backward()
seconds = []
for _ in range(3):
    start = time.perf_counter()
    optimizer.step()
    seconds.append(time.perf_counter() - start)
print(json.dumps(seconds))
"""


def first_steps(env: dict[str, str], threads: int) -> list[float]:
    """Seconds of the first three ``step()`` calls in a fresh process with ``env``."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(threads=threads)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=thread_count, default=1)
    parser.add_argument("--tag", type=results_tag("first_step"), help="suffix of the results file name (a run that should not replace the committed one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as kernels, tempfile.TemporaryDirectory() as inductor, tempfile.TemporaryDirectory() as inductor_off:
        env = {**os.environ, "LEARNEDOPT_CACHE_DIR": kernels, "TORCHINDUCTOR_CACHE_DIR": inductor, "LEARNEDOPT_COMPILE": "1"}
        env.pop("LEARNEDOPT_CPU_KERNEL", None)
        off = {**env, "LEARNEDOPT_CPU_KERNEL": "0", "TORCHINDUCTOR_CACHE_DIR": inductor_off}
        for case, case_env in (
            ("cold caches", env),
            ("warm caches", env),
            ("fused kernel off (LEARNEDOPT_CPU_KERNEL=0), cold Inductor cache", off),
            ("fused kernel off, warm Inductor cache", off),
            ("LEARNEDOPT_COMPILE=0", {**env, "LEARNEDOPT_COMPILE": "0"}),
        ):
            seconds = first_steps(case_env, args.threads)
            rows.append(dict(case=case, first_s=seconds[0], second_ms=seconds[1] * 1e3, third_ms=seconds[2] * 1e3))
            print(rows[-1], flush=True)
    table = [
        "First three `LSTMOptimizer.step()` calls (default preset, `nn.Linear(100, 10)`: 1,010 parameters) "
        f"in a fresh process each, {args.threads} thread(s).\n",
        "| case | first step s | second step ms | third step ms |",
        "|---|---:|---:|---:|",
        *(f"| {r['case']} | {r['first_s']:.2f} | {r['second_ms']:.2f} | {r['third_ms']:.2f} |" for r in rows),
    ]
    write_results("first_step" + (f"_{args.tag}" if args.tag else ""), {"threads": args.threads, "rows": rows}, "\n".join(table))


if __name__ == "__main__":
    main()
