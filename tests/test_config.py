from pathlib import Path

import pytest
import yaml

from edge_glass.config import config_from_dict, dump_config, load_config, variant_config
from edge_glass.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
BASE = {
    "name": "t",
    "encoders": {"image": {"type": "efficientnet_lite"}, "text": {"type": "sentence_transformer"}},
    "data": {"train": ["coco:coco1k"]},
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_and_their_variants_validate(path):
    cfg = load_config(path)
    assert cfg.name
    for name in getattr(cfg, "variants", {}):
        assert variant_config(cfg, name).name == f"{cfg.name}/{name}"


def test_unknown_key_is_rejected_with_file_and_key_path(tmp_path):
    bad = dict(BASE, model={"heads": {"image": {"pooler": {"type": "perceiver", "latnts": 8}}}})
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert str(f) in msg
    assert "model.heads.image.pooler.latnts: unknown key" in msg  # union tag not in the path


def test_wrong_type_names_the_key_and_value():
    with pytest.raises(ConfigError, match=r"train\.epochs: .*integer.*'many'"):
        config_from_dict(dict(BASE, train={"epochs": "many"}), "x.yaml")


def test_set_overrides_are_typed_and_validated():
    cfg = config_from_dict(BASE, "x.yaml", ["train.lr=3e-4", "model.dims=[128, 256]", "train.grad_clip=null"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.dims == [256, 128]  # sorted largest first
    assert cfg.train.grad_clip is None
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key \[from --set\]"):
        config_from_dict(BASE, "x.yaml", ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        config_from_dict(BASE, "x.yaml", ["train.lr"])


def test_encoder_under_the_wrong_modality_is_rejected():
    bad = dict(BASE, encoders={"text": {"type": "efficientnet_lite"}, "image": {"type": "efficientnet_lite"}})
    with pytest.raises(ConfigError, match="encoders.text"):
        config_from_dict(bad, "x.yaml")


def test_resolved_config_round_trips():
    cfg = config_from_dict(BASE, "x.yaml", ["train.epochs=3"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)), "resolved.yaml")
    assert again == cfg


def test_variants_apply_their_overrides():
    cfg = config_from_dict(dict(BASE, variants={"small": {"model.dims": [64, 32], "loss.mrl.sample_one_dim": True}}))
    v = variant_config(cfg, "small")
    assert v.model.dims == [64, 32] and v.loss.mrl.sample_one_dim and not v.variants
    assert v.name == "t/small"


def test_mixed_precision_no_survives_yaml_reading_it_as_false():
    cfg = config_from_dict({"encoders": {"image": {"type": "efficientnet_lite"}, "text": {"type": "sentence_transformer"}},
                            "data": {"train": ["coco:x"]}}, overrides=["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
