"""``keep_freed_memory``: the meta-train command's malloc setting, its switch and its effect."""

from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from learnedopt import freed_memory
from learnedopt.cli import main

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# a truncation's pattern: many tensors of a few MB, all freed, again; page faults of each round
ROUNDS = """
import resource, sys, torch
from learnedopt.freed_memory import keep_freed_memory
print(keep_freed_memory())
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(2_500_000) for _ in range(40)]  # 40 x 10 MB
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
"""


def rounds_faults(switch: str) -> tuple[bool, list[int]]:
    env = {**os.environ, freed_memory.SWITCH: switch}
    env.pop("GLIBC_TUNABLES", None)
    done = subprocess.run([sys.executable, "-c", ROUNDS], env=env, capture_output=True, text=True, timeout=120, check=True)
    applied, faults = done.stdout.split("\n")[:2]
    return applied == "True", ast.literal_eval(faults)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's: elsewhere keep_freed_memory does nothing")
def test_freed_memory_is_reused_not_faulted_in_again() -> None:
    """Without it glibc returns the freed heap to the OS and the next round touches 400 MB of new
    pages (about 100,000 faults); with it the second and third rounds reuse the first's."""
    applied, faults = rounds_faults("1")
    assert applied
    assert max(faults[1:]) < 5_000, faults
    applied, faults = rounds_faults("0")
    assert not applied
    assert faults[1] > 50_000, faults  # the effect is the setting's, not this machine's default


def test_switch_off_leaves_malloc_alone(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(freed_memory.ctypes, "CDLL", lambda *a: calls.append(a))
    monkeypatch.setenv(freed_memory.SWITCH, "0")
    assert freed_memory.keep_freed_memory() is False
    assert calls == []


def test_bad_switch_value_is_a_one_line_meta_train_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(freed_memory.SWITCH, "sometimes")
    code = main(["meta-train", "--task", "quadratic", "--meta-steps", "1", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("learnedopt meta-train: error: LEARNEDOPT_KEEP_FREED_MEMORY='sometimes'"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
