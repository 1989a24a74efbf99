"""Fused kernels for the learned updates, installed as ``learnedopt.kernels``.

One kernel per module, each with its launcher. For CUDA (Triton):

- :mod:`learnedopt.kernels.coordinate_lstm_step`: the forward step of the coordinatewise LSTM
  rule (preprocessing, every layer, head and parameter update in one pass).
- :mod:`learnedopt.kernels.coordinate_lstm_backward`: the rule's LSTM stack and head after its
  input features, as a differentiable ``torch.autograd.Function`` (forward and backward kernels)
  for meta-training.
- :mod:`learnedopt.kernels.meta_lstm_step`: the forward step of Ravi & Larochelle's meta-learner
  (:class:`learnedopt.nn.MetaLSTMCell`: preprocessing, input LSTM, gates and parameter update).
- :mod:`learnedopt.kernels.meta_lstm_backward`: the meta-learner's step after its input features
  as a differentiable ``torch.autograd.Function`` (forward and backward kernels).

For the CPU (C++, compiled at first use):

- :mod:`learnedopt.kernels.lstm_layer_cpu`: one LSTM layer's step, forward and backward, for the
  LSTM step of both rules (:mod:`learnedopt.nn.lstm_step`) on float32 CPU tensors.

The Triton kernel modules import Triton, so they are imported only when used. Set ``TRITON_INTERPRET=1``
before importing them to run the kernels on CPU tensors (how the tests run them).
"""

import importlib.util

#: Whether Triton is installed, so that fused updates can be attempted.
FUSED_UPDATES_AVAILABLE = importlib.util.find_spec("triton") is not None

#: Whether the kernels' CUDA tests (``benchmarks/run_gpu.sh``) have passed on real GPU hardware.
#: Until they have, ``backend="auto"`` keeps the PyTorch path on CUDA too, and only an explicit
#: ``backend="triton"`` runs the (interpreter-tested) kernels. Their one GPU run so far (an H200,
#: 2026-12-04) had failures: ``benchmarks/results/gpu_tests_h200.md``.
GPU_VALIDATED = False
