"""The softmax baselines of the fast-weight layers: causal, windowed, padding-exact."""
from __future__ import annotations

import pytest
import torch

from edge_glass.nested.attention import SoftmaxAttention
from numerics import FP32_OPS, assert_close_rel


@pytest.mark.parametrize("window", [None, 3])
def test_outputs_depend_only_on_the_past_and_within_the_window(window):
    torch.manual_seed(0)
    layer = SoftmaxAttention(32, 4, window=window)
    x = torch.randn(1, 12, 32, requires_grad=True)
    y, state = layer(x)
    assert state is None
    t = 8
    (grad,) = torch.autograd.grad(y[0, t].sum(), x)
    seen = grad[0].abs().sum(-1) > 0
    assert not seen[t + 1:].any()                                # causal
    conv = 3                                                     # conv_size 4: three earlier inputs reach q/k/v
    first = 0 if window is None else t - (window - 1) - conv
    assert seen[first:t + 1].all() and not seen[:first].any()


def test_padded_batch_equals_each_sequence_alone():
    torch.manual_seed(0)
    layer = SoftmaxAttention(32, 4, window=5)
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    y, _ = layer(x, mask)
    alone, _ = layer(x[1:, :6])
    assert_close_rel(y[1, :6], alone[0], FP32_OPS, "right-padded sequence vs alone")
    assert (y[1, 6:] == 0).all()


def test_rejects_a_streaming_state_and_a_bad_window():
    layer = SoftmaxAttention(16, 2)
    with pytest.raises(ValueError, match="no streaming state"):
        layer(torch.randn(1, 4, 16), state=object())
    with pytest.raises(ValueError, match="window must be"):
        SoftmaxAttention(16, 2, window=0)
