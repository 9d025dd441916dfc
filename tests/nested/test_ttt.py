"""TTTAdapter (TTT-Linear low-rank adapter): closed-form inner gradient, dual form == token loop,
write-then-read order, streaming splits, per-item state, eta = 0 / init identities, the inner loss
falling along a stream, outer gradients through the inner updates."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_glass.nested.ttt import (TTTAdapter, inner_grad, inner_loss, initial_state, ttt_linear,
                                   ttt_linear_recurrent)
from numerics import FP32_OPS, assert_close_rel

B, T, D, R = 3, 13, 6, 4   # T = 13 is not a multiple of the mini-batch sizes 2, 4, 5


def qkv(dtype=torch.float64, seed: int = 0, T: int = T):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, R, generator=g, dtype=dtype), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, R, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, R, generator=g, dtype=dtype)
    w0 = torch.randn(R, R, generator=g, dtype=dtype) * 0.3
    return q, k, v, w0


def trained_adapter(seed: int = 0, **kw) -> TTTAdapter:
    """An adapter with a non-zero up-projection (as after training), float64."""
    torch.manual_seed(seed)
    ad = TTTAdapter(D, rank=R, **kw).double()
    with torch.no_grad():
        ad.up.weight.normal_()
    return ad


def test_inner_grad_matches_autograd():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(B, R, R, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(B, R, generator=g, dtype=torch.float64), torch.randn(B, R, generator=g, dtype=torch.float64)
    loss = inner_loss(W, k, v)
    (auto,) = torch.autograd.grad(loss.sum(), W)
    assert_close_rel(inner_grad(W, k, v), auto, FP32_OPS, "grad_W ||W k - v||^2")
    assert_close_rel(loss, ((torch.einsum("bij,bj->bi", W, k) - v) ** 2).sum(-1), FP32_OPS, "inner loss")


@pytest.mark.parametrize("b", [1, 2, 4, 5, T])
def test_dual_form_equals_token_loop(b):
    q, k, v, w0 = qkv()
    z_ref, w_ref, loss_ref = ttt_linear_recurrent(q, k, v, 0.7, w0, b)
    z, st = ttt_linear(q, k, v, 0.7, initial_state(w0, B), b)
    assert_close_rel(z, z_ref, FP32_OPS, "z")
    assert_close_rel(st.weight, w_ref, FP32_OPS, "final W")
    assert_close_rel(st.token_loss, loss_ref, FP32_OPS, "online inner loss")
    assert st.count == T % b and st.tokens == T


def test_online_update_is_one_gradient_step_per_token_and_read_follows_write():
    """b = 1: W_t = W_{t-1} - eta grad l(W_{t-1}; x_t) and z_t = W_t q_t (the updated W, not W_{t-1})."""
    q, k, v, w0 = qkv()
    eta = 0.4
    z, st = ttt_linear(q, k, v, eta, initial_state(w0, B), 1)
    W = w0.expand(B, R, R)
    for t in range(T):
        W_prev = W
        W = W - eta * inner_grad(W, k[:, t], v[:, t])
        assert_close_rel(z[:, t], (W @ q[:, t, :, None])[..., 0], FP32_OPS, f"read after write t={t}")
        assert_close_rel(st.token_loss[:, t], inner_loss(W_prev, k[:, t], v[:, t]), FP32_OPS, "pre-write loss")
        # reading before the write would differ by O(1)
        assert (z[:, t] - (W_prev @ q[:, t, :, None])[..., 0]).abs().max() > 1e-3
    assert_close_rel(st.weight, W, FP32_OPS, "final W")


def test_minibatch_uses_gradients_at_the_anchor():
    """b = T: every token's gradient is taken at W_0, W_T = W_0 - eta * mean_t grad l(W_0; x_t)."""
    q, k, v, w0 = qkv()
    _, st = ttt_linear(q, k, v, 0.5, initial_state(w0, B), T)
    expect = w0 - 0.5 * inner_grad(w0.expand(B, T, R, R), k, v).mean(1)
    assert_close_rel(st.weight, expect, FP32_OPS, "mini-batch step")
    assert st.count == 0


@pytest.mark.parametrize("b", [1, 4])
def test_any_split_of_a_stream_equals_one_call(b):
    ad = trained_adapter(mini_batch_size=b, eta=0.6, bias=True)
    x = torch.randn(B, T, D, dtype=torch.float64)
    y_full, st_full = ad(x)
    parts, state = [], None
    for lo, hi in [(0, 3), (3, 4), (4, 9), (9, 13)]:
        y, state = ad(x[:, lo:hi], state)
        parts.append(y)
    assert_close_rel(torch.cat(parts, 1), y_full, FP32_OPS, "split stream")
    assert_close_rel(state.weight, st_full.weight, FP32_OPS, "final W")
    # adapt(stream) over single tokens is the same stream; reset() starts a new one
    y_tok = ad.adapt(x[:, t] for t in range(T))
    assert_close_rel(y_tok, y_full, FP32_OPS, "adapt over tokens")
    ad.reset()
    assert ad.state is None
    assert_close_rel(ad.step(x[:, :5]), y_full[:, :5], FP32_OPS, "after reset")
    y_cont = ad.adapt([x[:, 5:]], reset=False)
    assert_close_rel(y_cont, y_full[:, 5:], FP32_OPS, "adapt continues without reset")


def test_state_never_leaks_across_batch_items():
    ad = trained_adapter(mini_batch_size=2, eta=0.8)
    x = torch.randn(B, T, D, dtype=torch.float64)
    x2 = x.clone()
    x2[1:] = torch.randn(B - 1, T, D, dtype=torch.float64) * 5.0   # change every other item
    y, _ = ad(x)
    y2, _ = ad(x2)
    assert torch.equal(y[0], y2[0])
    alone, _ = ad(x[:1])
    assert_close_rel(alone, y[:1], FP32_OPS, "item alone vs in batch")
    # and the other items did change (the adapter is live)
    assert (y[1:] - y2[1:]).abs().max() > 1e-2


def test_causal_outputs_do_not_depend_on_future_tokens():
    ad = trained_adapter(mini_batch_size=4, eta=0.8)
    x = torch.randn(B, T, D, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(B, T - 7, D, dtype=torch.float64)
    assert_close_rel(ad(x2)[0][:, :7], ad(x)[0][:, :7], FP32_OPS, "prefix")


def test_eta_zero_is_no_adapter_and_init_is_the_wrapped_layer():
    torch.manual_seed(0)
    lin = nn.Linear(D, 5)
    x = torch.randn(B, T, D)
    ad = TTTAdapter.wrap(lin, rank=R, eta=0.0)
    with torch.no_grad():
        ad.up.weight.normal_()                      # even a trained up-projection adds nothing at eta 0
    y, _ = ad(x)
    assert torch.equal(y, lin(x))
    fresh = TTTAdapter.wrap(lin, rank=R, eta=0.9)   # zero-initialised up-projection
    y, st = fresh(x)
    assert torch.equal(y, lin(x))
    assert st.weight.abs().max() > 0                # the fast weight did learn; it just is not read out yet
    res = TTTAdapter(D, rank=R, eta=0.9)
    assert torch.equal(res(x)[0], x)                # residual mode: identity at init
    assert torch.equal(res(x[:, 0])[0], x[:, 0])    # single-token (B, d) input


def test_static_lora_when_w0_is_learned_and_eta_zero():
    ad = trained_adapter(eta=0.0, learn_init=True)
    with torch.no_grad():
        ad.w0.normal_()
    x = torch.randn(B, T, D, dtype=torch.float64)
    q, _, _ = ad.projections(x)
    assert_close_rel(ad(x)[0], x + q @ ad.w0.T @ ad.up.weight.T, FP32_OPS, "static LoRA")


@pytest.mark.parametrize("normalize", [False, True])
def test_inner_loss_decreases_along_a_stream(normalize):
    """The online loss l(W_{t-1}; x_t) falls along a test stream as W fits it. normalize=False: x on
    an r-dim subspace, so v = theta_V x is exactly linear in k = theta_K x; normalize=True (unit k,
    the default): a shifted stream x_t = mu + small noise, as under a distribution shift."""
    torch.manual_seed(0)
    ad = TTTAdapter(D, rank=R, eta=0.5 if normalize else 0.25, mini_batch_size=4, normalize=normalize).double()
    if normalize:
        x = 2.0 * torch.randn(B, 1, D, dtype=torch.float64) + 0.1 * torch.randn(B, 64, D, dtype=torch.float64)
    else:
        with torch.no_grad():
            ad.theta_k.weight.copy_(torch.linalg.qr(torch.randn(D, R, dtype=torch.float64))[0].T)
        x = torch.randn(B, 64, R, dtype=torch.float64) @ ad.theta_k.weight
    with torch.no_grad():
        _, st = ad(x)
    loss = st.token_loss.mean(0)
    assert loss[-16:].mean() < 0.05 * loss[:4].mean()
    if not normalize:  # a noiseless linear target: every window of 16 tokens below the one before
        assert (loss.unfold(0, 16, 16).mean(1).diff() < 0).all()


def test_outer_gradients_reach_the_slow_weights_through_the_inner_updates():
    ad = trained_adapter(mini_batch_size=2, eta=0.5, learn_init=True, bias=True)
    x = torch.randn(B, T, D, dtype=torch.float64)
    y, st = ad(x)
    y.pow(2).mean().backward()                       # a task loss only
    for name, p in ad.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    # theta_K / theta_V influence y only through the inner updates (W_t): with eta = 0 they get none
    ad.zero_grad()
    ad.eta = 0.0
    ad(x)[0].pow(2).mean().backward()
    assert ad.theta_k.weight.grad is None or ad.theta_k.weight.grad.abs().max() == 0
    # at init (U = 0) the optional inner-loss term still trains theta_K / theta_V
    fresh = TTTAdapter(D, rank=R, eta=0.5).double()
    y, st = fresh(x)
    (y.pow(2).mean() + 0.1 * st.inner_loss).backward()
    assert fresh.theta_k.weight.grad.abs().max() > 0 and fresh.theta_v.weight.grad.abs().max() > 0
    assert fresh.up.weight.grad.abs().max() > 0


def test_float32_matches_float64_and_autocast_keeps_fp32_state():
    ad = trained_adapter(mini_batch_size=3, eta=0.7)
    x = torch.randn(B, T, D, dtype=torch.float64)
    y64, _ = ad(x)
    ad32 = trained_adapter(mini_batch_size=3, eta=0.7).float()
    y32, st = ad32(x.float())
    assert_close_rel(y32, y64, FP32_OPS, "fp32 vs fp64")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, st = ad32(x.float())
    assert st.weight.dtype == torch.float32


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="d_out == d_in"):
        TTTAdapter(4, 5)
    q, k, v, w0 = qkv()
    with pytest.raises(ValueError, match="mini_batch_size"):
        ttt_linear(q, k, v, 0.1, initial_state(w0, B), 0)


def _shift_bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "nested" / "ttt_shift.py"
    spec = importlib.util.spec_from_file_location("bench_nested_ttt_shift", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    return bench


def test_shift_benchmark_runs_and_writes_the_documented_json(tmp_path):
    import json

    bench = _shift_bench()
    out = tmp_path / "ttt_shift.json"
    bench.main(["--quick", "--steps", "2", "--stream", "180", "--rank", "4", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert {(r["method"], r["shift"]) for r in results} == {(m, s) for m in ("frozen", "tent", "ttt-noupdate", "ttt")
                                                            for s in bench.REPORTED}
    for r in results:
        assert 0.0 <= r["accuracy_mean"] <= 100.0 and r["accuracy_std"] >= 0.0 and r["seeds"] == 2
    assert not set(bench.REPORTED[1:]) & set(bench.SELECTION)      # selection never sees a reported shift


# -- padding masks ------------------------------------------------------------------------------
LENGTHS = [13, 6, 9]          # B = 3 sequences of different lengths in one (B, 13) batch


def padded_batch(side: str, seed: int = 0):
    """x (B, T, D) with item i's L_i real tokens placed right- / left- / interior-padded, garbage in the pads."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(L, D, generator=g, dtype=torch.float64) for L in LENGTHS]
    x = 50.0 * torch.randn(B, T, D, generator=g, dtype=torch.float64)   # large garbage at padded positions
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, (L, s) in enumerate(zip(LENGTHS, seqs)):
        if side == "right":
            pos = torch.arange(L)
        elif side == "left":
            pos = torch.arange(T - L, T)
        else:                                                          # holes: every other pad inside
            pos = torch.randperm(T, generator=g)[:L].sort().values
        mask[i, pos] = True
        x[i, pos] = s
    return x, mask, seqs


@pytest.mark.parametrize("b", [1, 4, 5])
@pytest.mark.parametrize("side", ["right", "left", "interior"])
def test_padded_batch_equals_each_sequence_alone(b, side):
    ad = trained_adapter(mini_batch_size=b, eta=0.7, bias=True)
    x, mask, seqs = padded_batch(side)
    y, st = ad(x, mask=mask)
    for i, s in enumerate(seqs):
        y_i, st_i = ad(s[None])
        assert_close_rel(y[i, mask[i]], y_i[0], FP32_OPS, f"item {i} real outputs")
        assert_close_rel(st.weight[i], st_i.weight[0], FP32_OPS, f"item {i} final W")
        assert_close_rel(st.anchor[i], st_i.anchor[0], FP32_OPS, f"item {i} anchor")
        assert int(st.count[i]) == st_i.count == len(s) % b and int(st.tokens[i]) == len(s)
        assert_close_rel(st.token_loss[i, mask[i]], st_i.token_loss[0], FP32_OPS, f"item {i} online loss")
    # padded positions: no adapter contribution, no inner loss
    assert torch.equal(y[~mask], ad.base(x)[~mask] if ad.base is not None else x[~mask])
    assert torch.count_nonzero(st.token_loss[~mask]) == 0
    real = torch.cat([ad(s[None])[1].token_loss[0] for s in seqs])
    assert_close_rel(st.inner_loss, real.mean(), FP32_OPS, "inner_loss averages real tokens only")


def test_padding_never_leaks_across_items_or_into_the_state():
    ad = trained_adapter(mini_batch_size=4, eta=0.8)
    x, mask, _ = padded_batch("interior", seed=1)
    y, st = ad(x, mask=mask)
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), D, dtype=torch.float64) * 100.0   # change only the pads
    x2[1:, :][mask[1:]] += 3.0                                                        # and items 1.. real tokens
    y2, st2 = ad(x2, mask=mask)
    assert torch.equal(y2[0, mask[0]], y[0, mask[0]])                 # item 0 untouched by others / its pads
    assert torch.equal(st2.weight[0], st.weight[0])
    assert (y2[1:][mask[1:]] - y[1:][mask[1:]]).abs().max() > 1e-2    # live: the others did change
    # pads alone (everything but the pads the same): bitwise the same outputs and state
    x3 = x.clone()
    x3[~mask] = -x3[~mask]
    y3, st3 = ad(x3, mask=mask)
    assert torch.equal(y3[mask], y[mask]) and torch.equal(st3.weight, st.weight)
    # gradients: nothing flows to padded inputs
    xg = x.clone().requires_grad_()
    ad(xg, mask=mask)[0][mask].pow(2).sum().backward()
    assert torch.count_nonzero(xg.grad[~mask]) == 0


def test_masked_stream_continues_per_item_and_all_true_mask_is_unmasked():
    """Two masked calls (each item's count carried as a tensor) == one call of the real tokens; an
    all-True mask equals no mask."""
    ad = trained_adapter(mini_batch_size=4, eta=0.6, bias=True)
    x = torch.randn(B, T, D, dtype=torch.float64)
    y_ref, st_ref = ad(x)
    y_all, st_all = ad(x, mask=torch.ones(B, T, dtype=torch.bool))
    assert_close_rel(y_all, y_ref, FP32_OPS, "all-True mask")
    assert_close_rel(st_all.weight, st_ref.weight, FP32_OPS, "all-True mask W")
    # split point differs per item: item i's first call holds cut_i real tokens, then right padding
    cuts = [3, 9, 0]
    m1 = torch.zeros(B, T, dtype=torch.bool)
    for i, c in enumerate(cuts):
        m1[i, :c] = True
    y1, st1 = ad(x, mask=m1)
    # second call: the rest of each stream, left-aligned and right-padded
    x2 = torch.zeros_like(x)
    m2 = torch.zeros(B, T, dtype=torch.bool)
    for i, c in enumerate(cuts):
        x2[i, :T - c] = x[i, c:]
        m2[i, :T - c] = True
    y2, st2 = ad(x2, mask=m2, state=st1)
    for i, c in enumerate(cuts):
        got = torch.cat([y1[i, :c], y2[i, :T - c]])
        assert_close_rel(got, y_ref[i], FP32_OPS, f"item {i} split at {c}")
    assert_close_rel(st2.weight, st_ref.weight, FP32_OPS, "final W")
    assert [int(c) for c in st2.count] == [T % 4] * B
    # an unmasked call continues a tensor-count state too
    y3, st3 = ad(x[:, 2:5], state=ad(x[:, :2], mask=torch.ones(B, 2, dtype=torch.bool))[1])
    assert_close_rel(y3, y_ref[:, 2:5], FP32_OPS, "unmasked after masked")


def test_masked_single_token_steps_skip_padded_items():
    """step(x_t (B, d), mask_t (B,)): an item whose token is padded keeps its state and gets y = x."""
    ad = trained_adapter(mini_batch_size=2, eta=0.7)
    x, mask, seqs = padded_batch("interior", seed=2)
    ad.reset()
    ys = [ad.step(x[:, t], mask[:, t]) for t in range(T)]
    y = torch.stack(ys, 1)
    for i, s in enumerate(seqs):
        assert_close_rel(y[i, mask[i]], ad(s[None])[0][0], FP32_OPS, f"item {i}")
    assert torch.equal(y[~mask], x[~mask])


def test_fsdd_speaker_shift_benchmark_runs_and_never_reports_the_selection_speaker(tmp_path):
    import json

    from edge_glass.paths import data_root

    if not any((data_root() / "fsdd" / "recordings").glob("*.wav")):
        pytest.skip(f"FSDD not found under {data_root()} (set EDGE_GLASS_DATA)")
    bench = _shift_bench()
    out = tmp_path / "ttt_shift_fsdd.json"
    bench.main(["--dataset", "fsdd", "--quick", "--steps", "2", "--stream", "40", "--rank", "4", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert {(r["method"], r["shift"]) for r in doc["results"]} == {(m, s) for m in ("frozen", "tent", "ttt-noupdate", "ttt")
                                                                   for s in bench.FSDD_REPORTED}
    assert bench.FSDD_VAL_SPEAKER not in doc["test_speakers"] and doc["test_speakers"]
    for r in doc["results"]:
        assert 0.0 <= r["accuracy_mean"] <= 100.0


def test_benchmark_net_padded_streams_equal_each_stream_alone():
    """The benchmark's classifier with a padding mask: streams of different lengths in one batch give
    each stream's own logits (adapter state per stream, padded images never in BatchNorm or W)."""
    bench = _shift_bench()
    torch.manual_seed(0)
    net = bench.Net({"rank": 4, "eta": 0.7, "mini_batch_size": 4}).double().eval()
    with torch.no_grad():
        net.first.up.weight.normal_()
    lens = [9, 5]
    xs = [torch.randn(L, 64, dtype=torch.float64) for L in lens]
    x = 30.0 * torch.randn(2, 9, 64, dtype=torch.float64)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    for i, xi in enumerate(xs):
        x[i, :len(xi)], mask[i, :len(xi)] = xi, True
    with torch.no_grad():
        logits, _ = net(x, mask)
        for i, xi in enumerate(xs):
            alone, _ = net(xi[None])
            assert_close_rel(logits[i, :len(xi)], alone[0], FP32_OPS, f"stream {i}")
        assert torch.count_nonzero(logits[~mask]) == 0
