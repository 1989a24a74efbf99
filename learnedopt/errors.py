"""Errors shared by the optimizers (:mod:`learnedopt.optim`) and the functional updates
(:mod:`learnedopt.meta.unroll`), which do not import each other."""

from __future__ import annotations


class NonFiniteGradientError(RuntimeError):
    """A gradient (or the loss, or a value the rule reads) holds NaN or Inf under
    ``nan_policy="raise"``; nothing was changed or computed."""
