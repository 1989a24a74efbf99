"""``python -m learnedopt.train ARGS``: the same command as ``learnedopt meta-train ARGS`` and
``python -m learnedopt.meta.train ARGS`` (also under ``torchrun ... -m learnedopt.train``).
The command lives in :mod:`learnedopt.meta.command`; this module only gives it the shorter name."""

from .meta import distributed
from .meta.command import main

if __name__ == "__main__":
    distributed.exit_process(main(prog="python -m learnedopt.train"))
