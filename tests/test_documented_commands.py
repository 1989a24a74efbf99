"""Every `learnedopt ...` (and `torchrun ... -m learnedopt.meta.train ...`) command the README, the
full results account (``benchmarks/results/README.md``) and the shipped model cards print parses
with today's command-line parser: no stale flag, no wrong choice. Commands in fenced blocks must
be complete; an inline mention in prose (e.g. ``learnedopt meta-train --device cuda``) may leave
out required arguments.

Likewise every ``python [benchmarks/]SCRIPT.py ...`` command the README and the results files
(their ``Command:`` lines and the experiments' READMEs) record parses with that benchmark script's
parser today (parsed only, nothing run)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from learnedopt.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CARDS = sorted((ROOT / "learnedopt" / "pretrained").glob("*.md"))
DOCUMENTS = [ROOT / "README.md", ROOT / "benchmarks" / "results" / "README.md", *CARDS]


def documented_commands(text: str) -> list[tuple[str, bool]]:
    """``(command, in a fenced block)`` for each line or inline code span that starts a command;
    line continuations joined, shell redirections and ``&&`` chains cut off."""
    text = text.replace("\\\n", " ")
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    candidates = [(line, True) for block in blocks for line in block.splitlines()]
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    candidates += [(span, False) for span in re.findall(r"`([^`\n]+)`", prose)]
    commands = []
    for line, fenced in candidates:
        line = line.split(" && ")[-1] if " && learnedopt" in line else line
        line = re.split(r" > | \| |\s#", line.strip())[0]
        if line.startswith(("learnedopt ", "torchrun ")) and "<" not in line and "..." not in line:
            commands.append((line, fenced))
    return commands


def argv_of(command: str) -> list[str] | None:
    """The arguments ``learnedopt``'s parser takes for ``command`` (None: not a learnedopt command)."""
    words = shlex.split(command)
    if words[0] == "torchrun":
        module = words[words.index("-m") + 1] if "-m" in words[:-1] else None
        if module not in ("learnedopt.meta.train", "learnedopt.train"):
            return None
        return ["meta-train", *words[words.index("-m") + 2 :]]
    return words[1:]


CASES = [
    pytest.param(command, fenced, id=f"{path.relative_to(ROOT)}:{command[:60]}")
    for path in DOCUMENTS
    for command, fenced in documented_commands(path.read_text())
    if argv_of(command) is not None  # e.g. "torchrun -m" named in prose
]


def test_the_documents_print_commands() -> None:
    # the extraction finds the commands it should: the README's meta-train runs, the cards' commands
    assert len(CASES) > 20
    with_command = {c.id.split(":")[0] for c in CASES}
    cards = {str(p.relative_to(ROOT)) for p in CARDS}
    wanted = {f"learnedopt/pretrained/{name}.md" for name in ("l2l-blend", "l2l-random", "meta-lstm-adam-mnist")}
    assert wanted <= with_command & cards
    assert {"README.md", "benchmarks/results/README.md"} <= with_command


@pytest.mark.parametrize("command, fenced", CASES)
def test_documented_command_parses(command: str, fenced: bool) -> None:
    argv = argv_of(command)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exit_:
        message = errors.getvalue().strip().splitlines()[-1] if errors.getvalue().strip() else ""
        if exit_.code and (fenced or "arguments are required" not in message):
            pytest.fail(f"{command!r} does not parse: {message}")


# ---------------------------------------------------------------- the benchmark scripts' commands
RESULTS_DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "benchmarks" / "results").rglob("*.md"))]
#: compiles kernels for a GPU target: refuses to import under TRITON_INTERPRET=1 (set for the tests)
NOT_IMPORTABLE_HERE = {"kernel_resources"}


def benchmark_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(script, arguments)`` of each ``python [benchmarks/]SCRIPT.py ...`` command in ``text``'s
    fenced blocks and code spans (the ``Command:`` lines of the results files included), skipping
    those with placeholders (``<...>``, ``...``, ``$VAR``, ``[OPTIONAL]``)."""
    text = text.replace("\\\n", " ")
    spans = [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    spans += re.findall(r"`([^`\n]+)`", re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S))
    commands = []
    for span in spans:
        for match in re.finditer(r"python (?:benchmarks/)?(\w+)\.py\b", span):
            command = re.split(r" && | \| |\s#| > |\)$|; ", span[match.end():])[0]
            if not any(mark in command for mark in ("<", "...", "$", "[")):
                commands.append((match.group(1), shlex.split(command)))
    return commands


BENCHMARK_CASES = sorted(
    {
        (script, tuple(argv), str(path.relative_to(ROOT)))
        for path in RESULTS_DOCUMENTS
        for script, argv in benchmark_commands(path.read_text())
        if (ROOT / "benchmarks" / f"{script}.py").is_file() and script not in NOT_IMPORTABLE_HERE
    }
)


class _Parsed(Exception):
    """Raised instead of running the benchmark once its arguments parsed."""


def test_the_results_print_benchmark_commands() -> None:
    scripts = {script for script, _, _ in BENCHMARK_CASES}
    assert {"cpu_step", "fewshot", "meta_train_throughput", "optimizee_eval", "lr_sensitivity", "readme_table"} <= scripts


@pytest.mark.parametrize(
    "script, argv, document", BENCHMARK_CASES, ids=[f"{d}:{s} {' '.join(a)[:50]}" for s, a, d in BENCHMARK_CASES]
)
def test_documented_benchmark_command_parses(script: str, argv: tuple[str, ...], document: str, monkeypatch) -> None:
    import argparse
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module(script)
    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        parse_args(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            module.main(*([list(argv)] if script in ("lr_sensitivity", "readme_table", "reproduction_check") else []))
        except _Parsed:
            return
        except SystemExit as exit_:
            message = errors.getvalue().strip().splitlines()[-1] if errors.getvalue().strip() else ""
            pytest.fail(f"{document}: python benchmarks/{script}.py {' '.join(argv)!r} does not parse: {exit_.code} {message}")
    pytest.fail(f"{script}.py has no argument parser: it ran")
