"""The harness's report as files: Markdown tables, a JSON file and a plot of loss curves."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import write_atomically
from .. import markdown
from ..values import is_integer, is_number

_NUMBER = r"-?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|NaN|Infinity|null)"
#: a JSON string (matched whole, so that the text inside one is left as it is), or a list of numbers
_STRING_OR_NUMBER_LIST = re.compile(r'"(?:[^"\\]|\\.)*"|\[\s*(' + _NUMBER + r"(?:,\s*" + _NUMBER + r")*)\s*\]")


def _one_line(match: re.Match[str]) -> str:
    if match.group(1) is None:  # a string: "U[0,1]" in a description or label stays as written
        return match.group(0)
    return "[" + ", ".join(re.split(r",\s*", match.group(1))) + "]"


def dumps_report(payload: Mapping[str, Any]) -> str:
    """Indented JSON with every list of plain numbers on one line (loss curves would otherwise
    take a line per value, more than doubling a suite report's size); strings are left as they are."""
    return _STRING_OR_NUMBER_LIST.sub(_one_line, json.dumps(payload, indent=2))


#: the suffixes of a report's files (the PNG only with matplotlib), and the longest name one is
#: written under (:func:`~learnedopt.files.write_atomically`'s temporary file)
REPORT_SUFFIXES = ("json", "md", "png")
_LONGEST_SUFFIX = ".json.tmp"


def check_report_name(
    out_dir: str | os.PathLike[str], name: str, suffixes: Sequence[str] = REPORT_SUFFIXES, option: str = "--name"
) -> None:
    """Raise ``ValueError`` (one line, naming ``option``, the command's option that gave ``name``
    or a part of it) where the report ``name`` could not be written in ``out_dir`` (which need not
    exist yet) as ``<name>.<suffix>`` files: a name that is a path, empty, or too long for the file
    system, or one of those files a folder. Checked before any run, as these were found only when
    the report was written, after every run."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{option} is a file name stem, not a path: {name!r}")
    folder = Path(out_dir).absolute()
    while not folder.is_dir() and folder != folder.parent:  # the nearest folder that exists
        folder = folder.parent
    try:
        most = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no such limit
        most = 255
    if len(os.fsencode(name + _LONGEST_SUFFIX)) > most:
        raise ValueError(f"{option} is too long: {len(os.fsencode(name))} bytes, over {most} (the longest file name there) "
                         f"with the suffix {_LONGEST_SUFFIX!r} of the report's files")  # fmt: skip
    for suffix in suffixes:
        path = Path(out_dir) / f"{name}.{suffix}"
        if path.is_dir():
            raise ValueError(f"{option} {name}: {path} is a folder, where the report's {suffix} file would be written")


def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.4g}"


def markdown_tables(report: Mapping[str, Any]) -> str:
    """The report as Markdown: settings, one table per problem, the stability check."""
    c = report["config"]
    lines = [
        "Held-out optimizee suite: learned optimizers (untuned, lr=1.0) against baselines with tuned lr.",
        "",
        (
            f"- evaluation seeds: {c['seeds']} per problem (0..{c['seeds'] - 1}); "
            f"tuning seeds: {c['tuning_seeds']} (problems of >= {c['long_steps']} steps: "
            f"{c['long_tuning_seeds'] or c['tuning_seeds']}), disjoint from the evaluation seeds"
        ),
        f"- baseline lr grid: {', '.join(f'{lr:.3g}' for lr in c['lrs'])}; criterion: {report['definitions']['tuning']}",
        f"- lr schedule: {report['definitions'].get('lr_schedule', 'constant lr')}",
        "- baselines: SGD; SGD + Nesterov momentum 0.9; RMSprop (alpha 0.99); Adam (0.9, 0.999); other settings torch defaults",
        (
            f"- final loss: {report['definitions']['final_loss']}; {report['definitions']['statistics']}; "
            "NaN column: runs (of all seeds) in which a NaN/Inf loss or gradient appeared"
        ),
        "- every optimizer sees the same initial parameters and minibatch sequence for a given seed",
        f"- quick mode: {c['quick']}"
        + (f" (every problem cut to at most {c['steps']} steps)" if c["steps"] else ""),
        "",
    ]
    for label, info in report["learned"].items():
        h = info["header"]
        state = (
            "UNTRAINED preset"
            if h.get("trained") is False
            else f"trained on {h.get('trained_on')!r}"
        )
        rule = f", your own rule {markdown.code(info['rule'])}" if info.get("rule") else ""
        lines.append(markdown.line(f"- {label}: weights {markdown.code(info['weights'])}{rule} ({state})"))
    for name, reason in report["skipped"].items():
        lines.append(markdown.line(f"- skipped {name}: {reason}"))
    reused = report.get("reused")
    if reused:
        lines.append(
            markdown.line(f"- reused, not rerun: results taken from {markdown.code(reused['from'])}"
                          + (f" (commit {reused['commit']})" if reused["commit"] else "")
                          + " for "
                          + ("; ".join(f"{name}: {', '.join(labels)}" for name, labels in reused["results"].items()) or "nothing"))
        )
    for name, prob in report["problems"].items():
        adam = prob["results"].get("Adam")
        best_label = best_baseline(prob["results"])
        best = None if best_label is None else prob["results"][best_label]
        lines += [
            "",
            markdown.line(f"## {name} ({prob['steps']} steps, {prob['seconds']:.0f} s)"),
            "",
            prob["description"],
            "",
            markdown.line(f"Best tuned baseline: {best_label or 'none (no baseline run stayed finite)'}."),
            "",
            "| optimizer | lr | final loss mean +- std | median [q1, q3] | mean loss | NaN | seeds below tuned Adam "
            "| seeds below the best tuned baseline | minus the best tuned baseline [95%] |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, r in prob["results"].items():
            if r["kind"] == "baseline":
                # the smallest lr by the tie rule, not a choice: the grid needs smaller lrs
                diverged = bool(r.get("tuning_scores")) and not any(math.isfinite(v) for v in r["tuning_scores"].values())
                notes = [note for note, on in (("grid edge", r.get("lr_at_grid_edge")), ("every lr diverged in tuning", diverged)) if on]
                lr = f"{r['lr']:.3g}" + (f" ({'; '.join(notes)})" if notes else "")
            else:
                lr = "1 (untuned)"
            lines.append(markdown.row([
                label, lr, f"{_fmt(r['final_mean'])} +- {_fmt(r['final_std'])}",
                f"{_fmt(r['final_median'])} [{_fmt(r['final_q1'])}, {_fmt(r['final_q3'])}]", _fmt(r['mean_loss']),
                f"{'yes' if r['nonfinite'] else 'no'} ({r['nonfinite']}/{r['runs']})",
                '-' if adam is None or r is adam else seeds_below(r['finals'], adam['finals']),
                '-' if best is None or r is best else seeds_below(r['finals'], best['finals']),
                '-' if best is None or r is best else format_difference(paired_difference(r['finals'], best['finals'])),
            ]))  # fmt: skip
    lines.append(
        "\nSeeds below tuned Adam: on how many evaluation seeds (of those where both runs stayed finite) "
        "a run's final loss is below tuned Adam's on the same seed, with the same initialisation and "
        "minibatches: a paired comparison, finer than the spreads across seeds. Seeds below the best "
        "tuned baseline: the same against the baseline with the lowest mean final loss, named above each table. "
        "Minus the best tuned baseline: the mean over seeds of a run's final loss minus that baseline's on the "
        "same seed, with a 95% paired bootstrap interval (`learnedopt.evaluation.paired_difference`; it "
        "covers less than 95% for few seeds)."
    )
    stab = report.get("stability")
    if stab:
        lines += ["", "## Stability check", ""]
        if "skipped" in stab:
            lines.append(f"Skipped: {stab['skipped']}")
        else:
            lines += [
                markdown.line(f"{stab['problem']}, {stab['steps']} steps, seed {stab['seed']}, lr 1.0."),
                "",
                "| optimizer | NaN/Inf | first NaN/Inf step | final loss | min loss |",
                "|---|---|---:|---:|---:|",
            ]
            for label, r in stab["results"].items():
                lines.append(markdown.row([label, "yes" if r["nonfinite"] else "no",
                                           r["first_nonfinite_step"] if r["nonfinite"] else "-",
                                           _fmt(r["final_loss"]), _fmt(r["min_loss"])]))  # fmt: skip
    lines += ["", f"Total time: {report['seconds']:.0f} s."]
    return "\n".join(lines)


#: a result entry's numbers (NaN where no run stayed finite), and its per-step curves over seeds
_RESULT_NUMBERS = ("lr", "final_mean", "final_std", "final_median", "final_q1", "final_q3", "mean_loss")
_RESULT_CURVES = ("curve_median", "curve_q1", "curve_q3")


def check_result(result: Any, runs: int | None = None) -> None:
    """Raise ``ValueError`` (one line, naming the field) where ``result`` is not a problem's result
    entry as :func:`~learnedopt.evaluation.harness.evaluate_optimizers` reports one, with the
    fields the tables and the plot read (a report edited by hand, or cut and merged, failed there
    with a traceback, after every run of a ``--reuse``). ``runs``: the seeds it must have run, if
    known."""
    if not isinstance(result, dict):
        raise ValueError(f"it is a {type(result).__name__}, not a result entry")
    if result.get("kind") not in ("baseline", "learned"):
        raise ValueError(f"its kind is {result.get('kind')!r}, not 'baseline' or 'learned'")
    bad = [key for key in _RESULT_NUMBERS if not is_number(result.get(key))]
    bad += [key for key in ("runs", "nonfinite") if not (is_integer(result.get(key)) and result[key] >= 0)]
    if bad:
        raise ValueError(f"its {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} missing or not a number of the right kind")
    finals = result.get("finals")
    if not (isinstance(finals, list) and len(finals) == result["runs"] and all(is_number(x) for x in finals)):
        raise ValueError(f"its finals are not a list of {result['runs']} numbers (one per run)")
    if runs is not None and result["runs"] != runs:
        raise ValueError(f"it ran {result['runs']} seeds, not {runs}")
    curves = [result.get(key) for key in _RESULT_CURVES]
    lengths = {len(c) if isinstance(c, list) and all(is_number(x) for x in c) else None for c in curves}
    if curves != [None] * 3 and (len(lengths) != 1 or None in lengths):
        raise ValueError(f"its {', '.join(_RESULT_CURVES)} are not lists of as many numbers, nor all null")


def check_stability_result(result: Any) -> None:
    """Raise ``ValueError`` (one line) where ``result`` is not a learned optimizer's entry of the
    stability check as :func:`~learnedopt.evaluation.harness.evaluate_optimizers` reports one."""
    if not isinstance(result, dict):
        raise ValueError(f"it is a {type(result).__name__}, not a stability entry")
    if not (isinstance(result.get("nonfinite"), bool) and is_number(result.get("final_loss"))
            and all(result.get(key) is None or is_number(result[key]) for key in ("first_nonfinite_step", "min_loss"))):  # fmt: skip
        raise ValueError("its nonfinite, first_nonfinite_step, final_loss or min_loss is missing or of another type")


def best_baseline(results: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The label of the tuned baseline with the lowest finite mean final loss among ``results``
    (one problem's entries, label -> statistics with ``kind``), or None when none is finite."""
    finite = [k for k, r in results.items() if r["kind"] == "baseline" and math.isfinite(r["final_mean"])]
    return min(finite, key=lambda k: results[k]["final_mean"], default=None)


def seeds_below(finals: Sequence[float], reference: Sequence[float]) -> str:
    """``"k/n"``: of the ``n`` seeds where both final losses are finite, ``k`` where ``finals`` is
    below ``reference`` (both indexed by evaluation seed)."""
    pairs = [(a, b) for a, b in zip(finals, reference, strict=True) if math.isfinite(a) and math.isfinite(b)]
    return f"{sum(a < b for a, b in pairs)}/{len(pairs)}"


def paired_difference(
    finals: Sequence[float], reference: Sequence[float], resamples: int = 10_000, seed: int = 0
) -> dict[str, float | int]:
    """Mean of ``finals - reference`` over the seeds where both are finite, with a 95% paired
    bootstrap percentile interval (``resamples`` resamplings of those seeds, drawn from a
    generator seeded by ``seed``, so the interval is reproducible).

    Both sequences are final losses indexed by evaluation seed (same initialisation and
    minibatches per seed). Returns ``mean``, ``lo``, ``hi`` (the interval, in loss units; all
    NaN when no pair is finite) and ``n`` (the number of pairs). A negative ``hi`` means
    ``finals`` is below ``reference`` beyond the spread across seeds. The percentile interval
    covers less than 95% for few pairs (about 1.86 standard errors wide each side at 10, where a
    Student-t interval takes 2.26); from about 30 pairs the two agree closely.
    """
    pairs = np.array(
        [(a, b) for a, b in zip(finals, reference, strict=True) if math.isfinite(a) and math.isfinite(b)],
        dtype=np.float64,
    ).reshape(-1, 2)
    diff = pairs[:, 0] - pairs[:, 1]
    if not len(diff):
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    picks = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    lo, hi = np.percentile(diff[picks].mean(axis=1), [2.5, 97.5])
    return {"mean": float(diff.mean()), "lo": float(lo), "hi": float(hi), "n": len(diff)}


def format_difference(d: Mapping[str, float | int]) -> str:
    """A :func:`paired_difference` as ``"+0.0038 [+0.00024, +0.0073]"`` (two significant digits),
    or ``"- (no seed where both stayed finite)"`` where it has no pair."""
    if not d["n"]:
        return "- (no seed where both stayed finite)"
    return f"{d['mean']:+.2g} [{d['lo']:+.2g}, {d['hi']:+.2g}]"


def _as_written(text: str) -> str:
    """``text`` for matplotlib as it is: each ``$`` escaped, as matplotlib reads text between two
    as math (a ValueError where that is no valid math, italics where it is)."""
    return text.replace("$", "\\$")


def plot_curves(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Loss curves: per-step median and quartile band over finite seeds, one subplot per problem, log y
    (linear for a problem whose plotted losses are not all positive); each subplot names the
    optimizers whose runs with a NaN/Inf it leaves out, with their count, or says that no run
    stayed finite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    problems = report["problems"]
    # one colour and line style per optimizer across all subplots, and a legend of every one,
    # whether or not it has a finite run in the first problem
    kinds = {label: r["kind"] for prob in problems.values() for label, r in prob["results"].items()}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(kinds) > len(palette):
        palette = [plt.get_cmap("tab20")(i) for i in range(20)]
    style = {
        label: {"color": palette[i % len(palette)], "ls": "-" if kind == "baseline" else "--"}
        for i, (label, kind) in enumerate(kinds.items())
    }
    plotted = set()
    n = max(1, len(problems))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, prob) in zip(axes.flat, problems.items()):
        positive = True  # a loss <= 0 (a problem of one's own) has no place on a log axis
        for label, r in prob["results"].items():
            if r["curve_median"] is None:  # no finite run on this problem
                continue
            plotted.add(label)
            steps = np.arange(len(r["curve_median"]))
            ax.plot(steps, r["curve_median"], label=_as_written(label), lw=1.2, **style[label])
            ax.fill_between(steps, r["curve_q1"], r["curve_q3"], color=style[label]["color"], alpha=0.2, lw=0)
            positive = positive and min(min(r[key]) for key in ("curve_median", "curve_q1", "curve_q3")) > 0
        # the bands are over the finite runs only, as the tables' statistics: say which are left out
        left_out = [f"{label} {r['nonfinite']}/{r['runs']}" for label, r in prob["results"].items() if r.get("nonfinite")]
        if not any(r["curve_median"] is not None for r in prob["results"].values()):
            ax.text(0.5, 0.5, "no run stayed finite", transform=ax.transAxes, ha="center", va="center", fontsize=9)
        elif left_out:
            ax.text(0.01, 0.01, _as_written(f"runs with a NaN/Inf, left out: {', '.join(left_out)}"), transform=ax.transAxes,
                    ha="left", va="bottom", fontsize=6, wrap=True)  # fmt: skip
        ax.set_yscale("log" if positive else "linear")
        ax.set_title(_as_written(name), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
    for ax in list(axes.flat)[len(problems) :]:
        ax.axis("off")
    handles = [
        Line2D([], [], lw=1.2, label=_as_written(label if label in plotted else f"{label} (no finite run)"), **style[label])
        for label in style
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3) or 1, fontsize=8)
    fig.tight_layout(rect=(0, 0.02 + 0.03 * math.ceil(len(handles) / 3), 1, 1))
    fig.savefig(path, dpi=110, format="png")  # the format by name: a temporary file's suffix is .tmp
    plt.close(fig)


WriteResults = Callable[[str, dict, str], None]


def cpu_name() -> str:
    """The CPU's model name: ``/proc/cpuinfo``'s where there is one (Linux; ``platform.processor()``
    is empty there), else ``platform.processor()`` or the architecture."""
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def results_header(name: str, command: str, machine: object) -> str:
    """The head of a results Markdown file: its ``name`` as the title, then the ``command`` (as
    inline code) and the ``machine`` it ran with (what :func:`write_report` and
    ``benchmarks/common.write_results`` write above the tables)."""
    return f"# {markdown.line(name)}\n\nCommand: {markdown.code(command)}  \nMachine: {markdown.line(machine)}\n\n"


def write_report(
    report: dict[str, Any],
    out_dir: str | os.PathLike[str],
    name: str = "optimizee_eval",
    write_results: WriteResults | None = None,
) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` (the last only with matplotlib
    installed; without it a ``<name>.png`` of an earlier report is removed) into ``out_dir``;
    returns the paths written.

    ``write_results(name, payload, table)`` writes the JSON and Markdown (the benchmark passes
    ``benchmarks/common.write_results``, which writes into its results folder); by default they are
    written here with the command and a short machine description.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_tables(report)
    if write_results is None:
        payload = {
            # a resumed run reports what the uninterrupted command does, as it gives the same report
            "command": shlex.join(["learnedopt", *(arg for arg in sys.argv[1:] if arg != "--resume")]),
            "machine": {
                "cpu": cpu_name(),
                "isa": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        } | report
        # each file through a temporary one and a rename: a kill or a full disk while a report is
        # written over an earlier one (same --out and --name) leaves that one whole
        text = dumps_report(payload) + "\n"
        write_atomically(out / f"{name}.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        header = results_header(name, payload["command"], payload["machine"])
        write_atomically(out / f"{name}.md", lambda tmp: tmp.write_text(header + table + "\n", encoding="utf-8"))
    else:
        write_results(name, report, table)
    try:
        write_atomically(out / f"{name}.png", lambda tmp: plot_curves(report, tmp))
    except ImportError:  # matplotlib is the optional `plots` extra: the tables do not need it
        # an earlier report's plot of the same name would be read as this one's
        stale = out / f"{name}.png"
        removed = stale.is_file()
        if removed:
            stale.unlink()
        print(f"note: matplotlib is not installed, so {name}.png was not drawn (pip install matplotlib)"
              + (f"; removed the earlier {name}.png, a plot of another report" if removed else ""), file=sys.stderr)  # fmt: skip
        return [out / f"{name}.{ext}" for ext in ("json", "md")]
    return [out / f"{name}.{ext}" for ext in ("json", "md", "png")]
