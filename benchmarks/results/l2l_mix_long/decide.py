"""Checks the criterion fixed in README.md (before the run) on the decision run's result files.

    python benchmarks/results/l2l_mix_long/decide.py runs/mix-evalA/optimizee_eval.json runs/mix-evalB/optimizee_eval.json
"""

import json
import sys
from pathlib import Path

CANDIDATE, DEFAULT = "LSTMOptimizer (weights.safetensors)", "LSTMOptimizer (l2l-random, default)"
BASELINES = ("SGD", "Nesterov", "RMSprop", "Adam")


def main() -> None:
    runs = [json.loads(Path(p).read_text()) for p in sys.argv[1:]]
    problems = {name: p["results"] for run in runs for name, p in run["problems"].items()}
    stability = next(r["stability"]["results"][CANDIDATE] for r in runs if r.get("stability"))
    rows = {}
    for name, res in problems.items():
        cand, default, adam = res[CANDIDATE], res[DEFAULT], res["Adam"]
        best = min(BASELINES, key=lambda b: res[b]["final_mean"])
        rows[name] = {
            "candidate": [cand["final_mean"], cand["final_std"]],
            "l2l_random": [default["final_mean"], default["final_std"]],
            "adam": [adam["final_mean"], adam["final_std"]],
            "best_baseline": [best, res[best]["final_mean"]],
            "candidate_finals": cand["finals"],
            "candidate_at_or_below_adam": cand["final_mean"] <= adam["final_mean"],
            "l2l_random_at_or_below_adam": default["final_mean"] <= adam["final_mean"],
            # clause 4: worse than the default by more than the larger of the two stds
            "worse_than_l2l_random_beyond_spread": cand["final_mean"] - default["final_mean"]
            > max(cand["final_std"], default["final_std"]),
        }
    n_cand = sum(r["candidate_at_or_below_adam"] for r in rows.values())
    n_default = sum(r["l2l_random_at_or_below_adam"] for r in rows.values())
    long = rows["mnist-mlp-1000"]
    worse = [name for name, r in rows.items() if r["worse_than_l2l_random_beyond_spread"]]
    clauses = {
        "1_finite_10000_steps": not stability["nonfinite"],
        "2_at_or_below_adam_on_more_than_l2l_random": [n_cand, n_default, n_cand > n_default],
        "3_mnist_1000_below_best_baseline": long["candidate"][0] < long["best_baseline"][1],
        "4_nowhere_worse_than_l2l_random_beyond_spread": [worse, not worse],
    }
    ship = all(v[-1] if isinstance(v, list) else v for v in clauses.values())
    out = {"commands": [r["command"] for r in runs], "problems": rows, "clauses": clauses,
           "stability_10000_steps": stability, "ship": ship}
    Path(__file__).with_name("decision.json").write_text(json.dumps(out, indent=1) + "\n")
    for name, r in rows.items():
        print(f"{name:22s} cand {r['candidate'][0]:.4g} ± {r['candidate'][1]:.2g}  l2l-random {r['l2l_random'][0]:.4g} "
              f"± {r['l2l_random'][1]:.2g}  Adam {r['adam'][0]:.4g}  best {r['best_baseline'][0]} {r['best_baseline'][1]:.4g}")
    print(json.dumps(clauses), "ship:", ship)


if __name__ == "__main__":
    main()
