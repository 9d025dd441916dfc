import pytest
import torch.nn.functional as F
from numerics import FP32_NET, assert_close_rel

from edge_glass.errors import InputError


def test_minilm_token_sequence_mask_and_pooled(text_encoder):
    texts = ["A dog.", "A man riding a wave on top of a surfboard."]
    out = text_encoder.encode(texts)
    assert out.tokens.shape[0] == 2 and out.tokens.shape[2] == 384
    lengths = out.mask.sum(1)
    assert lengths[0] < lengths[1] == out.tokens.shape[1]
    # pooled is sentence-transformers' own embedding (mean pooling + normalise)
    reference = text_encoder.st.encode(texts, convert_to_tensor=True)
    # the same MiniLM forward run by sentence-transformers (its batch sorted by length): float32
    # rounding of a 6-layer transformer at most, relative to the unit vectors' scale
    assert_close_rel(out.pooled, reference, FP32_NET, "pooled vs sentence-transformers")


def test_padding_does_not_change_a_text_tokens(text_encoder):
    alone = text_encoder.encode(["A dog."])
    batched = text_encoder.encode(["A dog.", "a much longer sentence about many different things at once"])
    n = int(alone.mask.sum())
    # other shapes (padded to the longer text, masked keys) through 6 layers: relative to max |h|
    assert_close_rel(batched.tokens[0, :n], alone.tokens[0, :n], FP32_NET, "tokens batched vs alone")
    assert not batched.mask[0, n:].any()


def test_embeddings_are_semantic(text_encoder):
    e = text_encoder.encode(["a dog runs on the grass", "a puppy running in a field", "a bowl of hot soup"]).pooled
    assert F.cosine_similarity(e[0:1], e[1:2]) > F.cosine_similarity(e[0:1], e[2:3]) + 0.3


def test_empty_text_is_an_input_error(text_encoder):
    with pytest.raises(InputError, match="empty text"):
        text_encoder.prepare("   ")
