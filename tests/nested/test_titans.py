"""Titans linear memory: closed-form surprise gradient, momentum / forgetting recurrence, reduction to
the delta rule, read-after-write order, masking and streaming; the chunked form equals the
recurrent one (outputs, final memory and momentum, gradients of every input and the initial state)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_glass.nested.fast_weights import delta_rule_recurrent
import pytest

from edge_glass.nested.titans import (TitansState, _segment_products, memory_grad, memory_loss,
                                      titans_memory_chunked, titans_memory_recurrent)
from numerics import FP32_OPS, FP32_SUM, assert_close_rel

B, H, T, DK, DV = 2, 2, 9, 5, 4


def inputs(dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, DK, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(B, H, T, DK, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, DV, generator=g, dtype=dtype)
    theta, eta, alpha = (torch.rand(B, H, T, generator=g, dtype=dtype) for _ in range(3))
    return q, k, v, theta, eta, 0.2 * alpha


def test_memory_grad_equals_autograd():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(B, H, DV, DK, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(B, H, DK, generator=g, dtype=torch.float64), torch.randn(B, H, DV, generator=g, dtype=torch.float64)
    (auto,) = torch.autograd.grad(memory_loss(M, k, v).sum(), M)
    assert_close_rel(memory_grad(M, k, v), auto, FP32_SUM, "closed-form gradient")


def test_momentum_and_forgetting_match_an_autograd_loop():
    q, k, v, theta, eta, alpha = inputs()
    o, st = titans_memory_recurrent(q.float(), k.float(), v.float(), theta.float(), eta.float(), alpha.float())
    M = torch.zeros(B, H, DV, DK, dtype=torch.float64)
    U = torch.zeros_like(M)
    outs = []
    for t in range(T):                                  # the update written out, gradient by autograd
        Mg = M.clone().requires_grad_()
        (grad,) = torch.autograd.grad(memory_loss(Mg, k[:, :, t], v[:, :, t]).sum(), Mg)
        U = eta[:, :, t, None, None] * U - theta[:, :, t, None, None] * grad
        M = (1 - alpha[:, :, t, None, None]) * M + U
        outs.append((M @ q[:, :, t, :, None])[..., 0])
    assert o.dtype == torch.float32 and st.memory.dtype == torch.float32
    assert_close_rel(o, torch.stack(outs, dim=2), FP32_OPS, "outputs")
    assert_close_rel(st.memory, M, FP32_OPS, "memory")
    assert_close_rel(st.momentum, U, FP32_OPS, "momentum")


def test_no_momentum_no_forgetting_is_the_delta_rule():
    q, k, v, theta, _, _ = inputs()
    s0 = torch.randn(B, H, DV, DK, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    o_d, s_d = delta_rule_recurrent(q, k, v, theta, None, s0)
    init = TitansState(s0, torch.zeros_like(s0))
    for eta, alpha in ((None, None), (torch.zeros(B, H, T, dtype=torch.float64),) * 2):
        o_t, st = titans_memory_recurrent(q, k, v, theta, eta, alpha, init)
        assert_close_rel(o_t, o_d, FP32_SUM, "outputs")
        assert_close_rel(st.memory, s_d, FP32_SUM, "memory")


def test_read_after_write():
    g = torch.Generator().manual_seed(3)
    k = F.normalize(torch.randn(1, 1, 1, DK, generator=g), dim=-1)
    v = torch.randn(1, 1, 1, DV, generator=g)
    theta = torch.full((1, 1, 1), 0.5)
    o, st = titans_memory_recurrent(k, k, v, theta)     # empty memory, query = key
    # read after write: o_1 = M_1 k = theta v (read before write would give 0)
    assert_close_rel(o[0, 0, 0], 0.5 * v[0, 0, 0], FP32_SUM, "first read")
    q, k, v, theta, eta, alpha = inputs()
    o, st = titans_memory_recurrent(q, k, v, theta, eta, alpha)
    assert_close_rel(o[:, :, -1], (st.memory @ q[:, :, -1, :, None])[..., 0], FP32_SUM, "last read = M_T q_T")


def test_masked_tokens_freeze_memory_and_momentum():
    q, k, v, theta, eta, alpha = (t.float() for t in inputs())
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:6] = False
    o, st = titans_memory_recurrent(q, k, v, theta, eta, alpha, mask=mask)
    keep = mask[1].nonzero()[:, 0]
    sl = (slice(1, 2), slice(None), keep)
    o1, st1 = titans_memory_recurrent(q[sl], k[sl], v[sl], theta[sl], eta[sl], alpha[sl])
    assert_close_rel(o[sl], o1, FP32_OPS, "real-token outputs")
    assert_close_rel(st.memory[1:2], st1.memory, FP32_OPS, "memory")
    assert_close_rel(st.momentum[1:2], st1.momentum, FP32_OPS, "momentum")
    assert torch.count_nonzero(o[1, :, 3:6]) == 0


def test_one_pass_equals_two_calls():
    q, k, v, theta, eta, alpha = (t.float() for t in inputs())
    o, st = titans_memory_recurrent(q, k, v, theta, eta, alpha)
    c = 4
    first = titans_memory_recurrent(q[:, :, :c], k[:, :, :c], v[:, :, :c], theta[:, :, :c], eta[:, :, :c], alpha[:, :, :c])
    o2, st2 = titans_memory_recurrent(q[:, :, c:], k[:, :, c:], v[:, :, c:], theta[:, :, c:], eta[:, :, c:],
                                      alpha[:, :, c:], first[1])
    assert_close_rel(torch.cat([first[0], o2], dim=2), o, FP32_OPS, "outputs")
    assert_close_rel(st2.memory, st.memory, FP32_OPS, "memory")
    assert_close_rel(st2.momentum, st.momentum, FP32_OPS, "momentum")


# -- chunked form ---------------------------------------------------------------------------------
def test_segment_products_are_the_products_they_name():
    x = torch.tensor([0.5, 0.0, 2.0, 3.0], dtype=torch.float64)
    P = _segment_products(x)
    for t in range(4):
        for i in range(4):
            expect = float(torch.prod(x[i + 1:t + 1])) if i <= t else 0.0
            assert P[t, i].item() == pytest.approx(expect), (t, i)


@pytest.mark.parametrize("config", ["full", "no_momentum", "no_forgetting", "zero_momentum"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, T, 16])
def test_chunked_equals_recurrent_outputs_states_and_gradients(chunk_size, config):
    q, k, v, theta, eta, alpha = inputs()
    g = torch.Generator().manual_seed(5)
    m0 = torch.randn(B, H, DV, DK, generator=g, dtype=torch.float64)
    u0 = 0.5 * torch.randn(B, H, DV, DK, generator=g, dtype=torch.float64)
    if config == "no_momentum":
        eta = None
    elif config == "no_forgetting":
        alpha = None
    elif config == "zero_momentum":          # eta exactly 0: the segment products hit zeros
        eta = torch.zeros_like(eta)
    w_o = torch.randn(B, H, T, DV, generator=g, dtype=torch.float64)
    w_m, w_u = (torch.randn(B, H, DV, DK, generator=g, dtype=torch.float64) for _ in range(2))
    names = ["q", "k", "v", "theta", "eta", "alpha", "memory0", "momentum0"]
    base = [q, k, v, theta, eta, alpha, m0, u0]

    def run(fn, dtype, **kw):
        leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in base]
        o, st = fn(*leaves[:6], TitansState(leaves[6], leaves[7]), **kw)
        ((o * w_o.to(dtype)).sum() + (st.memory * w_m.to(dtype)).sum() + (st.momentum * w_u.to(dtype)).sum()).backward()
        return o, st, leaves

    o_ref, st_ref, ref = run(titans_memory_recurrent, torch.float64)
    o, st, got = run(titans_memory_chunked, torch.float32, chunk_size=chunk_size)
    assert o.dtype == torch.float32 and st.memory.dtype == torch.float32
    assert_close_rel(o, o_ref, FP32_OPS, "outputs")
    assert_close_rel(st.memory, st_ref.memory, FP32_OPS, "final memory")
    assert_close_rel(st.momentum, st_ref.momentum, FP32_OPS, "final momentum")
    for name, a, r in zip(names, got, ref):
        if r is None:
            continue
        if r.grad is None:                   # eta None: the initial momentum never reaches anything
            assert name == "momentum0" and (a.grad is None or torch.count_nonzero(a.grad) == 0)
            continue
        assert_close_rel(a.grad, r.grad, FP32_OPS, f"grad {name}")


@pytest.mark.parametrize("chunk_size", [2, 4])
def test_chunked_masking_and_streaming_match_recurrent(chunk_size):
    q, k, v, theta, eta, alpha = inputs()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:6] = False
    mask[0, 0] = False
    o_ref, st_ref = titans_memory_recurrent(q, k, v, theta, eta, alpha, mask=mask)
    o, st = titans_memory_chunked(q, k, v, theta, eta, alpha, chunk_size=chunk_size, mask=mask)
    assert_close_rel(o, o_ref, FP32_SUM, "masked outputs")
    assert_close_rel(st.memory, st_ref.memory, FP32_SUM, "masked memory")
    assert_close_rel(st.momentum, st_ref.momentum, FP32_SUM, "masked momentum")
    assert torch.count_nonzero(o[1, :, 3:6]) == 0
    # one pass == two chunked calls (split off the chunk grid) with the state carried
    c = 5
    sl = lambda x, a, b: x[:, :, a:b]
    o1, s1 = titans_memory_chunked(*(sl(x, 0, c) for x in (q, k, v, theta, eta, alpha)), chunk_size=chunk_size)
    o2, s2 = titans_memory_chunked(*(sl(x, c, T) for x in (q, k, v, theta, eta, alpha)), s1, chunk_size=chunk_size)
    o_full, s_full = titans_memory_recurrent(q, k, v, theta, eta, alpha)
    assert_close_rel(torch.cat([o1, o2], 2), o_full, FP32_SUM, "two calls")
    assert_close_rel(s2.memory, s_full.memory, FP32_SUM, "two calls memory")
    assert_close_rel(s2.momentum, s_full.momentum, FP32_SUM, "two calls momentum")


def test_chunked_long_sequence_stays_finite_and_close():
    g = torch.Generator().manual_seed(7)
    Tl = 512
    q = F.normalize(torch.randn(1, 2, Tl, DK, generator=g), dim=-1)
    k = F.normalize(torch.randn(1, 2, Tl, DK, generator=g), dim=-1)
    v = torch.randn(1, 2, Tl, DV, generator=g)
    theta, eta = 0.5 * torch.rand(1, 2, Tl, generator=g), 0.9 * torch.rand(1, 2, Tl, generator=g)
    alpha = 0.05 * torch.rand(1, 2, Tl, generator=g)
    o_ref, st_ref = titans_memory_recurrent(*(x.double() for x in (q, k, v, theta, eta, alpha)))
    o, st = titans_memory_chunked(q, k, v, theta, eta, alpha, chunk_size=64)
    assert torch.isfinite(o).all()
    assert_close_rel(o, o_ref, FP32_OPS, "outputs at T = 512")
    assert_close_rel(st.memory, st_ref.memory, FP32_OPS, "memory at T = 512")
