"""Shared transformer pieces: rotary positions, masks, padding invariance, post-norm scale."""
from __future__ import annotations

import torch

from edge_glass.decoders.layers import (
    BlockStack, Rotary, RMSNorm, SwiGLU, apply_rotary, causal_attention_mask, positions_from_mask,
)
from numerics import FP32_OPS, assert_close_rel


def test_rotary_scores_depend_only_on_the_relative_offset():
    torch.manual_seed(0)
    rot = Rotary(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        cos_i, sin_i = rot(torch.tensor([[i]]))
        cos_j, sin_j = rot(torch.tensor([[j]]))
        return (apply_rotary(q, cos_i, sin_i) * apply_rotary(k, cos_j, sin_j)).sum()

    # equal in exact arithmetic; in float32 the angles (up to 13 rad) and their cos / sin (whose
    # SIMD implementation depends on the CPU) are rounded, an error that scales with |q| |k|
    qk = (q.norm() * k.norm()).item()
    assert_close_rel(score(5, 2), score(13, 10), FP32_OPS, "score at offset 3", scale=qk)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)
    cos, sin = rot(torch.tensor([[7]]))
    assert torch.allclose(apply_rotary(q, cos, sin).norm(), q.norm(), atol=1e-5)  # a rotation


def test_positions_and_mask_skip_left_padding():
    mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    allowed = causal_attention_mask(mask)[:, 0]
    assert allowed.shape == (2, 5, 5)
    assert allowed[0, 4].tolist() == [False, False, True, True, True]  # no pads, no future
    assert allowed[0, 0].tolist() == [True, False, False, False, False]  # a pad attends only itself
    assert torch.equal(allowed[1], torch.ones(5, 5, dtype=torch.bool).tril())


def test_block_stack_output_at_real_positions_ignores_left_padding():
    torch.manual_seed(0)
    for post_norm in (False, True):
        stack = BlockStack(16, 2, 2, 2.0, post_norm=post_norm).eval()
        h = torch.randn(1, 4, 16)
        padded = torch.cat([torch.randn(1, 3, 16), h], dim=1)
        mask = torch.tensor([[False] * 3 + [True] * 4])
        # other shapes (7 vs 4 positions, masked keys) through 2 blocks: relative to the values' scale
        assert_close_rel(stack(padded, mask)[:, 3:], stack(h), FP32_OPS, f"left-padded vs unpadded (post_norm={post_norm})")


def test_post_norm_stack_keeps_unit_scale_under_repeated_application():
    torch.manual_seed(0)
    stack = BlockStack(32, 2, 4, 2.0, post_norm=True)
    h = torch.randn(2, 6, 32) * 50
    for _ in range(20):
        h = stack(h)
    rms = h.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-2)


def test_rmsnorm_and_swiglu_shapes():
    x = torch.randn(3, 5, 24) * 7
    assert torch.allclose(RMSNorm(24)(x).pow(2).mean(-1), torch.ones(3, 5), atol=1e-3)
    mlp = SwiGLU(24, 2.5)
    assert mlp(x).shape == x.shape and mlp.down.in_features % 8 == 0 and mlp.down.in_features >= 60
