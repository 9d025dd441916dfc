"""Fast-weight kernels and FastWeightAttention: chunked == parallel == recurrent, streaming, recall,
gates, padding, bf16 autocast, long sequences. References run in float64 where they can."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edge_glass.nested.fast_weights import (FastWeightAttention, delta_rule_chunk_step, delta_rule_chunked,
                                            delta_rule_recurrent, linear_attention, linear_attention_recurrent)
from numerics import FP32_OPS, FP32_SUM, assert_close_rel

# bf16 keeps 8 significant bits: unit roundoff 2^-8; an autocast layer rounds its inputs, weights and
# projections to bf16, so its outputs sit a few bf16 roundoffs from fp32 (a bug is O(1) off)
BF16_EPS = float(torch.finfo(torch.bfloat16).eps)

B, H, T, DK, DV = 2, 2, 19, 5, 4   # T = 19 is not a multiple of the chunk sizes 3 and 16


def inputs(T: int = T, dtype=torch.float64, seed: int = 0, B: int = B):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, DK, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(B, H, T, DK, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, DV, generator=g, dtype=dtype)
    beta = torch.rand(B, H, T, generator=g, dtype=dtype)
    decay = 0.7 + 0.3 * torch.rand(B, H, T, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, DV, DK, generator=g, dtype=dtype)
    return q, k, v, beta, decay, s0


def pad_mask(lengths: list[int], T: int, side: str) -> torch.Tensor:
    """(len(lengths), T) bool, True at the real tokens, padding on the given side."""
    pos = torch.arange(T)[None]
    n = torch.tensor(lengths)[:, None]
    return pos < n if side == "right" else pos >= T - n


# ---------------------------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("chunk_size", [None, 1, 3, 16, T])
def test_linear_attention_parallel_chunked_and_recurrent_agree(chunk_size):
    q, k, v, _, _, s0 = inputs()
    o_ref, s_ref = linear_attention_recurrent(q, k, v, s0)                      # float64 per-token loop
    o, s = linear_attention(q.float(), k.float(), v.float(), s0.float(), chunk_size)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert_close_rel(o, o_ref, FP32_OPS, "outputs")
    assert_close_rel(s, s_ref, FP32_OPS, "final state")
    # the loop itself against the definition: S_T = S_0 + sum_t v_t k_t^T, o_T = S_T q_T
    s_def = s0 + torch.einsum("bhtv,bhtk->bhvk", v, k)
    assert_close_rel(s_ref, s_def, FP32_SUM, "sum of outer products")
    assert_close_rel(o_ref[:, :, -1], (s_def @ q[:, :, -1, :, None])[..., 0], FP32_SUM, "last read")


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated_delta"])
@pytest.mark.parametrize("chunk_size", [1, 3, 16, T])
def test_delta_chunked_matches_recurrent_outputs_state_and_gradients(gated, chunk_size):
    leaves64 = [t.requires_grad_() for t in inputs()]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    g = torch.Generator().manual_seed(1)
    w_o, w_s = torch.randn(B, H, T, DV, generator=g, dtype=torch.float64), torch.randn(B, H, DV, DK, generator=g, dtype=torch.float64)

    def run(fn, q, k, v, beta, decay, s0, **kw):
        o, s = fn(q, k, v, beta, decay if gated else None, s0, **kw)
        ((o * w_o.to(o.dtype)).sum() + (s * w_s.to(s.dtype)).sum()).backward()
        return o, s

    o_ref, s_ref = run(delta_rule_recurrent, *leaves64)
    o, s = run(delta_rule_chunked, *leaves32, chunk_size=chunk_size)
    assert_close_rel(o, o_ref, FP32_OPS, "outputs")
    assert_close_rel(s, s_ref, FP32_OPS, "final state")
    names = ["q", "k", "v", "beta", "decay", "initial_state"]
    for name, a, r in zip(names, leaves32, leaves64):
        if name == "decay" and not gated:
            assert a.grad is None and r.grad is None
            continue
        assert_close_rel(a.grad, r.grad, FP32_OPS, f"grad {name}")
    # the recurrent reference against the definition, one token by hand
    q, k, v, beta, decay, s0 = (t.detach() for t in leaves64)
    a = decay[:, :, 0, None, None] if gated else 1.0
    kk = k[:, :, 0, :, None] * k[:, :, 0, None, :]
    s1 = a * s0 @ (torch.eye(DK, dtype=torch.float64) - beta[:, :, 0, None, None] * kk) \
        + beta[:, :, 0, None, None] * v[:, :, 0, :, None] * k[:, :, 0, None, :]
    o1, st1 = delta_rule_recurrent(q[:, :, :1], k[:, :, :1], v[:, :, :1], beta[:, :, :1],
                                   decay[:, :, :1] if gated else None, s0)
    assert_close_rel(st1, s1, FP32_SUM, "one step of the rule")
    assert_close_rel(o1[:, :, 0], (s1 @ q[:, :, 0, :, None])[..., 0], FP32_SUM, "read after write")


def test_single_chunk_step_matches_recurrent_with_extra_leading_dims():
    q, k, v, beta, decay, s0 = inputs(T=7)
    # (B, H) -> (B, H, 1): any leading dims
    o, s = delta_rule_chunk_step(k[:, :, None], v[:, :, None], beta[:, :, None], decay.log()[:, :, None],
                                 s0[:, :, None], q=q[:, :, None])
    o_ref, s_ref = delta_rule_recurrent(q, k, v, beta, decay, s0)
    assert_close_rel(o[:, :, 0], o_ref, FP32_OPS, "outputs")
    assert_close_rel(s[:, :, 0], s_ref, FP32_OPS, "state")


KERNELS = {
    "linear_parallel": lambda q, k, v, b, a, s, m=None: linear_attention(q, k, v, s, None, mask=m),
    "linear_chunked": lambda q, k, v, b, a, s, m=None: linear_attention(q, k, v, s, 3, mask=m),
    "linear_recurrent": lambda q, k, v, b, a, s, m=None: linear_attention_recurrent(q, k, v, s, mask=m),
    "delta_chunked": lambda q, k, v, b, a, s, m=None: delta_rule_chunked(q, k, v, b, None, s, 3, mask=m),
    "delta_recurrent": lambda q, k, v, b, a, s, m=None: delta_rule_recurrent(q, k, v, b, None, s, mask=m),
    "gated_chunked": lambda q, k, v, b, a, s, m=None: delta_rule_chunked(q, k, v, b, a, s, 3, mask=m),
    "gated_recurrent": lambda q, k, v, b, a, s, m=None: delta_rule_recurrent(q, k, v, b, a, s, mask=m),
}


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_one_pass_equals_two_calls_with_carried_state(kernel):
    fn = KERNELS[kernel]
    q, k, v, beta, decay, s0 = (t.float() for t in inputs())
    o, s = fn(q, k, v, beta, decay, s0)
    cut = 7                                                          # not on a chunk boundary
    o1, s1 = fn(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], beta[:, :, :cut], decay[:, :, :cut], s0)
    o2, s2 = fn(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], beta[:, :, cut:], decay[:, :, cut:], s1)
    assert_close_rel(torch.cat([o1, o2], dim=2), o, FP32_OPS, "outputs")
    assert_close_rel(s2, s, FP32_OPS, "final state")


@pytest.mark.parametrize("kernel", ["delta_chunked", "delta_recurrent", "gated_chunked", "gated_recurrent"])
def test_delta_rule_overwrites_and_additive_rule_accumulates(kernel):
    fn = KERNELS[kernel]
    g = torch.Generator().manual_seed(2)
    k = F.normalize(torch.randn(1, 1, 1, DK, generator=g), dim=-1).expand(1, 1, 2, DK)
    v = torch.randn(1, 1, 2, DV, generator=g)
    ones = torch.ones(1, 1, 2)
    o, s = fn(k, k, v, ones, ones, None)                             # b = 1, a = 1, query = the key
    assert_close_rel(o[0, 0, 1], v[0, 0, 1], FP32_SUM, "recall of the newest value")
    assert_close_rel(o[0, 0, 0], v[0, 0, 0], FP32_SUM, "recall after the first write")
    o_lin, _ = linear_attention_recurrent(k, k, v)
    assert_close_rel(o_lin[0, 0, 1], v[0, 0, 0] + v[0, 0, 1], FP32_SUM, "additive rule sums")
    o_par, _ = linear_attention(k, k, v)
    assert_close_rel(o_par[0, 0, 1], v[0, 0, 0] + v[0, 0, 1], FP32_SUM, "additive rule sums (parallel)")


@pytest.mark.parametrize("kernel", ["delta_chunked", "delta_recurrent", "gated_chunked", "gated_recurrent"])
def test_zero_write_unit_decay_leaves_state_unchanged(kernel):
    q, k, v, _, _, s0 = (t.float() for t in inputs())
    o, s = KERNELS[kernel](q, k, v, torch.zeros(B, H, T), torch.ones(B, H, T), s0)
    assert torch.equal(s, s0)
    assert_close_rel(o, (s0[:, :, None] @ q[..., None])[..., 0], FP32_SUM, "reads of the untouched state")


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_padding_matches_each_sequence_alone(kernel, side):
    fn = KERNELS[kernel]
    q, k, v, beta, decay, _ = (t.float() for t in inputs(T=10))
    lengths = [10, 6]
    mask = pad_mask(lengths, 10, side)
    # junk at padded positions must not matter
    junk = ~mask[:, None, :]
    q, k, v = (x.masked_fill(junk[..., None], 5.0) for x in (q, k, v))
    beta, decay = beta.masked_fill(junk, 0.9), decay.masked_fill(junk, 0.3)
    o, s = fn(q, k, v, beta, decay, None, mask)
    for i, n in enumerate(lengths):
        real = mask[i].nonzero()[:, 0]
        sl = (slice(i, i + 1), slice(None), real)
        o_i, s_i = fn(q[sl], k[sl], v[sl], beta[sl], decay[sl], None)
        assert_close_rel(o[sl], o_i, FP32_OPS, f"row {i} outputs")
        assert_close_rel(s[i:i + 1], s_i, FP32_OPS, f"row {i} final state")
        assert torch.count_nonzero(o[i][:, ~mask[i]]) == 0, "padded outputs are zeroed"


@pytest.mark.parametrize("kernel", ["linear_chunked", "delta_chunked", "gated_chunked"])
def test_long_sequence_stays_finite(kernel):
    q, k, v, beta, decay, _ = (t.float() for t in inputs(T=2048, B=1, seed=3))
    fn = {"linear_chunked": lambda: linear_attention(q, k, v, chunk_size=64),
          "delta_chunked": lambda: delta_rule_chunked(q, k, v, beta, None, chunk_size=64),
          "gated_chunked": lambda: delta_rule_chunked(q, k, v, beta, decay, chunk_size=64)}[kernel]
    o, s = fn()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    if kernel != "linear_chunked":       # a unit-key delta memory is a contraction: bounded state
        assert s.norm(dim=(-2, -1)).max() <= v.norm(dim=-1).max() * T ** 0.5


# ---------------------------------------------------------------------------------------------- layer

D, HEADS = 16, 2


def layer(rule: str, chunk_size: int = 3, seed: int = 0, **kw) -> FastWeightAttention:
    torch.manual_seed(seed)
    return FastWeightAttention(D, HEADS, rule=rule, chunk_size=chunk_size, **kw)


def x_of(T: int = 11, B: int = 2, seed: int = 4) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", ["linear", "delta", "gated_delta"])
def test_layer_chunked_equals_recurrent(rule):
    m, x = layer(rule), x_of()
    y_c, s_c = m(x, mode="chunked")
    y_r, s_r = m(x, mode="recurrent")
    assert_close_rel(y_c, y_r, FP32_OPS, "outputs")
    assert_close_rel(s_c.memory, s_r.memory, FP32_OPS, "memory")


@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
@pytest.mark.parametrize("rule", ["linear", "delta", "gated_delta"])
def test_layer_one_pass_equals_two_calls_with_carried_state(rule, mode):
    m, x = layer(rule), x_of()
    y, s = m(x, mode=mode)
    for cut in (1, 5):                                               # shorter and longer than the conv window
        y1, s1 = m(x[:, :cut], mode=mode)
        y2, s2 = m(x[:, cut:], state=s1, mode=mode)
        assert_close_rel(torch.cat([y1, y2], dim=1), y, FP32_OPS, f"outputs, cut {cut}")
        assert_close_rel(s2.memory, s.memory, FP32_OPS, f"memory, cut {cut}")
        assert_close_rel(s2.conv, s.conv, FP32_SUM, f"conv cache, cut {cut}")
    assert s.memory.shape == (2, HEADS, D // HEADS, D // HEADS) and s.conv.shape == (2, 3, 3 * D)


@pytest.mark.parametrize("rule", ["delta", "gated_delta"])
def test_layer_gates_in_unit_interval(rule):
    m, x = layer(rule), 3 * x_of(T=64)
    b, la = m.gates(x)
    assert ((b > 0) & (b < 1)).all()
    if rule == "gated_delta":
        a = la.exp()
        assert ((a > 0) & (a < 1)).all()
        a0 = m.gates(torch.zeros(1, 1, D))[1].exp()
        assert ((a0 >= 0.9) & (a0 <= 0.99)).all(), "the decay starts in [0.9, 0.99]"
    else:
        assert la is None


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
@pytest.mark.parametrize("rule", ["linear", "delta", "gated_delta"])
def test_layer_padding_matches_each_sequence_alone(rule, mode, side):
    m, x = layer(rule), x_of(T=9)
    mask = pad_mask([9, 5], 9, side)
    x = x.masked_fill(~mask[..., None], 7.0)                         # junk in the padding
    y, s = m(x, mask=mask, mode=mode)
    for i in range(2):
        real = mask[i].nonzero()[:, 0]
        y_i, s_i = m(x[i:i + 1, real], mode=mode)
        assert_close_rel(y[i:i + 1, real], y_i, FP32_OPS, f"row {i} outputs")
        assert_close_rel(s.memory[i:i + 1], s_i.memory, FP32_OPS, f"row {i} memory")
        assert_close_rel(s.conv[i:i + 1], s_i.conv, FP32_SUM, f"row {i} conv cache")
        assert torch.count_nonzero(y[i, ~mask[i]]) == 0


@pytest.mark.parametrize("rule", ["linear", "delta", "gated_delta"])
def test_layer_bf16_autocast_keeps_fp32_memory(rule):
    m, x = layer(rule), x_of()
    y32, s32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, s16 = m(x)
    assert s16.memory.dtype == torch.float32 and y16.dtype == torch.bfloat16
    assert_close_rel(y16, y32, 8 * BF16_EPS, "outputs")
    assert_close_rel(s16.memory, s32.memory, 8 * BF16_EPS, "memory")


@pytest.mark.parametrize("rule", ["linear", "delta", "gated_delta"])
def test_layer_long_sequence_stays_finite_and_trains(rule):
    m = layer(rule, chunk_size=64)
    x = torch.randn(1, 2048, D, generator=torch.Generator().manual_seed(5))
    y, s = m(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(s.memory).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_layer_rejects_unknown_rule_and_mode():
    with pytest.raises(ValueError):
        FastWeightAttention(D, HEADS, rule="softmax")
    with pytest.raises(ValueError):
        layer("delta")(x_of(), mode="parallel")


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_chunked_strong_decay_uses_the_masked_exp_path_and_matches_recurrent(chunk_size, monkeypatch):
    """A chunk whose decay span exceeds the factored-Gamma limit
    takes the masked-exp path (a = 1e-6: -log a ~ 13.8 per token); both paths equal the recurrent form, gradients included, and the
    factored path forced off gives the same result as the default."""
    import edge_glass.nested.fast_weights as fw

    q, k, v, beta, decay, s0 = inputs()
    strong = decay.clone()
    strong[0, 0] = 1e-6                                   # one (batch, head) with a tiny decay
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v, beta, strong, s0)]
    o_ref, s_ref = delta_rule_recurrent(*leaves64)
    (o_ref.square().sum() + s_ref.square().sum()).backward()
    calls = []
    real = fw._chunk_solve

    def spy(q_, k_, v_, b_, g_):
        calls.append(float(-g_[..., -1].detach().min()) <= fw._FACTOR_SPAN[g_.dtype])
        return real(q_, k_, v_, b_, g_)

    monkeypatch.setattr(fw, "_chunk_solve", spy)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    o, s = delta_rule_chunked(*leaves32[:5], leaves32[5], chunk_size=chunk_size)
    (o.square().sum() + s.square().sum()).backward()
    assert calls == [False]                               # the masked exp was used
    assert_close_rel(o, o_ref, FP32_OPS, "outputs")
    assert_close_rel(s, s_ref, FP32_OPS, "state")
    for name, a, r in zip(["q", "k", "v", "beta", "decay", "s0"], leaves32, leaves64):
        if name == "decay":   # d/da at a = 1e-6 is ill-conditioned in float32 (0.25 % off, as before this
            assert torch.isfinite(a.grad).all()   # path existed): compare it where a is mild
            a, r = a.grad.clone(), r.grad.clone()
            a[0, 0] = r[0, 0] = 0.0
            assert_close_rel(a, r, FP32_OPS, "grad decay (mild heads)")
            continue
        assert_close_rel(a.grad, r.grad, FP32_OPS, f"grad {name}")
    # mild decay: factored by default; forcing the masked exp changes nothing beyond rounding
    x32 = [t.float() for t in (q, k, v, beta, decay, s0)]
    o_f, s_f = delta_rule_chunked(*x32[:5], x32[5], chunk_size=chunk_size)
    assert calls[-1] is True
    monkeypatch.setitem(fw._FACTOR_SPAN, torch.float32, -1.0)
    o_m, s_m = delta_rule_chunked(*x32[:5], x32[5], chunk_size=chunk_size)
    assert calls[-1] is False
    assert_close_rel(o_f, o_m, FP32_OPS, "factored vs masked exp: outputs")
    assert_close_rel(s_f, s_m, FP32_OPS, "factored vs masked exp: state")
