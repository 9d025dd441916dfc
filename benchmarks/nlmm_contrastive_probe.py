"""Does NL-MM's contrastive term leave its chance plateau? A probe on FSDD alone (750 clips: every
4th recording), contrastive loss only, plain AdamW, 80 steps of 64; prints the loss every 8 steps.

    python benchmarks/nlmm_contrastive_probe.py '{"lr": 5e-4}' '{"lr": 2e-3}' '{"lr": 2e-3, "cms": null}'

Each argument is a JSON object of NLMMModelConfig fields (d_model 64, 4 heads, 8 slots by default)
plus "lr" and "steps". Chance is about 4.05 (ln of the in-batch negatives once duplicates of
the ten digit words are masked); a run that stays there has collapsed its embeddings.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_glass.config import NLMMLossConfig, NLMMModelConfig  # noqa: E402
from edge_glass.data.fsdd import DIGIT_WORDS, parse_recording  # noqa: E402
from edge_glass.data.samples import DataReport, Sample  # noqa: E402
from edge_glass.nlmm.core import NLMMCore  # noqa: E402
from edge_glass.nlmm.data import MediaSpec, build_nlmm_data, text_vocabulary  # noqa: E402
from edge_glass.nlmm.model import NLMM  # noqa: E402
from edge_glass.paths import resolve_data_path  # noqa: E402


def main() -> None:
    clips = sorted(Path(resolve_data_path("fsdd")).glob("recordings/*.wav"))[::4]
    samples = [Sample(group=c.name, source=str(c), audio=str(c), text=DIGIT_WORDS[parse_recording(c.name).digit]) for c in clips]
    tok = text_vocabulary(samples)
    data = build_nlmm_data(samples, tok, MediaSpec(n_mels=40, max_audio_seconds=1.5, max_text_tokens=4), DataReport(), workers=2)
    loss_cfg = NLMMLossConfig(text=0, image=0, audio=0, contrastive=1)
    for spec in sys.argv[1:] or ['{"lr": 5e-4}']:
        kw = json.loads(spec)
        lr, steps = kw.pop("lr", 5e-4), kw.pop("steps", 80)
        torch.manual_seed(0)
        base = dict(d_model=64, heads=4, depth={"text": 1, "image": 1, "audio": 2}, memory_slots=8, decoder_depth=1,
                    embed_dims=[64], ttt={"rank": 8, "mini_batch": 4})
        core = NLMMCore(NLMM(NLMMModelConfig(**{**base, **kw}), len(tok), 40, ("audio", "text")))
        opt = torch.optim.AdamW(core.parameters(), lr=lr)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(steps):
            loss, _ = core(data.batch(torch.randperm(len(data), generator=g)[:64]), loss_cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(round(loss.item(), 2))
        print(spec, losses[:: max(1, steps // 10)], "last", losses[-1], flush=True)


if __name__ == "__main__":
    main()
