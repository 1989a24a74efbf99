"""The second decision of this folder's README (written before its runs existed).

    python benchmarks/results/l2l_interpolate/decide.py DIR

``DIR`` holds the four reports of the second decision's runs: ``optimizee_eval_mnist200_seeds100.json``,
``optimizee_eval_relu_seeds100.json``, ``optimizee_eval_synthetic_seeds100.json`` and
``optimizee_eval_transformer.json``, each with ``mid.safetensors`` and ``shipped.safetensors`` as
``--weights`` columns. Prints the paired intervals and clauses A-C; writes ``decision2.json`` in DIR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from learnedopt.evaluation.report import paired_difference

MID, SHIPPED = "LSTMOptimizer (mid.safetensors)", "LSTMOptimizer (shipped.safetensors)"
HUNDRED = {"mnist200": "mnist-mlp-200", "relu": "mnist-mlp-relu", "synthetic": "synthetic-mlp"}


def results(folder: Path, name: str, problem: str) -> dict:
    return json.loads((folder / f"optimizee_eval_{name}.json").read_text())["problems"][problem]["results"]


def main(folder: str) -> None:
    folder = Path(folder)
    out: dict = {"mid_minus_shipped": {}, "means": {}}
    for name, problem in HUNDRED.items():
        r = results(folder, f"{name}_seeds100", problem)
        out["mid_minus_shipped"][problem] = paired_difference(r[MID]["finals"], r[SHIPPED]["finals"])
        out["means"][problem] = {k: r[label]["final_mean"] for k, label in (("mid", MID), ("shipped", SHIPPED), ("adam", "Adam"))}
        if problem == "mnist-mlp-relu":
            out["relu_mid_minus_adam"] = paired_difference(r[MID]["finals"], r["Adam"]["finals"])
            out["relu_shipped_minus_adam"] = paired_difference(r[SHIPPED]["finals"], r["Adam"]["finals"])
    t = results(folder, "transformer", "transformer-markov")
    mid, shipped, adam = t[MID], t[SHIPPED], t["Adam"]
    out["transformer"] = {"mid": mid["final_mean"], "mid_std": mid["final_std"], "shipped": shipped["final_mean"],
                          "shipped_std": shipped["final_std"], "adam": adam["final_mean"]}  # fmt: skip
    clauses = {
        "A mid nowhere above shipped beyond the interval": all(d["lo"] <= 0 for d in out["mid_minus_shipped"].values()),
        "B ReLU: mid below tuned Adam beyond the interval": out["relu_mid_minus_adam"]["hi"] < 0,
        "C transformer: at or below tuned Adam, not above shipped beyond the larger std": (
            mid["final_mean"] <= adam["final_mean"]
            and mid["final_mean"] - shipped["final_mean"] <= max(mid["final_std"], shipped["final_std"])
        ),
    }
    out.update(clauses=clauses, replace_default=all(clauses.values()))
    print(json.dumps(out, indent=2))
    (folder / "decision2.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
