import torch
import torch.nn.functional as F

from edge_glass.config import config_from_dict
from edge_glass.features.cache import FeatureTable
from edge_glass.features.pipeline import PairedData
from edge_glass.data.samples import Sample
from edge_glass.eval.retrieval import format_table, recall_at_k
from edge_glass.eval.retrieval import evaluate_retrieval
from edge_glass.models.alignment import AlignmentModel


def test_recall_counts_strictly_better_items():
    q = torch.eye(3)
    g = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1.0]])
    g = F.normalize(g, dim=-1)
    pos = torch.eye(3, dtype=torch.bool)
    r = recall_at_k(q, g, pos, [1, 2])
    assert r == {"R@1": 100.0, "R@2": 100.0}
    pos_wrong = torch.tensor([[False, True, False], [True, False, False], [False, False, True]])
    r = recall_at_k(q, g, pos_wrong, [1, 2, 3])
    assert r["R@1"] == round(100 / 3, 2) and r["R@3"] == 100.0


def test_an_image_query_is_right_if_any_of_its_captions_ranks_high():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[0.3, 1.0], [1.0, 0.1], [0.1, 1.0]]), dim=-1)  # caption 0 of image 0 is bad
    pos = torch.tensor([[True, True, False], [False, False, True]])
    assert recall_at_k(img, txt, pos, [1])["R@1"] == 100.0  # image 0 finds its second caption first
    assert recall_at_k(txt, img, pos.t(), [1])["R@1"] == round(200 / 3, 2)  # its bad caption finds image 1


def tiny_model_and_data(dims, eval_dims=None):
    cfg = config_from_dict({"encoders": {"image": {"type": "efficientnet_lite"}, "text": {"type": "sentence_transformer"}},
                            "data": {"train": ["coco:x"]}, "model": {"dims": dims}, "eval": {"dims": eval_dims}})
    torch.manual_seed(0)
    model = AlignmentModel(cfg.model, cfg.loss, {"image": 6, "text": 5})
    n_img, caps = 4, 2
    img = FeatureTable(torch.randn(n_img * 3, 6), torch.full((n_img,), 3), torch.randn(n_img, 6))
    txt = FeatureTable(torch.randn(n_img * caps * 2, 5), torch.full((n_img * caps,), 2), torch.randn(n_img * caps, 5))
    samples = [Sample(group=str(i // caps), source="", image=f"{i // caps}", text=f"t{i}") for i in range(n_img * caps)]
    rows = {"image": torch.arange(n_img * caps) // caps, "text": torch.arange(n_img * caps)}
    return cfg, model, PairedData(samples, rows, {"image": img, "text": txt})


def test_evaluate_retrieval_reports_both_directions_at_every_dim():
    cfg, model, data = tiny_model_and_data([16, 8])
    r = evaluate_retrieval(model, data, [1, 5, 10])
    assert set(r["dims"]) == {"16", "8"} and r["n_images"] == 4 and r["n_texts"] == 8
    assert r["text_to_image"] == r["dims"]["16"]["text_to_image"]
    assert r["dims"]["8"]["image_to_text"]["R@10"] == 100.0  # only 8 texts
    assert "text_to_image" in format_table(r)


def test_eval_dims_truncate_a_model_trained_at_one_dim():
    cfg, model, data = tiny_model_and_data([16], eval_dims=[16, 4])
    r = evaluate_retrieval(model, data, [1], dims=cfg.eval.dims)
    assert set(r["dims"]) == {"16", "4"}
