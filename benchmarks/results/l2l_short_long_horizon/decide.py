"""Checks the pre-registered criterion of README.md on the decision run's two result files.

    python benchmarks/results/l2l_short_long_horizon/decide.py runs/long-evalA/optimizee_eval.json runs/long-evalB/optimizee_eval.json
"""

import json
import sys
from pathlib import Path

CANDIDATE, DEFAULT = "LSTMOptimizer (weights.safetensors)", "LSTMOptimizer (l2l-random, default)"
BASELINES = ("SGD", "Nesterov", "RMSprop", "Adam")


def main() -> None:
    runs = [json.loads(Path(p).read_text()) for p in sys.argv[1:]]
    problems = {name: p for run in runs for name, p in run["problems"].items()}
    stability = [r["stability"]["results"][CANDIDATE] for r in runs if r.get("stability")]
    out: dict = {"commands": [r["command"] for r in runs], "problems": {}}
    at_or_below_adam = lower_than_default = 0
    for name, problem in problems.items():
        res = problem["results"]
        best = min(BASELINES, key=lambda b: res[b]["final_mean"])
        cand, default, adam = (res[k]["final_mean"] for k in (CANDIDATE, DEFAULT, "Adam"))
        row = dict(candidate=cand, candidate_std=res[CANDIDATE]["final_std"], l2l_random=default,
                   l2l_random_std=res[DEFAULT]["final_std"], adam=adam, best_baseline=[best, res[best]["final_mean"]],
                   candidate_nonfinite=res[CANDIDATE]["nonfinite"], candidate_finals=res[CANDIDATE]["finals"],
                   l2l_random_finals=res[DEFAULT]["finals"], default_at_or_below_adam=default <= adam,
                   at_or_below_adam=cand <= adam, lower_than_l2l_random=cand < default)
        at_or_below_adam += row["at_or_below_adam"]
        lower_than_default += row["lower_than_l2l_random"]
        out["problems"][name] = row
    long = out["problems"]["mnist-mlp-1000"]
    out["clauses"] = {
        "1_finite_10000_steps": bool(stability) and not stability[0]["nonfinite"],
        "2_at_or_below_adam": [at_or_below_adam, at_or_below_adam >= 8],
        "3_mnist_1000_below_best_baseline": long["candidate"] < long["best_baseline"][1],
        "4_lower_than_l2l_random": [lower_than_default, lower_than_default >= 6],
    }
    out["stability_10000_steps"] = stability[0] if stability else None
    c = out["clauses"]
    out["ship"] = c["1_finite_10000_steps"] and c["2_at_or_below_adam"][1] and c["3_mnist_1000_below_best_baseline"] and c["4_lower_than_l2l_random"][1]
    Path(__file__).with_name("decision.json").write_text(json.dumps(out, indent=1) + "\n")
    for name, row in out["problems"].items():
        print(f"{name:22s} cand {row['candidate']:.4g} ± {row['candidate_std']:.2g}  l2l-random {row['l2l_random']:.4g}  "
              f"Adam {row['adam']:.4g}  best {row['best_baseline'][0]} {row['best_baseline'][1]:.4g}")
    print(json.dumps(c), "ship:", out["ship"], "stability:", out["stability_10000_steps"])


if __name__ == "__main__":
    main()
