import json

import pytest
import torch

from edge_glass.encoders.efficientnet import EfficientNetLiteConfig, EfficientNetLiteEncoder
from edge_glass.errors import InputError

TOILETS = 861  # ImageNet "toilet seat"


def coco_image(data_root, caption_word):
    d = json.loads((data_root / "coco1k" / "captions.json").read_text())
    names = {im["id"]: im["file_name"] for im in d["images"]}
    ann = next(a for a in d["annotations"] if caption_word in a["caption"].lower())
    return str(data_root / "coco1k" / "images" / names[ann["image_id"]])


def test_lite0_gives_49_tokens_of_1280_and_mean_pooled(image_encoder, data_root):
    files = sorted((data_root / "coco1k" / "images").iterdir())[:3]
    out = image_encoder.encode([str(f) for f in files])
    assert out.tokens.shape == (3, 49, 1280)
    assert out.mask.all() and out.mask.dtype == torch.bool
    torch.testing.assert_close(out.pooled, out.tokens.mean(1))


def test_lite0_weights_and_normalisation_classify_a_real_photo(image_encoder, data_root):
    """The ImageNet classifier on our features must recognise toilets in a COCO toilet photo."""
    path = coco_image(data_root, "row of white toilets")
    pixels = image_encoder.collate([image_encoder.prepare(path)])
    with torch.no_grad():
        logits = image_encoder.net(pixels)
    assert TOILETS in logits.topk(5).indices[0].tolist()


def test_lite2_uses_its_native_260px_resolution(data_root):
    enc = EfficientNetLiteEncoder(EfficientNetLiteConfig(model="efficientnet-lite2"))
    assert enc.input_size() == 260
    out = enc.encode([str(sorted((data_root / "coco1k" / "images").iterdir())[0])])
    assert out.tokens.shape == (1, 81, 1280)  # ceil(260 / 32) = 9 -> 9 x 9


def test_bf16_autocast_is_close_to_fp32_and_changes_the_fingerprint(image_encoder, data_root):
    bf16 = EfficientNetLiteEncoder(EfficientNetLiteConfig(autocast="bf16"))
    files = [str(f) for f in sorted((data_root / "coco1k" / "images").iterdir())[:2]]
    a, b = image_encoder.encode(files), bf16.encode(files)
    assert b.tokens.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a.pooled, b.pooled)
    assert (cos > 0.98).all()
    assert bf16.cache_id() != image_encoder.cache_id()


def test_corrupt_missing_and_empty_images_raise_input_error_naming_the_file(image_encoder, tmp_path, data_root):
    good = sorted((data_root / "coco1k" / "images").iterdir())[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    for name, reason in [("cut.jpg", "corrupt"), ("empty.jpg", "empty"), ("text.jpg", "not a recognised image"), ("missing.jpg", "not found")]:
        with pytest.raises(InputError, match=reason) as err:
            image_encoder.prepare(str(tmp_path / name))
        assert name in str(err.value)


def test_content_key_follows_bytes_not_names(image_encoder, tmp_path, data_root):
    src = sorted((data_root / "coco1k" / "images").iterdir())[:2]
    (tmp_path / "renamed.jpg").write_bytes(src[0].read_bytes())
    assert image_encoder.content_key(str(tmp_path / "renamed.jpg")) == image_encoder.content_key(str(src[0]))
    assert image_encoder.content_key(str(src[1])) != image_encoder.content_key(str(src[0]))


def test_clip_vision_path_with_a_tiny_random_model(tmp_path, data_root):
    """The Hugging Face CLIPVisionModel code path (the seeds' backbone) on a tiny random config."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from edge_glass.encoders.clip import CLIPVisionConfig as Cfg
    from edge_glass.encoders.clip import CLIPVisionEncoder

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16)
    CLIPVisionModel(config).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(tmp_path)
    files = [str(f) for f in sorted((data_root / "coco1k" / "images").iterdir())[:2]]

    enc = CLIPVisionEncoder(Cfg(model=str(tmp_path)))
    assert enc.input_size() == 64 and enc.token_dim == 32
    out = enc.encode(files)
    assert out.tokens.shape == (2, 1 + 16, 32) and out.pooled.shape == (2, 32)
    penultimate = CLIPVisionEncoder(Cfg(model=str(tmp_path), layer=-2, drop_cls=True)).encode(files)
    assert penultimate.tokens.shape == (2, 16, 32)
    assert not torch.allclose(penultimate.tokens, out.tokens[:, 1:])
