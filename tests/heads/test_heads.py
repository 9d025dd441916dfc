import pytest
import torch

from edge_glass.encoders.base import EncoderOutput
from edge_glass.heads import POOLERS, MatryoshkaProjection, ProjectionConfig
from edge_glass.heads.perceiver import PerceiverResampler


def ragged_batch(b=3, t=7, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, t, d, generator=g)
    lengths = torch.tensor([t, 4, 1][:b])
    mask = torch.arange(t)[None] < lengths[:, None]
    return EncoderOutput(tokens, mask, tokens.mean(1))


@pytest.mark.parametrize("cfg", [{"type": "mean"}, {"type": "attention", "dim": 32, "heads": 4, "queries": 2},
                                 {"type": "perceiver", "dim": 32, "latents": 5, "depth": 2, "heads": 4}])
def test_poolers_ignore_padded_tokens(cfg):
    pooler_cls = POOLERS.get(cfg["type"])
    pooler = pooler_cls(pooler_cls.Config(**cfg), 16).eval()
    x = ragged_batch()
    noisy = EncoderOutput(torch.where(x.mask[..., None], x.tokens, torch.randn_like(x.tokens) * 100), x.mask, x.pooled)
    out = pooler(x)
    assert out.shape == (3, pooler.out_dim)
    torch.testing.assert_close(pooler(noisy), out)


@pytest.mark.parametrize("latents,depth,heads", [(1, 1, 1), (4, 2, 2), (8, 3, 4)])
def test_perceiver_resampler_shapes(latents, depth, heads):
    r = PerceiverResampler(in_dim=12, dim=16, latents=latents, depth=depth, heads=heads)
    x = ragged_batch(d=12)
    assert r(x.tokens, x.mask).shape == (3, latents, 16)


def test_perceiver_latents_depend_on_input():
    r = PerceiverResampler(in_dim=12, dim=16, latents=4, depth=1, heads=2)
    a, b = ragged_batch(d=12, seed=0), ragged_batch(d=12, seed=1)
    assert not torch.allclose(r(a.tokens, a.mask), r(b.tokens, b.mask))


def test_matryoshka_embeddings_are_unit_norm_nested_prefixes():
    proj = MatryoshkaProjection(16, [8, 32, 4], ProjectionConfig(hidden=24))
    x = torch.randn(5, 16)
    out = proj(x)
    assert list(out) == [32, 8, 4]
    for d, e in out.items():
        assert e.shape == (5, d)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(5))
    # a smaller embedding is the normalised prefix of the largest one's direction
    full = proj.net(x)
    torch.testing.assert_close(out[8], torch.nn.functional.normalize(full[:, :8], dim=-1))
    torch.testing.assert_close(proj.at_dim(x, 8), out[8])


def test_bad_head_width_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible"):
        POOLERS.get("attention")(POOLERS.get("attention").Config(dim=30, heads=4), 8)


def test_token_dropout_acts_only_in_training_and_keeps_a_token():
    pooler_cls = POOLERS.get("mean")
    pooler = pooler_cls(pooler_cls.Config(token_dropout=0.5), 16)
    x = ragged_batch()
    pooler.eval()
    torch.testing.assert_close(pooler(x), pooler.pool(x))
    pooler.train()
    torch.manual_seed(0)
    out = pooler(x)
    assert torch.isfinite(out).all() and not torch.allclose(out, pooler.pool(x))


@pytest.mark.parametrize("cfg", [{"type": "attention", "dim": 32, "heads": 4}, {"type": "perceiver", "dim": 32, "latents": 4, "depth": 1, "heads": 4}])
def test_residual_poolers_start_as_a_linear_map_of_the_mean(cfg):
    pooler_cls = POOLERS.get(cfg["type"])
    pooler = pooler_cls(pooler_cls.Config(**cfg, residual=True), 16).eval()
    x = ragged_batch()
    from edge_glass.tensors import masked_mean

    torch.testing.assert_close(pooler(x), pooler.residual.skip(masked_mean(x.tokens, x.mask)))
