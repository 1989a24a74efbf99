"""``learnedopt.__version__``, the library's version (``pyproject.toml``'s ``version``).

A module of its own, importing nothing, so that the weight files, few-shot model files and run
cards that record it read it without importing the package's ``__init__``, which imports the
optimizers and meta-learning on top of them.
"""

__version__ = "0.1.0"
