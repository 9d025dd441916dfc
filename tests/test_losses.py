import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from numerics import FP32_OPS, FP32_SUM, assert_close_rel

from edge_glass.losses import gather, info_nce, matryoshka_info_nce


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_matches_the_textbook_formula():
    a, b = unit(6, 8, 0), unit(6, 8, 1)
    keys = torch.arange(6)
    logits = 10.0 * a @ b.t()
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6)))
    torch.testing.assert_close(info_nce(a, b, torch.tensor(10.0), keys, keys), expected)


def test_two_captions_of_one_image_are_not_negatives():
    """Rows 0 and 1 are the same image with two captions: neither caption may push the other away."""
    img = unit(4, 8, 0)
    img[1] = img[0]
    txt = unit(4, 8, 1)
    key_img, key_txt = torch.tensor([0, 0, 1, 2]), torch.arange(4)
    base = info_nce(img, txt, torch.tensor(10.0), key_img, key_txt)
    # make caption 1 extremely similar to image 0: a false negative if it were not masked
    txt2 = txt.clone()
    txt2[1] = img[0]
    moved = info_nce(img, txt2, torch.tensor(10.0), key_img, key_txt)
    unmasked = info_nce(img, txt2, torch.tensor(10.0), torch.arange(4), key_txt)
    # with the mask the change only helps (pair 1 itself got more similar); without it, row 0 suffers
    assert moved < base
    assert unmasked > moved


def test_identical_caption_texts_are_not_negatives():
    img, txt = unit(3, 8, 0), unit(3, 8, 1)
    same_text = torch.tensor([5, 5, 6])  # two images described by the very same sentence
    logits = 10.0 * img @ txt.t()
    logits[0, 1] = logits[1, 0] = float("-inf")
    t = torch.arange(3)
    expected = 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.t(), t))
    torch.testing.assert_close(info_nce(img, txt, torch.tensor(10.0), torch.arange(3), same_text), expected)


def test_matryoshka_loss_is_the_normalised_weighted_sum():
    a = {8: unit(4, 8, 0), 4: unit(4, 4, 1)}
    b = {8: unit(4, 8, 2), 4: unit(4, 4, 3)}
    k, s = torch.arange(4), torch.tensor(5.0)
    got = matryoshka_info_nce(a, b, s, k, k, {8: 3.0, 4: 1.0})
    want = 0.75 * info_nce(a[8], b[8], s, k, k) + 0.25 * info_nce(a[4], b[4], s, k, k)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(matryoshka_info_nce(a, b, s, k, k, {8: 0.0, 4: 1.0}), info_nce(a[4], b[4], s, k, k))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, x, y, w_init, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    w = torch.nn.Parameter(w_init.clone())
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    n = x.shape[0] // world
    xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
    a = gather(F.normalize(xs @ w, dim=-1))
    b = gather(F.normalize(ys, dim=-1))
    keys = torch.arange(x.shape[0])
    loss = info_nce(a, b, scale.exp(), keys, keys)
    loss.backward()
    # what DDP does: average gradients over processes
    for p in (w, scale):
        dist.all_reduce(p.grad)
        p.grad /= world
    if rank == 0:
        torch.save((loss.item(), w.grad.clone(), scale.grad.clone()), out)
    dist.barrier()
    dist.destroy_process_group()


def test_gathered_loss_and_averaged_gradients_equal_one_process(tmp_path):
    """2 gloo processes with half the batch each == 1 process with the whole batch."""
    g = torch.Generator().manual_seed(0)
    x, y, w0 = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g), torch.randn(6, 5, generator=g)
    w = torch.nn.Parameter(w0.clone())
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    keys = torch.arange(8)
    ref = info_nce(F.normalize(x @ w, dim=-1), F.normalize(y, dim=-1), scale.exp(), keys, keys)
    ref.backward()

    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, _free_port(), x, y, w0, str(out)), nprocs=2, start_method="spawn")
    loss, gw, gs = torch.load(out)
    # Each process embeds its half of the rows (another matmul shape), and the gradients are summed
    # in another order (two halves, then all_reduce). |d loss| <= max |d logit| <= logit scale (10) x
    # the rounding of a 5-dim unit-vector dot product (FP32_SUM, ~8 eps): so FP32_SUM relative to
    # the logit scale; a missed gather or a wrong average moves the loss by O(0.1).
    assert_close_rel(loss, ref.item(), FP32_SUM, "2-process loss", scale=10.0)
    assert_close_rel(gw, w.grad, FP32_OPS, "2-process weight gradient")
    assert_close_rel(gs, scale.grad, FP32_OPS, "2-process scale gradient")
