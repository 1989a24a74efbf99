"""Pure per-coordinate math shared by the update-rule networks.

Every function works on a batch of coordinates: row ``n`` of each input belongs to one parameter
element. Nothing here holds state or knows about optimizers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def preprocess(x: Tensor, p: float) -> Tensor:
    """Andrychowicz et al. (2016) input preprocessing of a gradient (or any signed value).

    ``x -> (log|x| / p, sign x)`` when ``|x| >= e^-p``, else ``(-1, e^p x)``.

    Written as ``(log(max(|x|, e^-p)) / p, clamp(e^p x, -1, 1))``, which is the same function on
    both sides of the threshold and has no ``log(0)``, so it stays finite under autograd.

    Args:
        x: ``(n,)`` values.
        p: the preprocessing constant (10 in the paper).

    Returns:
        ``(n, 2)`` features, in the dtype of ``x``.
    """
    if p <= 0:
        raise ValueError(f"preprocessing constant p must be positive, got {p}")
    magnitude = torch.log(x.abs().clamp_min(math.exp(-p))) / p
    direction = (x * math.exp(p)).clamp(-1.0, 1.0)
    return torch.stack((magnitude, direction), dim=-1)


def lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor]:
    """One LSTM cell step for a batch of coordinates.

    Gate rows of the weights are ordered (input, forget, output, cell): the three sigmoid gates
    first, so they are activated in one call. (``torch.nn.LSTMCell`` orders them i, f, g, o.)

    Args:
        x: ``(n, in)`` inputs.
        h, c: ``(n, H)`` previous hidden and cell state.
        weight_ih: ``(4H, in)``; weight_hh: ``(4H, H)``; bias: ``(4H,)``.

    Returns:
        The new ``(h, c)``, each ``(n, H)``.
    """
    hidden = h.shape[-1]
    gates = torch.addmm(bias, x, weight_ih.t())
    gates = torch.addmm(gates, h, weight_hh.t())
    sig = torch.sigmoid(gates[:, : 3 * hidden])
    cell_input = torch.tanh(gates[:, 3 * hidden :])
    i, f, o = sig[:, :hidden], sig[:, hidden : 2 * hidden], sig[:, 2 * hidden :]
    c_new = torch.addcmul(f * c, i, cell_input)
    h_new = o * torch.tanh(c_new)
    return h_new, c_new
