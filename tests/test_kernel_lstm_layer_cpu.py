"""The fused CPU LSTM layer (learnedopt.kernels.lstm_layer_cpu) against torch.nn.LSTM in float64,
its thread split, its build cache and fallback, and the LSTM step's use of it."""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import needs_compiler, run_without_hanging

from learnedopt.kernels import lstm_layer_cpu
from learnedopt.nn.lstm_step import lstm_step

# the library falls back without a compiler (tested below with the compiler hidden); the kernel's
# own tests need one, as torch.compile's do (needs_compiler: skipped where there is none)


def _layer(inputs: int, hidden: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cell = torch.nn.LSTMCell(inputs, hidden)
    with torch.no_grad():
        for p in cell.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x, h, c = (torch.randn(n, size, generator=g) for size in (inputs, hidden, hidden))
    grads = [torch.randn(n, hidden, generator=g) for _ in range(3)]  # of h' (two parts) and c'
    return cell, x, h, c, grads


def _head(hidden: int, n: int, seed: int = 1):
    """A linear head's weight (1, H), bias (1,) and a gradient of its output (n,)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, hidden, generator=g), torch.randn(1, generator=g), torch.randn(n, generator=g)


def _reference(cell, x, h, c, grads, head=None):
    """Values and gradients of the layer in float64 by autograd through ``nn.LSTMCell`` (with
    ``head``: then the head's output, weight and bias gradients)."""
    cell = copy.deepcopy(cell).double().requires_grad_(True)
    x, h, c = (t.double().requires_grad_(True) for t in (x, h, c))
    h_new, c_new = cell(x, (h, c))
    grad_h, grad_more, grad_c = (g.double() for g in grads)
    outputs, output_grads, wrt = [h_new, c_new], [grad_h + grad_more, grad_c], [x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    if head is not None:
        head_weight, head_bias = (t.double().requires_grad_(True) for t in head[:2])
        out = h_new @ head_weight[0] + head_bias
        outputs.append(out)
        output_grads.append(head[2].double())
        wrt += [head_weight, head_bias]
    dx, dh, dc, dw_ih, dw_hh, db, _, *head_grads = torch.autograd.grad(outputs, wrt, output_grads)
    results = (h_new, c_new, dx, dh, dc, torch.cat((dw_ih, dw_hh), dim=1), db)
    return results if head is None else (*results, out, *head_grads)


def _kernel(cell, x, h, c, grads, head=None):
    n, hidden = h.shape
    weight = torch.cat((cell.weight_ih, cell.weight_hh), dim=1).detach()
    bias = (cell.bias_ih + cell.bias_hh).detach()
    h_new, c_new = torch.empty(n, hidden), torch.empty(n, hidden)
    assert lstm_layer_cpu.ready(x.shape[1], hidden)
    head_weight, head_bias, grad_head = (None, None, None) if head is None else head
    act, tanh_c, out = lstm_layer_cpu.lstm_layer_forward(
        x, h, c, weight, bias, h_new, c_new, save=True, head_weight=head_weight, head_bias=head_bias
    )
    dc, dh = torch.empty(n, hidden), torch.empty(n, hidden)
    dx, dw, db, dhw, dhb = lstm_layer_cpu.lstm_layer_backward(
        x, h, c, weight, act, tanh_c, *grads, dc, dh, need_x=True, grad_head=grad_head, head_weight=head_weight
    )
    results = (h_new, c_new, dx, dh, dc, dw, db)
    return results if head is None else (*results, out, dhw.reshape(1, -1), dhb)


@needs_compiler
@pytest.mark.parametrize(
    ("inputs", "hidden", "n"),
    [(2, 20, 37), (10, 20, 4), (20, 20, 5), (1, 4, 3), (3, 8, 1), (2, 20, 0)],
)
def test_matches_torch_lstm_cell_in_float64(inputs: int, hidden: int, n: int) -> None:
    """Both directions to float32 rounding of the float64 values (exp by polynomial, products
    summed in another order), at row counts below, at and past the kernel's tile of four."""
    cell, x, h, c, grads = _layer(inputs, hidden, n)
    got = _kernel(cell, x, h, c, grads)
    want = _reference(cell, x, h, c, grads)
    names = ["h'", "c'", "x grad", "h grad", "c grad", "weight grad", "bias grad"]
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5 * max(1.0, b.abs().max().item() if b.numel() else 1.0), msg=name)


@needs_compiler
@pytest.mark.parametrize(("inputs", "hidden", "n"), [(2, 20, 37), (20, 20, 6), (1, 4, 3), (3, 8, 0)])
def test_head_matches_torch_in_float64(inputs: int, hidden: int, n: int) -> None:
    """With a linear head on h' (the update rule's output), computed in the same pass: its
    value, and every gradient with its gradient flowing into h' as well, to float32 rounding."""
    cell, x, h, c, grads = _layer(inputs, hidden, n)
    head = _head(hidden, n)
    got = _kernel(cell, x, h, c, grads, head)
    want = _reference(cell, x, h, c, grads, head)
    names = ["h'", "c'", "x grad", "h grad", "c grad", "weight grad", "bias grad", "head", "head weight grad", "head bias grad"]
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5 * max(1.0, b.abs().max().item() if b.numel() else 1.0), msg=name)


@needs_compiler
def test_a_rows_results_do_not_depend_on_the_batch() -> None:
    """A coordinate's step must not depend on how coordinates were batched: rows computed within
    20,001 rows and within a batch of 37 of them starting at another tile offset (so in the tail
    of single rows after the tiles of four) give the same bits, head included."""
    n = 20_001
    cell, x, h, c, grads = _layer(2, 20, n)
    head_weight, head_bias, _ = _head(20, n)
    weight = torch.cat((cell.weight_ih, cell.weight_hh), dim=1).detach()
    bias = (cell.bias_ih + cell.bias_hh).detach()
    assert lstm_layer_cpu.ready(2, 20)

    def forward(rows: slice):
        count = rows.stop - rows.start
        h_new, c_new = torch.empty(count, 20), torch.empty(count, 20)
        saved = lstm_layer_cpu.lstm_layer_forward(
            x[rows], h[rows], c[rows], weight, bias, h_new, c_new, save=True, head_weight=head_weight, head_bias=head_bias
        )
        return h_new, c_new, *saved

    whole = forward(slice(0, n))
    for start in (0, 5, n - 37):
        part = forward(slice(start, start + 37))
        for name, a, b in zip(["h'", "c'", "activations", "tanh(c')", "head"], part, whole, strict=True):
            assert torch.equal(a, b[start : start + 37]), (name, start)


@needs_compiler
@pytest.mark.parametrize("layout", ["feature-major", "column slice", "every other row"])
def test_x_at_any_strides_gives_the_bits_of_a_contiguous_x(layout: str) -> None:
    """``x`` is read in place at its strides (an update rule's features come feature-major, the
    transpose of ``(in, n)``): every output and gradient, head included, has the bits of the
    same values in a contiguous ``x``. A kernel that read a strided ``x`` as contiguous would read
    other values."""
    n, inputs = 37, 10
    cell, x, h, c, grads = _layer(inputs, 20, n)
    head = _head(20, n)
    strided = {
        "feature-major": x.t().contiguous().t(),
        "column slice": torch.cat((x, torch.randn(n, 3)), dim=1)[:, :inputs],
        "every other row": torch.stack((x, torch.randn(n, inputs)), dim=1)[:, 0],
    }[layout]
    assert torch.equal(strided, x) and not strided.is_contiguous()
    want = _kernel(cell, x, h, c, grads, head)
    got = _kernel(cell, strided, h, c, grads, head)
    for name, a, b in zip(["h'", "c'", "x grad", "h grad", "c grad", "weight grad", "bias grad", "head"], got, want):
        assert torch.equal(a, b), name


@needs_compiler
def test_outputs_at_any_alignment_get_the_same_bits_and_nothing_else() -> None:
    """``h'``, ``c'`` and the gradients of ``c`` and ``h`` are written by streamed stores where a
    tile's rows are whole aligned vectors and by ordinary ones elsewhere: outputs placed 0, 1 or 16
    floats into a buffer (64-byte aligned at 0 and 16, not at 1) get the same bits, the values of
    the float64 reference, and the floats around them stay as they were."""
    n, hidden = 37, 20  # nine tiles of four rows and a row of its own
    cell, x, h, c, grads = _layer(10, hidden, n)
    head_weight, head_bias, grad_head = _head(hidden, n)
    reference = _reference(cell, x, h, c, grads, (head_weight, head_bias, grad_head))
    weight = torch.cat((cell.weight_ih, cell.weight_hh), dim=1).detach()
    bias = (cell.bias_ih + cell.bias_hh).detach()
    assert lstm_layer_cpu.ready(10, hidden)
    results = []
    for offset in (0, 1, 16):
        buffers = [torch.full((offset + n * hidden + 16,), 7.0) for _ in range(4)]
        h_new, c_new, dc, dh = (b[offset : offset + n * hidden].view(n, hidden) for b in buffers)
        assert (h_new.data_ptr() % 64 == 0) == (offset != 1)
        act, tanh_c, out = lstm_layer_cpu.lstm_layer_forward(
            x, h, c, weight, bias, h_new, c_new, save=True, head_weight=head_weight, head_bias=head_bias
        )
        lstm_layer_cpu.lstm_layer_backward(x, h, c, weight, act, tanh_c, *grads, dc, dh, need_x=True, grad_head=grad_head, head_weight=head_weight)
        for b in buffers:
            assert (b[:offset] == 7.0).all() and (b[offset + n * hidden :] == 7.0).all()
        results.append((h_new, c_new, dc, dh, out))
    references = [*reference[:2], reference[4], reference[3], reference[7]]
    for k, name in enumerate(["h'", "c'", "c grad", "h grad", "head"]):
        torch.testing.assert_close(results[0][k].double(), references[k].detach(), rtol=1e-4, atol=1e-4, msg=name)
        assert torch.equal(results[1][k], results[0][k]) and torch.equal(results[2][k], results[0][k]), name


@needs_compiler
def test_optional_gradients_and_no_saving() -> None:
    """Absent gradients count as zero; unwanted outputs are not written; ``save=False`` gives
    the same ``h'``, ``c'`` and nothing to save."""
    cell, x, h, c, grads = _layer(2, 20, 9)
    full = _kernel(cell, x, h, c, [grads[0], torch.zeros_like(grads[1]), torch.zeros_like(grads[2])])
    weight = torch.cat((cell.weight_ih, cell.weight_hh), dim=1).detach()
    bias = (cell.bias_ih + cell.bias_hh).detach()
    h_new, c_new = torch.empty(9, 20), torch.empty(9, 20)
    assert lstm_layer_cpu.lstm_layer_forward(x, h, c, weight, bias, h_new, c_new, save=False) == (None, None, None)
    assert torch.equal(h_new, full[0]) and torch.equal(c_new, full[1])
    head_weight, head_bias, _ = _head(20, 9)
    *nothing, head = lstm_layer_cpu.lstm_layer_forward(
        x, h, c, weight, bias, h_new, c_new, save=False, head_weight=head_weight, head_bias=head_bias
    )
    assert nothing == [None, None] and torch.equal(h_new, full[0])
    torch.testing.assert_close(head, h_new @ head_weight[0] + head_bias)
    act, tanh_c, _ = lstm_layer_cpu.lstm_layer_forward(x, h, c, weight, bias, h_new, c_new, save=True)
    dc = torch.empty(9, 20)
    dx, dw, db, dhw, dhb = lstm_layer_cpu.lstm_layer_backward(x, h, c, weight, act, tanh_c, grads[0], None, None, dc, None, need_x=False)
    assert dx is None and dhw is None and dhb is None
    # a head whose gradient is absent adds nothing to h''s, and its own gradients are zero
    with_head = lstm_layer_cpu.lstm_layer_backward(
        x, h, c, weight, act, tanh_c, grads[0], None, None, dc, None, need_x=False, head_weight=head_weight
    )
    assert torch.equal(with_head[1], dw) and not with_head[3].any() and not with_head[4].any()
    assert torch.equal(dc, full[4]) and torch.equal(dw, full[5]) and torch.equal(db, full[6])


@needs_compiler
def test_threads_split_rows_deterministically(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over several threads the rows are split into parts with their own weight gradient, summed
    in a fixed order: equal to one thread's results to rounding, and the same bits every run."""
    cell, x, h, c, grads = _layer(10, 20, 203)
    one = _kernel(cell, x, h, c, grads)
    monkeypatch.setattr(lstm_layer_cpu, "MIN_ROWS_PER_THREAD", 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert lstm_layer_cpu._parts(203) == 3  # of 68, 68 and 67 rows
        split = _kernel(cell, x, h, c, grads)
        again = _kernel(cell, x, h, c, grads)
    finally:
        torch.set_num_threads(threads)
    for a, b, name in zip(split, one, ["h'", "c'", "dx", "dh", "dc", "dw", "db"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item(), msg=name)
    assert all(torch.equal(a, b) for a, b in zip(split, again, strict=True))


@needs_compiler
@pytest.mark.parametrize("n", [203, 37, 16])
def test_forward_outputs_head_included_do_not_depend_on_the_threads(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Each row's forward outputs, the head included (summed for 16 rows at a time where a part
    has them, else per tile of four or per row), are the same bits over one, two and three
    threads, whose parts start at other rows (203: parts of 104 and 99 rows, or 68, 68, 67)."""
    cell, x, h, c, _ = _layer(2, 20, n)
    head_weight, head_bias, _ = _head(20, n)
    weight = torch.cat((cell.weight_ih, cell.weight_hh), dim=1).detach()
    bias = (cell.bias_ih + cell.bias_hh).detach()
    assert lstm_layer_cpu.ready(2, 20)
    monkeypatch.setattr(lstm_layer_cpu, "MIN_ROWS_PER_THREAD", 4)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            assert lstm_layer_cpu._parts(n) == count
            h_new, c_new = torch.empty(n, 20), torch.empty(n, 20)
            saved = lstm_layer_cpu.lstm_layer_forward(
                x, h, c, weight, bias, h_new, c_new, save=True, head_weight=head_weight, head_bias=head_bias
            )
            results.append((h_new, c_new, *saved))
    finally:
        torch.set_num_threads(threads)
    want = h_new.double() @ head_weight[0].double() + head_bias.double()
    torch.testing.assert_close(results[0][-1].double(), want, rtol=1e-5, atol=1e-5)
    for got in results[1:]:
        for name, a, b in zip(["h'", "c'", "activations", "tanh(c')", "head"], got, results[0], strict=True):
            assert torch.equal(a, b), (name, n)


def test_threads_only_for_enough_rows_per_thread() -> None:
    """Rows are split over torch's threads only in parts of at least MIN_ROWS_PER_THREAD (a
    thread's start costs more than a few rows), never over more parts than threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        rows = lstm_layer_cpu.MIN_ROWS_PER_THREAD
        got = [lstm_layer_cpu._parts(n) for n in (0, 1, rows - 1, rows, 2 * rows - 1, 2 * rows, 3 * rows + 5, 100 * rows)]
    finally:
        torch.set_num_threads(threads)
    assert got == [1, 1, 1, 1, 1, 2, 3, 4]


@needs_compiler
@pytest.mark.parametrize(("n", "parts"), [(13, 3), (9, 2), (17, 4), (5, 4), (1, 3), (33, 4)])
def test_each_part_holds_its_own_rows_weight_gradient(n: int, parts: int) -> None:
    """Split into ``parts`` (each a multiple of 4 rows but the last), every row is computed once
    and part ``p``'s weight and bias gradient block is exactly the gradient of its own rows: a
    split that dropped a row (13 rows in 3 parts of 4) or parts sharing one block (a race
    between threads) would not be."""
    cell, x, h, c, grads = _layer(5, 8, n)
    head_weight, head_bias, grad_head = _head(8, n)
    weight = torch.cat((cell.weight_ih, cell.weight_hh), dim=1).detach()
    bias = (cell.bias_ih + cell.bias_hh).detach()
    assert lstm_layer_cpu.ready(5, 8)
    library = lstm_layer_cpu._built(5, 8)
    h_new, c_new = torch.full((n, 8), float("nan")), torch.full((n, 8), float("nan"))
    act, tanh_c, out = torch.full((n, 32), float("nan")), torch.full((n, 8), float("nan")), torch.full((n,), float("nan"))
    weight_t = weight.t().contiguous()
    forward = (h, c, weight_t, bias, act, tanh_c, h_new, c_new, head_weight, head_bias, out)
    library.lstm_layer_forward(n, parts, x.data_ptr(), *x.stride(), *(t.data_ptr() for t in forward))
    head = (head_weight, head_bias, grad_head)
    whole = _kernel(cell, x, h, c, grads, head)  # one part
    assert torch.equal(h_new, whole[0]) and torch.equal(c_new, whole[1]) and torch.equal(out, whole[7])
    padded = torch.zeros(32, 16)
    padded[:, :13] = weight
    # per part: the weight gradient, and the bias's (32), head weight's (8), head bias's (1)
    grad_wt, grad_sums = torch.zeros(parts, 13, 32), torch.zeros(parts, 32 + 8 + 1)
    grad_x, grad_h, grad_c = torch.full((n, 5), float("nan")), torch.full((n, 8), float("nan")), torch.full((n, 8), float("nan"))
    tensors = (h, c, act, tanh_c, *grads, grad_head, head_weight, padded, grad_wt, grad_sums, grad_x, grad_h, grad_c)
    library.lstm_layer_backward(n, parts, x.data_ptr(), *x.stride(), *(t.data_ptr() for t in tensors))
    assert torch.equal(grad_x, whole[2]) and torch.equal(grad_h, whole[3]) and torch.equal(grad_c, whole[4])
    step = -(-(-(-n // parts)) // 4) * 4
    for p in range(parts):
        rows = slice(min(p * step, n), min(p * step + step, n))
        if rows.start == rows.stop:
            assert not grad_wt[p].any() and not grad_sums[p].any()
            continue
        own = _kernel(cell, x[rows], h[rows], c[rows], [g[rows] for g in grads], (head_weight, head_bias, grad_head[rows]))
        assert torch.equal(grad_wt[p].t(), own[5]) and torch.equal(grad_sums[p], torch.cat((own[6], own[8][0], own[9]))), p


@needs_compiler
def test_activations_are_torchs_to_a_few_ulp() -> None:
    """The gates' sigmoid and tanh (through the kernel's polynomial exp) over the whole float
    range, to a few float32 ulp of float64 (pre-activations exact: one input of weight 1): the
    comparisons through products and gradients leave room for an exp off by 1e-6."""
    z = torch.cat((torch.linspace(-100, 100, 2001), torch.tensor([-88.5, -88.3, -87.0, 88.5, 1e-3, -1e-3, 0.0])))
    cell = torch.nn.LSTMCell(1, 4)
    with torch.no_grad():
        cell.weight_ih.fill_(1.0)
        cell.weight_hh.zero_()
        cell.bias_ih.zero_()
        cell.bias_hh.zero_()
    n = z.numel()
    h, c = torch.zeros(n, 4), torch.zeros(n, 4)
    assert lstm_layer_cpu.ready(1, 4)
    weight = torch.cat((cell.weight_ih, cell.weight_hh), dim=1).detach()
    act, _, _ = lstm_layer_cpu.lstm_layer_forward(z[:, None], h, c, weight, torch.zeros(16), torch.empty(n, 4), torch.empty(n, 4), save=True)
    sigmoid, tanh = torch.sigmoid(z.double()), torch.tanh(z.double())
    want = torch.stack((sigmoid, sigmoid, tanh, sigmoid), dim=1).repeat_interleave(4, dim=1)
    # sigmoid: relative; tanh = 2 sigmoid(2z) - 1 loses relative precision near 0: absolute
    torch.testing.assert_close(act[:, [0, 4, 12]].double(), want[:, [0, 4, 12]], rtol=5e-7, atol=1e-38)
    torch.testing.assert_close(act[:, 8].double(), want[:, 8], rtol=5e-7, atol=2e-7)


@pytest.mark.parametrize(
    ("dtype", "hidden", "device", "applies"),
    [(torch.float32, 20, "cpu", True), (torch.float64, 20, "cpu", False), (torch.float32, 10, "cpu", False),
     (torch.bfloat16, 20, "cpu", False), (torch.float32, 20, "meta", False)],
)  # fmt: skip
def test_applies_to_float32_cpu_tensors_of_a_hidden_size_divisible_by_4(monkeypatch: pytest.MonkeyPatch, dtype, hidden, device, applies) -> None:
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)  # not an earlier failed build's (no compiler)
    t = torch.empty(3, hidden, dtype=dtype, device=device)
    assert lstm_layer_cpu.applies(t, hidden=hidden) is applies


@pytest.mark.parametrize(("value", "on"), [("0", False), ("off", False), ("1", True), ("", True)])
def test_switch(monkeypatch: pytest.MonkeyPatch, value: str, on: bool) -> None:
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)  # not an earlier failed build's (no compiler)
    monkeypatch.setenv("LEARNEDOPT_CPU_KERNEL", value)
    assert lstm_layer_cpu.applies(torch.empty(2, 20), hidden=20) is on


def test_switch_refuses_an_unknown_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)  # not an earlier failed build's (no compiler)
    monkeypatch.setenv("LEARNEDOPT_CPU_KERNEL", "fast")
    with pytest.raises(ValueError, match="LEARNEDOPT_CPU_KERNEL='fast'"):
        lstm_layer_cpu.applies(torch.empty(2, 20), hidden=20)


@pytest.mark.parametrize("variable", ["LEARNEDOPT_CACHE_DIR", "XDG_CACHE_HOME"])
def test_the_cache_folder_expands_a_leading_tilde(monkeypatch: pytest.MonkeyPatch, tmp_path, variable) -> None:
    """A ``~`` the shell did not expand (quoted, a Dockerfile's ENV, a .env file) was taken as a
    folder named ``~`` in the working directory, made anew in each one the kernel was built from;
    LEARNEDOPT_DATA expands it, as do torch's TORCH_HOME and pip's cache settings."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("LEARNEDOPT_CACHE_DIR", raising=False)
    monkeypatch.setenv(variable, "~/kernels")
    expected = tmp_path / "kernels" if variable == "LEARNEDOPT_CACHE_DIR" else tmp_path / "kernels" / "learnedopt"
    assert lstm_layer_cpu.cache_dir() == expected


@needs_compiler
def test_built_once_into_the_cache_and_loaded_from_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    assert lstm_layer_cpu.ready(7, 4)
    built = list(tmp_path.glob("lstm_layer_cpu_7_4_*.so"))
    assert len(built) == 1
    # a new process (here: an empty in-memory table) loads the file without compiling
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu.subprocess, "Popen", lambda *a, **k: pytest.fail("compiled again"))
    assert lstm_layer_cpu.ready(7, 4)
    # no temporary file left; the digest that vouches for the build beside it
    assert sorted(tmp_path.iterdir()) == [built[0], tmp_path / f"{built[0].name}.sha256"]


@needs_compiler
def test_cxx_may_be_a_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``CXX="ccache g++"`` (a wrapper and its arguments, as build tools take it) builds through
    that command; it was looked up as one file name, not found, and passed over."""
    log = tmp_path / "args"
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {log}\nshift\nexec "$@"\n')
    wrapper.chmod(0o755)
    compiler = lstm_layer_cpu._compiler()[0]
    monkeypatch.setenv("CXX", f"{wrapper} --marker {compiler}")
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    assert lstm_layer_cpu._compiler() == [str(wrapper), "--marker", compiler]
    assert lstm_layer_cpu.ready(7, 4)
    assert log.read_text().splitlines()[:2] == ["--marker", compiler]


@needs_compiler
def test_a_cxx_that_is_not_a_command_line_is_passed_over(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A ``CXX`` that does not split as a command line (an unclosed quote) is passed over like one
    that names no program: it raised shlex's ValueError out of every step of a rule."""
    compiler = lstm_layer_cpu._compiler()
    monkeypatch.setenv("CXX", 'g++ -DNAME="unclosed')
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    assert lstm_layer_cpu._compiler() == compiler
    assert lstm_layer_cpu.ready(7, 4)


@needs_compiler
def test_a_damaged_build_in_the_cache_is_built_again(tmp_path) -> None:
    """A truncated kernel under its final name (a crash before the disk had it, a partial copy
    of a cache) is built again, not loaded: loading it killed every process (SIGBUS)."""
    script = (
        "import sys; from learnedopt.kernels import lstm_layer_cpu as k; "
        "sys.exit(0 if k.ready(5, 8) else 3)"
    )
    env = {**os.environ, "LEARNEDOPT_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}
    run = lambda: subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    assert run().returncode == 0
    (built,) = tmp_path.glob("lstm_layer_cpu_5_8_*.so")
    whole = built.read_bytes()
    built.write_bytes(whole[: len(whole) // 2])
    done = run()
    assert done.returncode == 0, done.stderr[-2000:]
    assert built.read_bytes() == whole


@needs_compiler
def test_a_digest_damaged_into_bytes_that_are_not_text_is_built_again(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A kernel's digest file damaged into bytes that do not decode as text (a partial copy, a
    disk error) counts as a mismatch, as a wrong digest does, and the kernel is built again:
    its UnicodeDecodeError escaped ready() and failed every step of a rule."""
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    assert lstm_layer_cpu.ready(7, 4)
    (digest,) = tmp_path.glob("lstm_layer_cpu_7_4_*.so.sha256")
    whole = digest.read_bytes()
    digest.write_bytes(b"\xff\xfe\x00" + whole[3:])
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})  # a new process
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # built again, not turned off with a warning
        assert lstm_layer_cpu.ready(7, 4)
    assert digest.read_bytes() == whole


@needs_compiler
def test_an_unwritable_cache_builds_into_a_temporary_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A cache folder that cannot be made (here: under a file; a read-only home) still gives the
    kernel, built for this process, with one warning naming the folder and the variable."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    monkeypatch.setattr(lstm_layer_cpu, "_warned_unwritable", False, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lstm_layer_cpu.ready(3, 4) and lstm_layer_cpu.ready(4, 4)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert str(blocker / "cache") in messages[0] and "LEARNEDOPT_CACHE_DIR" in messages[0]
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary folder removed once loaded
    cell, x, h, c, grads = _layer(3, 4, 6)
    for a, b in zip(_kernel(cell, x, h, c, grads), _reference(cell, x, h, c, grads), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)


def test_no_compiler_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Without a working compiler the step runs as products and pointwise code, with the same
    results to rounding, one warning, and no second try."""
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "1")
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    monkeypatch.setattr(lstm_layer_cpu, "_compiler", lambda: None)
    lstm = torch.nn.LSTM(2, 20, 2)
    x, h, c = torch.randn(5, 2), torch.randn(2, 5, 20, requires_grad=True), torch.randn(2, 5, 20)
    with pytest.warns(UserWarning, match="fused CPU LSTM layer could not be built .*no C\\+\\+ compiler found"):
        top, _, _ = lstm_step(lstm, x, h, c)
    assert not lstm_layer_cpu.applies(x, hidden=20)
    want = lstm(x[None], (h, c))[0][0]
    torch.testing.assert_close(top, want, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lstm_step(lstm, x, h, c)[0].sum().backward()


@pytest.mark.parametrize("compiler", ["none", "failing"])
def test_no_working_compiler_for_the_kernel_nor_torch_compile_gives_one_warning(monkeypatch: pytest.MonkeyPatch, tmp_path, compiler: str) -> None:
    """No C++ compiler, or one that fails (``CXX=false``): the kernel cannot be built, and
    torch.compile's CPU code cannot be either (Inductor's InvalidCxxCompiler, simulated here). A
    meta-training step (forward and backward) falls back with one warning, the kernel's, naming
    the problem, as the README says; it gave three (the kernel's, then one per compiled
    pointwise function)."""
    import learnedopt.nn.lstm_step as lstm_step_module

    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "1")
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    monkeypatch.setattr(lstm_layer_cpu, "_compiler", lambda: None if compiler == "none" else [shutil.which("false")])
    monkeypatch.setattr(lstm_step_module, "_compile_warned", False)
    for name in ("_cell_forward", "_cell_backward"):
        monkeypatch.setattr(lstm_step_module, name, lstm_step_module._Compiled(getattr(lstm_step_module, name).fn))

    def no_cxx(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", no_cxx)
    lstm = torch.nn.LSTM(2, 20, 2)
    x, h, c = torch.randn(5, 2), torch.randn(2, 5, 20, requires_grad=True), torch.randn(2, 5, 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            top, _, _ = lstm_step(lstm, x, h, c)
            top.sum().backward()
    messages = [str(w.message) for w in caught]
    named = "no C++ compiler found" if compiler == "none" else "false failed: status 1"
    assert len(messages) == 1 and named in messages[0], messages
    assert lstm_step_module._cell_forward.failed and lstm_step_module._cell_backward.failed
    torch.testing.assert_close(top, lstm(x[None], (h, c))[0][0], rtol=1e-5, atol=1e-6)


@needs_compiler
def test_compiler_error_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(lstm_layer_cpu, "SOURCE", broken)
    with pytest.warns(UserWarning, match="could not be built .*failed: .*error"):
        assert not lstm_layer_cpu.ready(2, 20)
    assert not any(tmp_path.glob("*.so"))


@needs_compiler
@pytest.mark.parametrize("with_head", [False, True])
def test_lstm_step_uses_the_kernel_and_matches_the_products_path(monkeypatch: pytest.MonkeyPatch, with_head: bool) -> None:
    """A two-layer step through the kernel (both layers; with a linear head, computed by the top
    layer's kernel) against the same step with the kernel off (the head in torch operations):
    values and every gradient to float32 rounding."""
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "1")
    calls = []
    original = lstm_layer_cpu.lstm_layer_backward
    monkeypatch.setattr(lstm_layer_cpu, "lstm_layer_backward", lambda *a, **k: calls.append(k.get("head_weight") is not None) or original(*a, **k))
    lstm = torch.nn.LSTM(10, 20, 2)
    head = torch.nn.Linear(20, 1) if with_head else None
    weights = (*lstm.parameters(), *(head.parameters() if with_head else ()))
    x = torch.randn(301, 10, requires_grad=True)
    h, c = torch.randn(2, 301, 20, requires_grad=True), torch.randn(2, 301, 20, requires_grad=True)
    g = [torch.randn(301) if with_head else torch.randn(301, 20), torch.randn(2, 301, 20), torch.randn(2, 301, 20)]
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("LEARNEDOPT_CPU_KERNEL", switch)
        outs = lstm_step(lstm, x, h, c, head=head)
        assert outs[0].shape == g[0].shape
        grads = torch.autograd.grad(outs, (x, h, c, *weights), g)
        results[switch] = (*outs, *grads)
        with torch.no_grad():  # the optimizer's step: the same values
            assert all(torch.equal(a, b) for a, b in zip(lstm_step(lstm, x, h, c, head=head), outs))
    assert calls == [with_head, False]  # one per layer (the top first), with the kernel on only
    for a, b in zip(results["1"], results["0"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_non_finite_inputs_give_what_torch_gives() -> None:
    """NaN stays NaN (a clamp that compared NaN to its bounds turned it into a finite value),
    infinities and huge values saturate the gates as in torch, row by row."""
    cell, x, h, c, grads = _layer(2, 20, 6)
    x[1, 0], x[2, 0], x[3, 1], x[4, 0], h[5, 3] = float("nan"), float("inf"), -float("inf"), 1e30, float("nan")
    got = _kernel(cell, x, h, c, grads)
    want = _reference(cell, x, h, c, grads)
    for name, a, b in zip(["h'", "c'", "x grad", "h grad", "c grad"], got, want):
        assert torch.equal(a.isnan(), b.isnan()), name
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5, equal_nan=True, msg=name)


@needs_compiler
def test_a_saturated_gate_is_exactly_zero_as_in_torch() -> None:
    """A gate whose pre-activation is past exp's float32 range is 0, as torch's sigmoid gives:
    with an infinite ``c`` the forget gate times ``c`` is NaN in torch, so in the kernel too (a
    gate clamped to 4e-39 made it infinite, and added 4e-3 to ``c'`` for ``c`` = 1e36)."""
    cell, x, h, c, grads = _layer(2, 20, 8)
    x[1, 0], c[1] = -1e30, float("inf")
    x[2, 0], c[2] = 1e30, -float("inf")
    # (not so large that the backward's float32 products overflow, as torch's would in float32)
    x[3, 0], c[3] = -1e30, 1e36
    x[4, 0], c[4] = 1e30, -1e36
    got = _kernel(cell, x, h, c, grads)
    want = _reference(cell, x, h, c, grads)
    for name, a, b in zip(["h'", "c'", "x grad", "h grad", "c grad"], got, want):
        assert torch.equal(a.isnan(), b.isnan()), name
        torch.testing.assert_close(a.double(), b.to(torch.float32).double(), rtol=2e-5, atol=2e-5, equal_nan=True, msg=name)


_FORKED_CHILD = """
import os, sys, torch
from learnedopt.kernels import lstm_layer_cpu as k
sys.path.insert(0, {tests!r})
from test_kernel_lstm_layer_cpu import _layer, _kernel
cell, x, h, c, grads = _layer(2, 8, 64)
one = _kernel(cell, x, h, c, grads)
k.MIN_ROWS_PER_THREAD = 8
torch.set_num_threads(2)
assert k._parts(64) == 2
_kernel(cell, x, h, c, grads)  # GNU OpenMP's threads started in the parent
pid = os.fork()
if pid == 0:
    same = all(torch.equal(a, b) for a, b in zip(_kernel(cell, x, h, c, grads), one))
    os._exit(0 if same else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_runs_the_kernel_on_one_thread() -> None:
    """A process that ran the kernel on two threads, then forked (Hogwild training, a forked
    DataLoader worker): the child's kernel call waited forever for OpenMP threads that do not
    exist in the child; now it runs on one thread, with one thread's results."""
    run_without_hanging(_FORKED_CHILD.format(tests=str(Path(__file__).parent)), {}, "the forked child hung in the kernel")



@needs_compiler
def test_weight_gradient_sums_many_rows_as_precisely_as_blas() -> None:
    """The weight and bias gradients are sums over all rows (coordinates: up to millions): summed
    in blocks, to about BLAS's precision. A single running float32 sum was 1e-4 off at 131,072
    rows of gradients of one sign (1e-3 at a million), BLAS's sum 2e-7."""
    n = 131_072
    cell, x, h, c, grads = _layer(20, 20, n)
    grads = [g.abs() for g in grads]  # sums that do not cancel
    weight = torch.cat((cell.weight_ih, cell.weight_hh), dim=1).detach()
    bias = (cell.bias_ih + cell.bias_hh).detach()
    assert lstm_layer_cpu.ready(20, 20)
    head_weight, _, grad_head = _head(20, n)
    act, tanh_c, _ = lstm_layer_cpu.lstm_layer_forward(x, h, c, weight, bias, torch.empty(n, 20), torch.empty(n, 20), save=True)
    _, dw, db, dhw, dhb = lstm_layer_cpu.lstm_layer_backward(
        x, h, c, weight, act, tanh_c, *grads, torch.empty(n, 20), None, need_x=False, grad_head=grad_head.abs(), head_weight=head_weight
    )
    # the same sums in float64 from the kernel's own activations: only the summation differs
    i, f, g, o = act.double().chunk(4, dim=1)
    d_head = grad_head.abs().double()
    t, dh = tanh_c.double(), grads[0].double() + grads[1].double() + d_head[:, None] * head_weight.double()
    dc = dh * o * (1 - t * t) + grads[2].double()
    d_gates = torch.cat((dc * g * i * (1 - i), dc * c.double() * f * (1 - f), dc * i * (1 - g * g), dh * t * o * (1 - o)), dim=1)
    want_w, want_b = d_gates.t() @ torch.cat((x, h), dim=1).double(), d_gates.sum(0)
    torch.testing.assert_close(dw.double(), want_w, rtol=0, atol=3e-6 * want_w.abs().max().item())
    torch.testing.assert_close(db.double(), want_b, rtol=0, atol=3e-6 * want_b.abs().max().item())
    want_hw, want_hb = d_head @ (o * t), d_head.sum(0, keepdim=True)
    torch.testing.assert_close(dhw.double(), want_hw, rtol=0, atol=3e-6 * want_hw.abs().max().item())
    torch.testing.assert_close(dhb.double(), want_hb, rtol=0, atol=3e-6 * want_hb.abs().max().item())


@needs_compiler
@pytest.mark.skipif("avx512f" not in lstm_layer_cpu._cpu_identity().split(), reason="no AVX-512 here: the kernel's exp has one version on this CPU")
def test_avx512_exp_gives_the_generic_versions_bits(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On AVX-512, exp scales by ``vscalefps`` instead of building 2^n from integer bits: the same
    bits as the generic version wherever that one does not clamp, torch's values at the extremes."""
    inputs, hidden = 2, 20
    path = tmp_path / "generic.so"
    flags = lstm_layer_cpu._flags(inputs, hidden, ["-march=native", "-mno-avx512f"])
    assert lstm_layer_cpu._compile(lstm_layer_cpu._compiler(), flags, path) is None
    generic = lstm_layer_cpu._load(path)
    assert lstm_layer_cpu.ready(inputs, hidden)
    cell, x, h, c, grads = _layer(inputs, hidden, 37)
    x = x * 20  # gate pre-activations out to about +-50
    native = _kernel(cell, x, h, c, grads)
    monkeypatch.setitem(lstm_layer_cpu._libraries, (inputs, hidden), generic)
    for a, b in zip(native, _kernel(cell, x, h, c, grads), strict=True):
        assert torch.equal(a, b)


@needs_compiler
def test_a_cache_folder_given_as_dot_loads_its_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``LEARNEDOPT_CACHE_DIR=.`` (the working directory): the kernel built there is loaded. Its
    path had no ``/``, so ``dlopen`` searched the system's library folders instead of the working
    directory, failed, and turned the kernel off with a warning that it could not be built."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", ".")
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lstm_layer_cpu.ready(7, 4)
    assert len(list(tmp_path.glob("lstm_layer_cpu_7_4_*.so"))) == 1
    cell, x, h, c, grads = _layer(7, 4, 6)
    for a, b in zip(_kernel(cell, x, h, c, grads), _reference(cell, x, h, c, grads), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)


_FORKED_WHILE_BUILDING = """
import os, sys
from learnedopt.kernels import lstm_layer_cpu as k
k._lock.acquire()  # another thread is building a kernel when the main thread forks
pid = os.fork()
if pid == 0:
    os._exit(0 if k.ready(3, 4) else 3)
k._lock.release()
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_child_forked_while_a_thread_builds_builds_its_own(tmp_path) -> None:
    """A fork while another thread of the parent holds the build lock (a DataLoader worker
    forked while a thread's first step compiles): the child's copy of the lock stayed held by a
    thread it does not have, and its first ready() waited forever; the child builds its own."""
    run_without_hanging(_FORKED_WHILE_BUILDING, {"LEARNEDOPT_CACHE_DIR": str(tmp_path)}, "the forked child hung on the build lock")


@needs_compiler
def test_built_files_get_the_modes_the_umask_gives(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The kernel and its digest get the modes a compiler's output and a written file get under
    the process's umask, readable by the group and others where it allows: made from owner-only
    temporary files, they were not (``rwx--x--x``, ``rw-------``), so a cache filled by another
    user (a container image's, a team's shared folder) could not be read, and every process
    built again, or ran without the kernel where no compiler was installed."""
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    umask = os.umask(0o002)
    try:
        assert lstm_layer_cpu.ready(7, 4)
    finally:
        os.umask(umask)
    (built,) = tmp_path.glob("lstm_layer_cpu_7_4_*.so")
    assert oct(built.stat().st_mode & 0o777) == oct(0o775)
    assert oct(Path(f"{built}.sha256").stat().st_mode & 0o777) == oct(0o664)
    assert sorted(tmp_path.iterdir()) == [built, tmp_path / f"{built.name}.sha256"]


@needs_compiler
def test_a_full_cache_disk_builds_into_a_temporary_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A cache folder on a full disk (ENOSPC on every write there, simulated: the linker and
    Python fail writing into it, as they do on a full file system) gives the kernel, built for
    this process, with one warning naming the folder and the full disk, and leaves nothing
    there. The linker's failure was taken for the compiler's: each of the six flag variants was
    compiled (23 s on a full tmpfs here), and the kernel was turned off with a warning naming
    ``collect2: error: ld returned 1 exit status``."""
    import errno

    cache = tmp_path / "cache"
    cache.mkdir()
    real = lstm_layer_cpu._compiler()
    linker = tmp_path / "full-disk-c++"  # fails as ld does when its output is on the full disk
    linker.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *"-o {cache}/"*) echo "/usr/bin/ld: final link failed: No space left on device" >&2;\n'
        '  echo "collect2: error: ld returned 1 exit status" >&2; exit 1;; esac\n'
        f'exec {shlex.join(real)} "$@"\n'
    )
    linker.chmod(0o755)
    monkeypatch.setenv("CXX", str(linker))
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(cache))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)
    real_copy = shutil.copyfile

    def full_disk_copy(source, destination, *args, **kwargs):
        if str(destination).startswith(str(cache)):
            Path(destination).touch()  # made, but no room for its bytes
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))
        return real_copy(source, destination, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", full_disk_copy)
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    monkeypatch.setattr(lstm_layer_cpu, "_warned_unwritable", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lstm_layer_cpu.ready(3, 4) and lstm_layer_cpu.ready(4, 4)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert str(cache) in messages[0] and "No space left on device" in messages[0], messages
    assert list(cache.iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []
    cell, x, h, c, grads = _layer(3, 4, 6)
    for a, b in zip(_kernel(cell, x, h, c, grads), _reference(cell, x, h, c, grads), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)


_POWER = "processor\t: {n}\ncpu\t\t: {cpu}, altivec supported\nclock\t\t: {mhz}MHz\nrevision\t: 2.2 (pvr 004e 1202)\n\ntimebase\t: 512000000\nplatform\t: PowerNV\n"
_ARM = "processor\t: {n}\nBogoMIPS\t: {mhz}\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\nCPU implementer\t: {implementer}\nCPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd0c\nCPU revision\t: 1\n"
_RISCV = "processor\t: {n}\nhart\t\t: {n}\nisa\t\t: {cpu}\nmmu\t\t: sv39\nuarch\t\t: sifive,u74-mc\n"


@pytest.mark.parametrize(
    ("template", "one", "other"),
    [(_POWER, {"cpu": "POWER8"}, {"cpu": "POWER9"}),
     (_ARM, {"implementer": "0x41"}, {"implementer": "0x51"}),
     (_RISCV, {"cpu": "rv64imafdc"}, {"cpu": "rv64imafdcv"})],
)  # fmt: skip
def test_the_cpu_identity_tells_apart_what_native_compiles_for(monkeypatch: pytest.MonkeyPatch, template, one, other) -> None:
    """The cache key's CPU identity differs between CPUs that ``-mcpu=native`` compiles for
    differently, so that a cache shared by several machines (a home folder on NFS) never loads a
    kernel built for another one's instructions: on POWER (its ``cpu`` line), on ARM (the
    implementer, besides the part) and RISC-V (its ``isa``) it did not, and POWER8 and POWER9
    machines shared one kernel. Per-core lines (numbers, clocks) do not change it."""
    real_read_text = Path.read_text

    def identity(fields: dict[str, str], cores: int = 4, mhz: int = 1000) -> str:
        text = "\n".join(template.format(n=n, mhz=mhz + 7 * n, **fields) for n in range(cores))
        monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if str(self) == "/proc/cpuinfo" else real_read_text(self, *a, **k))
        return lstm_layer_cpu._cpu_identity()

    assert identity(one) != identity(other)
    assert identity(one) == identity(one, cores=2, mhz=2000)


@pytest.mark.parametrize(
    ("stderr", "named"),
    [("/usr/bin/ld: final link failed: No space left on device\ncollect2: error: ld returned 1 exit status", "No space left on device"),
     ("/usr/bin/ld: cannot find -lgomp: No such file or directory\nclang: error: linker command failed with exit code 1 (use -v to see invocation)", "cannot find -lgomp"),
     ("x.cpp: In function 'int f()':\nx.cpp:1:1: error: 'y' was not declared in this scope\n    1 | y\n", "'y' was not declared")],
)  # fmt: skip
def test_the_warning_names_the_linkers_own_error(monkeypatch: pytest.MonkeyPatch, tmp_path, stderr: str, named: str) -> None:
    """A build that fails in the linker (its output's disk full, a missing library) is named by
    the linker's line, not by the compiler driver's summary after it (``collect2: error: ld
    returned 1 exit status``), which says nothing of why; a compile error by its own line."""
    (tmp_path / "stderr").write_text(stderr + "\n")
    message = _warning_of_failing_compiler(monkeypatch, tmp_path, f"cat {tmp_path / 'stderr'} >&2\nexit 1\n")
    assert named in message and "collect2" not in message and "linker command failed" not in message, message


@needs_compiler
def test_a_kernel_built_without_openmp_is_loaded_from_the_cache_without_compiling(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Where OpenMP does not link (clang without libomp), the kernel is built without it, once:
    a later process loads it from the cache. Each process compiled the OpenMP variants first
    again (a whole compile each before the link failed), as their builds were not in the cache,
    before looking there for the one that had been built."""
    real = lstm_layer_cpu._compiler()
    no_openmp = tmp_path / "c++-without-libomp"  # links no OpenMP library, as clang without libomp
    no_openmp.write_text(f'#!/bin/sh\ncase "$*" in *-fopenmp*) exec {shlex.join(real)} "$@" -lno-such-openmp;; esac\nexec {shlex.join(real)} "$@"\n')
    no_openmp.chmod(0o755)
    monkeypatch.setenv("CXX", str(no_openmp))
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    assert lstm_layer_cpu.ready(7, 4)
    (built,) = (tmp_path / "cache").glob("lstm_layer_cpu_7_4_*.so")  # the one without OpenMP
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})  # a new process
    monkeypatch.setattr(lstm_layer_cpu.subprocess, "Popen", lambda *a, **k: pytest.fail(f"compiled again: {a[0][-3:]}"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lstm_layer_cpu.ready(7, 4)
    assert list((tmp_path / "cache").glob("lstm_layer_cpu_7_4_*.so")) == [built]


@needs_compiler
def test_a_cache_folder_that_is_a_file_is_named_so(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``LEARNEDOPT_CACHE_DIR`` naming a file: the kernel is built for this process, and the one
    warning says the cache is not a directory; it said ``File exists``, which reads as if the
    kernel's file were in the way."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(blocker))
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    monkeypatch.setattr(lstm_layer_cpu, "_warned_unwritable", False)
    with pytest.warns(UserWarning, match="cannot write the kernel cache") as caught:
        assert lstm_layer_cpu.ready(3, 4)
    (message,) = [str(w.message) for w in caught]
    assert f"{blocker} (Not a directory)" in message and "File exists" not in message, message
    assert blocker.read_text() == ""


def test_a_compiler_that_succeeds_without_output_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A compiler command that exits 0 but writes no library (``CXX=true``, a broken wrapper) is
    a failed build, with one warning naming it, not a cache that cannot be written (a second,
    wrong warning) and a library that cannot be opened."""
    monkeypatch.setenv("CXX", shutil.which("true"))
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    monkeypatch.setattr(lstm_layer_cpu, "_warned_unwritable", False)
    with pytest.warns(UserWarning) as caught:
        assert not lstm_layer_cpu.ready(3, 4)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "could not be built" in messages[0] and "true failed: wrote no library" in messages[0], messages


@needs_compiler
def test_a_cache_whose_libraries_cannot_be_loaded_builds_into_a_temporary_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A cache folder on a file system mounted ``noexec`` (simulated: loading a library from it
    fails as ``dlopen`` does there) gives the kernel, built for this process, with one warning
    naming the folder and why, in the process that built it and in a later one that finds it
    in the cache. The kernel was turned off, with a warning that it could not be built."""
    import ctypes

    cache = tmp_path / "cache"
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(cache))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)
    real_cdll = ctypes.CDLL

    def noexec(path, *args, **kwargs):
        if str(path).startswith(str(cache)):
            raise OSError(f"{path}: failed to map segment from shared object")
        return real_cdll(path, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", noexec)
    for _ in range(2):  # building it, then finding it in the cache (a new process)
        monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
        monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
        monkeypatch.setattr(lstm_layer_cpu, "_warned_unwritable", False)
        with pytest.warns(UserWarning) as caught:
            assert lstm_layer_cpu.ready(3, 4)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and f"cannot load kernels from the cache {cache}" in messages[0] and "failed to map segment" in messages[0], messages
        assert list((tmp_path / "tmp").iterdir()) == []
    cell, x, h, c, grads = _layer(3, 4, 6)
    for a, b in zip(_kernel(cell, x, h, c, grads), _reference(cell, x, h, c, grads), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` no longer runs: reaped, or dead and waiting for its parent (an
    orphan's new parent, maybe a container's init that never reaps, is not this process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see the compiler's processes")
def test_a_hung_compiler_times_out_with_one_warning_and_is_killed(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A compiler that never finishes (``ccache`` on a stuck NFS mount, a wrapper waiting for a
    licence) hung the first step forever, without a word. After ``LEARNEDOPT_CXX_TIMEOUT``
    seconds the build fails, at once (not once per flag variant), with one warning naming the
    compiler, the timeout and the variable; the compiler and what it started are killed, the
    compiler reaped; the step runs as with ``LEARNEDOPT_CPU_KERNEL=0``, bit for bit."""
    hung = tmp_path / "hung-c++"
    hung.write_text(f"#!/bin/sh\necho $$ >> {tmp_path / 'compilers'}\nsleep 600 &\necho $! >> {tmp_path / 'children'}\nwait\n")
    hung.chmod(0o755)
    monkeypatch.setenv("CXX", str(hung))
    monkeypatch.setenv("LEARNEDOPT_CXX_TIMEOUT", "0.5")
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not lstm_layer_cpu.ready(2, 20)
        assert not lstm_layer_cpu.ready(3, 20)  # no second try
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "could not be built" in messages[0], messages
    assert f"{hung} did not finish within 0.5 s" in messages[0] and "LEARNEDOPT_CXX_TIMEOUT" in messages[0], messages
    (compiler,) = map(int, (tmp_path / "compilers").read_text().split())
    (child,) = map(int, (tmp_path / "children").read_text().split())
    assert not Path(f"/proc/{compiler}").exists()  # killed and reaped: no zombie
    for _ in range(100):  # the orphaned child, killed, is reaped by its new parent
        if _gone(child):
            break
        time.sleep(0.05)
    assert _gone(child), "the compiler's own child still runs"
    assert not lstm_layer_cpu.applies(torch.empty(2, 20), hidden=20)
    monkeypatch.delenv("CXX")  # torch.compile's pointwise code uses $CXX too
    lstm = torch.nn.LSTM(2, 20, 2)
    x, h, c = torch.randn(5, 2), torch.randn(2, 5, 20, requires_grad=True), torch.randn(2, 5, 20)
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("LEARNEDOPT_CPU_KERNEL", switch)
        top, h_new, c_new = lstm_step(lstm, x, h, c)
        results[switch] = (top, h_new, c_new, *torch.autograd.grad(top.sum(), (h, *lstm.parameters())))
    assert all(torch.equal(a, b) for a, b in zip(results["1"], results["0"], strict=True))


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf"])
def test_a_compiler_timeout_that_is_not_a_positive_number_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """An error naming the variable, from ready() too (the kernel not turned off with a warning),
    whether or not the kernel is in the cache."""
    monkeypatch.setenv("LEARNEDOPT_CXX_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"^LEARNEDOPT_CXX_TIMEOUT={value!r}: "):
        lstm_layer_cpu.compiler_timeout()
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    with pytest.raises(ValueError, match=f"^LEARNEDOPT_CXX_TIMEOUT={value!r}: "):
        lstm_layer_cpu.ready(7, 4)
    assert not lstm_layer_cpu.failed()


@pytest.mark.parametrize(("value", "seconds"), [(None, 300.0), ("", 300.0), (" 42 ", 42.0), ("0.5", 0.5)])
def test_the_compiler_timeout_defaults_to_five_minutes(monkeypatch: pytest.MonkeyPatch, value, seconds: float) -> None:
    if value is None:
        monkeypatch.delenv("LEARNEDOPT_CXX_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("LEARNEDOPT_CXX_TIMEOUT", value)
    assert lstm_layer_cpu.compiler_timeout() == seconds


def test_the_compiler_runs_in_the_c_locale_so_its_error_line_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Under a non-English locale gcc translates its messages (``Fehler:``, ``erreur :``), and
    the line naming the error, found by the word ``error``, was not found: the warning said only
    ``status 1``. The compiler runs with ``LC_ALL=C`` and ``LANG=C`` (simulated: a compiler that
    prints its error in English only there), and the warning names the error."""
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    message = _warning_of_failing_compiler(
        monkeypatch, tmp_path,
        'if [ "$LC_ALL" = C ] && [ "$LANG" = C ]; then echo "x.cpp:1:1: error: \'y\' was not declared in this scope" >&2\n'
        'else echo "x.cpp:1:1: Fehler: >>y<< wurde in diesem Gueltigkeitsbereich nicht definiert" >&2; fi\n'
        "exit 1\n",
    )  # fmt: skip
    assert "error: 'y' was not declared in this scope" in message, message
    assert os.environ["LC_ALL"] == "de_DE.UTF-8"  # the process's own locale untouched


def test_compiler_output_that_is_not_utf8_is_named_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A compiler whose messages hold bytes that are not UTF-8 (a path in a Latin-1 file name, a
    wrapper's own output): its UnicodeDecodeError escaped ready() and failed every step, instead
    of the one warning naming the error, the byte replaced."""
    message = _warning_of_failing_compiler(
        monkeypatch, tmp_path, "printf 'x.cpp:1:1: error: no such file /home/j\\374rgen/y.h\\n' >&2\nexit 1\n"
    )
    assert "error: no such file /home/j\ufffdrgen/y.h" in message, message


def _warning_of_failing_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, script: str) -> str:
    """The one warning of a first build, in a fresh cache under ``tmp_path``, by a compiler that
    is the shell script ``script`` (which fails it)."""
    compiler = tmp_path / "c++"
    compiler.write_text("#!/bin/sh\n" + script)
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("LEARNEDOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lstm_layer_cpu, "_libraries", {})
    monkeypatch.setattr(lstm_layer_cpu, "_failed", False)
    with pytest.warns(UserWarning, match="could not be built") as caught:
        assert not lstm_layer_cpu.ready(7, 4)
    (message,) = [str(w.message) for w in caught]
    return message
