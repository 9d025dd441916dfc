"""HOPE self-modifying attention: static ablation == gated-delta FastWeightAttention, recurrent ==
chunked at chunk size 1, streaming, read-before-write, in-context projection updates, gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from edge_glass.nested.fast_weights import FastWeightAttention, delta_rule_recurrent
from edge_glass.nested.hope import HopeAttention
from numerics import FP32_OPS, FP32_SUM, assert_close_rel

# bf16 unit roundoff; HOPE rounds c, the projection reads and the conv to bf16 in series: a few roundoffs
BF16_EPS = float(torch.finfo(torch.bfloat16).eps)
D, HEADS, DH = 16, 2, 8


def hope(chunk_size: int = 3, seed: int = 0, **kw) -> HopeAttention:
    torch.manual_seed(seed)
    return HopeAttention(D, HEADS, chunk_size=chunk_size, **kw)


def x_of(T: int = 10, B: int = 2, seed: int = 4) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def static_twin(m: HopeAttention) -> FastWeightAttention:
    """The gated-delta FastWeightAttention whose projections are the static HOPE projections, composed."""
    f = FastWeightAttention(D, HEADS, rule="gated_delta", chunk_size=m.chunk_size)
    W = m.in_proj.weight.view(HEADS, DH, D)
    with torch.no_grad():
        f.q_proj.weight.copy_(m.q_proj.weight)
        f.k_proj.weight.copy_((m.mem_k @ W).reshape(-1, D))
        f.v_proj.weight.copy_((m.mem_v @ W).reshape(-1, D))
        f.b_proj.weight.copy_((m.mem_b @ W).reshape(-1, D))
        f.a_proj.weight.copy_((m.mem_a @ W).reshape(-1, D))
        f.a_proj.bias.copy_(m.a_bias)
        f.conv.load_state_dict(m.conv.state_dict())
        f.o_norm.copy_(m.o_norm)
        f.out_proj.load_state_dict(m.out_proj.state_dict())
    return f


@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
def test_static_projections_equal_gated_delta_fast_weight_attention(mode):
    m = hope(self_modifying=False)
    x = x_of()
    y, s = m(x, mode=mode)
    y_f, s_f = static_twin(m)(x, mode=mode)
    assert_close_rel(y, y_f, FP32_OPS, "outputs")
    assert_close_rel(s.memory, s_f.memory, FP32_OPS, "memory")
    assert torch.equal(s.projections, m.initial_projections().expand_as(s.projections)), "no in-context writes"


def test_recurrent_equals_chunked_at_chunk_size_one():
    m, x = hope(chunk_size=1), x_of()
    y_c, s_c = m(x, mode="chunked")
    y_r, s_r = m(x, mode="recurrent")
    assert_close_rel(y_c, y_r, FP32_OPS, "outputs")
    assert_close_rel(s_c.memory, s_r.memory, FP32_OPS, "memory")
    assert_close_rel(s_c.projections, s_r.projections, FP32_OPS, "projection memories")
    m.chunk_size = 3                                     # chunk granularity is a different (coarser) model
    y_3, _ = m(x, mode="chunked")
    assert (y_3 - y_r).abs().max() > 10 * FP32_OPS * y_r.abs().max()


def test_chunk_writes_use_chunk_start_targets():
    """A chunk's projection-memory writes == the per-token gated delta rule with keys k_t and the fixed
    targets v^_t = P_start v_t (read before write inside a chunk)."""
    g = torch.Generator().manual_seed(5)
    B, C, R = 2, 5, 2 * DH + 2
    P = torch.randn(B, HEADS, R, DH, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(B, HEADS, C, DH, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, HEADS, C, DH, generator=g, dtype=torch.float64)
    b, a = torch.rand(B, HEADS, C, generator=g, dtype=torch.float64), torch.rand(B, HEADS, C, generator=g, dtype=torch.float64)
    P_end = HopeAttention._write(P, k, v, b, a.log(), "chunked")
    _, P_ref = delta_rule_recurrent(k, k, v @ P.transpose(-1, -2), b, a, P)
    assert_close_rel(P_end, P_ref, FP32_SUM, "chunk of writes")
    P1 = HopeAttention._write(P, k[:, :, :1], v[:, :, :1], b[:, :, :1], a[:, :, :1].log(), "recurrent")
    _, P1_ref = delta_rule_recurrent(k[:, :, :1], k[:, :, :1], (v @ P.transpose(-1, -2))[:, :, :1], b[:, :, :1], a[:, :, :1], P)
    assert_close_rel(P1, P1_ref, FP32_SUM, "one token")


@pytest.mark.parametrize("mode,cut", [("chunked", 3), ("chunked", 6), ("recurrent", 1), ("recurrent", 5)])
def test_one_pass_equals_two_calls_at_chunk_boundary(mode, cut):
    m, x = hope(chunk_size=3), x_of()
    y, s = m(x, mode=mode)
    y1, s1 = m(x[:, :cut], mode=mode)
    y2, s2 = m(x[:, cut:], state=s1, mode=mode)
    assert_close_rel(torch.cat([y1, y2], dim=1), y, FP32_OPS, "outputs")
    assert_close_rel(s2.memory, s.memory, FP32_OPS, "memory")
    assert_close_rel(s2.projections, s.projections, FP32_OPS, "projection memories")
    assert_close_rel(s2.conv, s.conv, FP32_SUM, "conv cache")


def test_projection_memories_change_and_read_before_write():
    m, x = hope(chunk_size=3), x_of()
    y, s = m(x)
    P0 = m.initial_projections().detach()
    change = (s.projections - P0).abs().max()
    assert change > 10 * FP32_OPS * P0.abs().max(), "the projection memories are written in context"
    m.self_modifying = False
    y_static, _ = m(x)
    # the first chunk is projected with the slow weights (read before write); later chunks are not
    assert_close_rel(y[:, :3], y_static[:, :3], FP32_OPS, "first chunk")
    assert (y[:, 3:] - y_static[:, 3:]).abs().max() > 10 * FP32_OPS * y_static.abs().max()


def test_gradients_reach_the_slow_weights_through_the_updates():
    m, x = hope(chunk_size=3), x_of()
    y, s = m(x)
    (y.square().mean() + s.projections.square().mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    # exact gradients of a slow weight through the in-context updates (float64, finite differences)
    m64 = hope(chunk_size=2, seed=1).double()
    x64 = x_of(T=5, B=1).double()
    params = {n: p.detach() for n, p in m64.named_parameters()}

    def loss(mem_k):
        return functional_call(m64, {**params, "mem_k": mem_k}, (x64,))[0].sum()

    assert torch.autograd.gradcheck(loss, (params["mem_k"].clone().requires_grad_(),))


@pytest.mark.parametrize("side,mode,chunk", [("right", "chunked", 3), ("right", "recurrent", 3),
                                             ("left", "chunked", 1), ("left", "recurrent", 3)])
def test_padding_matches_each_sequence_alone(side, mode, chunk):
    m, x = hope(chunk_size=chunk), x_of(T=9)
    n = torch.tensor([9, 5])[:, None]
    pos = torch.arange(9)[None]
    mask = pos < n if side == "right" else pos >= 9 - n
    x = x.masked_fill(~mask[..., None], 7.0)
    y, s = m(x, mask=mask, mode=mode)
    for i in range(2):
        real = mask[i].nonzero()[:, 0]
        y_i, s_i = m(x[i:i + 1, real], mode=mode)
        assert_close_rel(y[i:i + 1, real], y_i, FP32_OPS, f"row {i} outputs")
        assert_close_rel(s.memory[i:i + 1], s_i.memory, FP32_OPS, f"row {i} memory")
        assert_close_rel(s.projections[i:i + 1], s_i.projections, FP32_OPS, f"row {i} projections")
        assert_close_rel(s.conv[i:i + 1], s_i.conv, FP32_SUM, f"row {i} conv cache")


def test_bf16_autocast_keeps_fp32_memories():
    m, x = hope(chunk_size=3), x_of()
    y32, s32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, s16 = m(x)
    assert s16.memory.dtype == torch.float32 and s16.projections.dtype == torch.float32
    assert_close_rel(y16, y32, 16 * BF16_EPS, "outputs")
    assert_close_rel(s16.projections, s32.projections, 16 * BF16_EPS, "projection memories")


def test_long_sequence_stays_finite():
    m = hope(chunk_size=64)
    y, s = m(torch.randn(1, 2048, D, generator=torch.Generator().manual_seed(6)))
    assert torch.isfinite(y).all() and torch.isfinite(s.memory).all() and torch.isfinite(s.projections).all()
