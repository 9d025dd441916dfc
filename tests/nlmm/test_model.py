"""NL-MM network parts on synthetic tensors: masks, order invariance, subsets of modalities, TTT
per-sequence state and reset, the NL optimizer's periods and exact resume, EMA, gradient
checkpointing, bf16 autocast with fp32 fast-weight states."""
from __future__ import annotations

import copy

import pytest
import torch
from numerics import FP32_NET, FP32_OPS, assert_close_rel

from edge_glass.config import NLMMLossConfig, NLMMModelConfig
from edge_glass.nlmm.core import NLMMCore
from edge_glass.nlmm.evaluate import adaptation
from edge_glass.nlmm.model import NLMM, LatentMemory
from edge_glass.nlmm.optim import EMA, NLOptimizer, nl_groups
from edge_glass.tasks.base import param_groups

N_MELS, VOCAB, S = 16, 40, 32


def tiny_cfg(**kw) -> NLMMModelConfig:
    base = dict(d_model=32, heads=2, depth={"text": 1, "image": 1, "audio": 1}, patch_size=8, memory_slots=4, decoder_depth=1,
                embed_dims=[32, 8], chunk_size=8, ttt={"rank": 4, "eta": 0.5, "mini_batch": 2},
                cms=[{"name": "fast", "period": 1, "lr": 0.01}, {"name": "mid", "period": 3, "lr": 0.01, "optimizer": "adamw"}])
    base.update(kw)
    return NLMMModelConfig(**base)


def make_net(seed: int = 0, **kw) -> NLMM:
    torch.manual_seed(seed)
    return NLMM(tiny_cfg(**kw), VOCAB, N_MELS)


def make_batch(B: int = 4, seed: int = 0, frames=(37, 20, 9, 30), text_len=(6, 3, 8, 5), image=(1, 1, 0, 1), audio=(1, 0, 1, 1)) -> dict:
    g = torch.Generator().manual_seed(seed)
    T, L = max(frames), max(text_len) + 2
    text = torch.zeros(B, L, dtype=torch.long)
    for i, n in enumerate(text_len):
        text[i, : n + 2] = torch.cat([torch.tensor([2]), torch.randint(5, VOCAB, (n,), generator=g), torch.tensor([3])])
    mel = torch.full((B, T, N_MELS), -1.5)
    for i, n in enumerate(frames):
        mel[i, :n] = torch.randn(n, N_MELS, generator=g)
    return {"image": torch.randn(B, 3, S, S, generator=g) * torch.tensor(image, dtype=torch.float)[:, None, None, None],
            "image_mask": torch.tensor(image, dtype=torch.bool),
            "audio": mel, "audio_lengths": torch.tensor(frames) * torch.tensor(audio), "audio_mask": torch.tensor(audio, dtype=torch.bool),
            "text": text, "text_lengths": torch.tensor(text_len) + 2, "text_mask": torch.ones(B, dtype=torch.bool)}


def rows(batch: dict, i: int) -> dict:
    """Row i of a batch alone, trimmed to its own lengths (no padding at all)."""
    out = {k: v[i : i + 1] for k, v in batch.items()}
    n = max(1, int(out["audio_lengths"][0]))
    out["audio"] = out["audio"][:, :n]
    out["text"] = out["text"][:, : int(out["text_lengths"][0])]
    return out


@torch.no_grad()
def test_padded_batch_equals_each_sample_alone_at_real_tokens():
    net = make_net().eval()
    batch = make_batch()
    for m in ("audio", "text", "image"):
        x, mask, _ = net.encode(m, batch)
        for i in range(4):
            if not batch[f"{m}_mask"][i]:
                assert not mask[i].any() and x[i].abs().max() == 0  # absent: fully masked, zero
                continue
            xi, mi, _ = net.encode(m, rows(batch, i))
            n = int(mi.sum())
            assert int(mask[i].sum()) == n
            assert_close_rel(x[i][mask[i]], xi[0][mi[0]], FP32_NET, f"{m} row {i}")
            assert x[i][~mask[i]].abs().max() == 0 if (~mask[i]).any() else True


@torch.no_grad()
def test_memory_does_not_depend_on_the_order_of_the_modalities():
    net = make_net().eval()
    batch = make_batch()
    streams = net.encode_all(batch)
    forward, _ = net.memory({m: streams[m] for m in ("image", "audio", "text")})
    backward, _ = net.memory({m: streams[m] for m in ("text", "audio", "image")})
    assert_close_rel(backward, forward, FP32_OPS, "memory, modalities reversed")
    # ... and it does depend on what is in it
    other, _ = net.memory({m: streams[m] for m in ("image", "audio")})
    L = net.cfg.memory_slots
    assert (other[:, :L] - forward[:, :L]).abs().max() > 1e-2


@torch.no_grad()
def test_each_sample_reads_only_the_modalities_it_has():
    net = make_net().eval()
    batch = make_batch(image=(1, 0, 1, 0), audio=(0, 1, 1, 0))  # image only, audio only, both, neither
    names = ["image", "audio"]
    ctx, ctx_mask = net.context(net.encode_all(batch), names)
    L = net.cfg.memory_slots
    assert ctx.shape[1] == L + 2  # the slots, then one summary token per modality (image, audio)
    assert ctx_mask[:, L:].tolist() == [[True, False], [False, True], [True, True], [False, False]]
    for i, has in enumerate((["image"], ["audio"], ["image", "audio"])):
        alone, _ = net.context(net.encode_all(rows(batch, i)), has)
        assert_close_rel(ctx[i, :L], alone[0, :L], FP32_NET, f"row {i} with {has}: slots")
        summaries = ctx[i, L:][ctx_mask[i, L:]]
        assert_close_rel(summaries, alone[0, L:], FP32_NET, f"row {i} with {has}: summary tokens")
    empty = net.memory.slots.new_zeros(1, 0, net.cfg.d_model)  # a row with nothing reads only the null key
    nothing, _ = net.memory({"image": (empty, torch.zeros(1, 0, dtype=torch.bool))})
    assert_close_rel(ctx[3, :L], nothing[0, :L], FP32_NET, "row with neither")


@torch.no_grad()
def test_ttt_state_is_per_sequence_and_eta_zero_is_no_adapter():
    net = make_net().eval()
    for enc in net.encoders.values():  # a trained adapter: non-zero up-projection
        torch.nn.init.normal_(enc.ttt.up.weight, std=0.5)
    batch = make_batch()
    x_all, mask, _ = net.encode("audio", batch)
    x_one, _, _ = net.encode("audio", rows(batch, 3))
    assert_close_rel(x_all[3][mask[3]], x_one[0][: int(mask[3].sum())], FP32_NET, "row 3 in a batch vs alone")
    plain = make_net(ttt={"enabled": False, "rank": 4})
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if ".ttt." not in k})
    with adaptation(net, "none"):
        off, _, _ = net.encode("audio", batch)
    ref, _, _ = plain.eval().encode("audio", batch)
    assert_close_rel(off, ref, FP32_OPS, "eta 0 vs no adapter")
    assert (x_all - ref).abs().max() > 1e-3  # and the adapter does something when it learns


@torch.no_grad()
def test_stream_adaptation_carries_the_fast_weight_and_reset_forgets_it():
    net = make_net().eval()
    for enc in net.encoders.values():
        torch.nn.init.normal_(enc.ttt.up.weight, std=0.5)
    batch = make_batch()
    fresh, _, _ = net.encode("audio", rows(batch, 0))
    with adaptation(net, "stream"):
        net.encode("audio", rows(batch, 3))              # hear another clip first
        carried, _, _ = net.encode("audio", rows(batch, 0))
        net.reset_stream()
        again, _, _ = net.encode("audio", rows(batch, 0))
    assert (carried - fresh).abs().max() > 1e-4
    assert_close_rel(again, fresh, FP32_OPS, "after reset")


def loss_cfg() -> NLMMLossConfig:
    return NLMMLossConfig()


def test_the_loss_has_every_term_and_each_reaches_its_decoder():
    torch.manual_seed(0)
    core = NLMMCore(make_net())
    loss, metrics = core(make_batch(), loss_cfg())
    assert {"loss_text", "loss_image", "loss_audio", "loss_contrastive"} <= set(metrics)
    loss.backward()
    for part in ("text_decoder", "image_decoder", "audio_decoder", "embed_proj", "memory"):
        grads = [p.grad for p in getattr(core.net, part).parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), part


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    batch = make_batch()
    grads = []
    for on in (False, True):
        core = NLMMCore(make_net(gradient_checkpointing=on))
        loss, _ = core(batch, loss_cfg())
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in core.parameters() if p.grad is not None])))
    assert_close_rel(grads[1][0], grads[0][0], FP32_OPS, "loss")
    assert_close_rel(grads[1][1], grads[0][1], FP32_NET, "gradients")


def test_bf16_autocast_keeps_fast_weight_states_in_float32():
    net = make_net()
    batch = make_batch()
    captured = []
    layer = net.encoders["audio"].blocks.blocks[0].mixer
    handle = layer.register_forward_hook(lambda mod, args, out: captured.append(out[1].memory.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = NLMMCore(net)(batch, loss_cfg())
    handle.remove()
    assert torch.isfinite(loss) and captured and all(d == torch.float32 for d in captured)
    with torch.no_grad():
        ref, _ = NLMMCore(net)(batch, loss_cfg())
    assert abs(loss.item() - ref.item()) < 0.05 * abs(ref.item())  # bf16 rounding, not a different model


def optimizer_for(core: NLMMCore) -> NLOptimizer:
    levels = core.net.cms_modules()
    return NLOptimizer(nl_groups(param_groups(core, 0.01), levels, core.net.cfg.cms, 1e-3, (0.9, 0.98)))


def train_steps(core, opt, batches):
    for b in batches:
        loss, _ = core(b, loss_cfg())
        loss.backward()
        opt.step()
        opt.zero_grad()
        core.update_ema()


def test_each_level_changes_only_at_its_period_and_step_all_reports_it():
    core = NLMMCore(make_net())
    opt = optimizer_for(core)
    assert opt.level_names == ["base", "base_no_decay", "fast", "mid"]
    mid = list(core.net.cms_modules()[1].parameters())
    seen = []
    for t in range(1, 7):
        before = [p.detach().clone() for p in mid]
        loss, _ = core(make_batch(seed=t), loss_cfg())
        loss.backward()
        assert opt.due(t) == [n for n in opt.level_names if n != "mid" or t % 3 == 0]
        stepped = opt.step_all(t)
        opt.zero_grad()
        changed = any(not torch.equal(a, p) for a, p in zip(before, mid))
        seen.append((t, "mid" in stepped, changed))
    assert seen == [(t, t % 3 == 0, t % 3 == 0) for t in range(1, 7)]
    with pytest.raises(ValueError, match="the next step is 7"):
        opt.step_all(9)


def test_optimizer_state_saved_mid_period_resumes_bitwise():
    batches = [make_batch(seed=s) for s in range(5)]
    a = NLMMCore(make_net(), ema=0.9)
    oa = optimizer_for(a)
    train_steps(a, oa, batches)
    b = NLMMCore(make_net(), ema=0.9)
    ob = optimizer_for(b)
    train_steps(b, ob, batches[:2])                       # step 2: the mid level (period 3) holds 2 steps of gradients
    state, opt_state = copy.deepcopy(b.state_dict()), copy.deepcopy(ob.state_dict())
    c = NLMMCore(make_net(seed=1), ema=0.9)               # another init: everything must come from the checkpoint
    c.load_state_dict(state)
    oc = optimizer_for(c)
    oc.load_state_dict(opt_state)
    train_steps(c, oc, batches[2:])
    sa, sc = a.state_dict(), c.state_dict()
    assert set(sa) == set(sc) and any(k.startswith("ema.") for k in sa)
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert oc.state_dict()["levels"][3]["count"] == oa.state_dict()["levels"][3]["count"] == 2


def test_ema_follows_its_decay_and_is_what_inference_uses():
    net = make_net()
    ema = EMA(net, 0.5)
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)  # t = 1: decay min(0.5, 2 / 11)
    d = 2 / 11
    name = "embed_proj.weight"
    assert_close_rel(ema.weights()[name], d * w0[name] + (1 - d) * (w0[name] + 1), FP32_OPS, "ema")
    core = NLMMCore(net, ema=0.5)
    core.ema = ema
    live = dict(net.named_parameters())[name].detach().clone()
    with core.inference_weights() as inf:
        assert inf is net  # swapped in place, not copied
        assert torch.equal(dict(inf.named_parameters())[name], ema.weights()[name])
    assert torch.equal(dict(net.named_parameters())[name], live)  # the live weights are back
    assert not torch.equal(live, ema.weights()[name])
    try:
        with core.inference_weights():
            raise KeyboardInterrupt  # an interrupted evaluation still restores them
    except KeyboardInterrupt:
        pass
    assert torch.equal(dict(net.named_parameters())[name], live)


def test_memory_needs_no_positions_latent_memory_is_a_set_reader():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    mem = LatentMemory(cfg, None).eval()
    x = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    perm = torch.randperm(7)
    a, _ = mem({"image": (x, mask)})
    b, _ = mem({"image": (x[:, perm], mask)})
    assert_close_rel(b, a, FP32_OPS, "permuted keys")


def test_content_keys_do_not_depend_on_the_padding_of_the_batch():
    from edge_glass.nlmm.core import fingerprint

    text = torch.tensor([[2, 7, 9, 3, 0, 0], [2, 8, 3, 0, 0, 0]])
    alone = torch.tensor([[2, 8, 3]])
    keys = fingerprint(text, torch.tensor([4, 3]))
    assert keys[1] == fingerprint(alone, torch.tensor([3]))[0] and keys[0] != keys[1]
    mel = torch.randn(2, 9, N_MELS)
    mel[1, 5:] = -1.5
    assert fingerprint(mel, torch.tensor([9, 5]))[1] == fingerprint(mel[1:, :5], torch.tensor([5]))[0]
