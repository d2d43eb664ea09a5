"""Text tower adaptation on the IU X-ray reports: does continued MLM pretraining help?

1. ``encoders/text_mlm_reports.yaml``: MiniLM (the packaged all-MiniLM-L6-v2) trained ``--steps`` steps
   with BERT's masked-language objective on 9/10 of the reports (findings + impression); the run's
   ``metrics.json`` holds the masked-token perplexity on the held-out tenth before and after (same masks).
2. A text classifier on frozen sentence embeddings (mean pooling): logistic regression predicting the
   MeSH ``normal`` tag from the *findings* text alone, fitted on the training reports and scored (AUROC) on
   the held-out ones, for the unadapted and the adapted encoder.

    python benchmarks/text_mlm_iu.py --steps 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medfm.data.reports import IU_LABELS, read_iu_xray
from medfm.encoders.text import TextEncoder
from medfm.evaluate.probe import logistic_probe
from medfm.pretrain import load_recipe, run_pretrain

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def embed(encoder: TextEncoder, texts: list[str], batch: int = 64) -> torch.Tensor:
    from tqdm.auto import tqdm

    encoder.eval()
    return torch.cat([encoder(texts[i:i + batch])["pooled"] for i in tqdm(range(0, len(texts), batch), leave=False)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "text_mlm_iu"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    out = Path(args.out)
    cfg = load_recipe(REPO / "encoders" / "text_mlm_reports.yaml", {
        "data": {"batch_size": args.batch},
        "trainer": {"max_steps": args.steps, "checkpoint_every_n_steps": 200}})
    t0 = time.perf_counter()
    if not (out / "encoder").exists():
        run_pretrain(cfg, out, resume=(out / "checkpoints" / "last.ckpt").exists())
    minutes = (time.perf_counter() - t0) / 60
    m = json.loads((out / "metrics.json").read_text())

    # the same split as the MLM run: reports with text, every holdout_every-th held out
    every = cfg["text_mlm"]["holdout_every"]
    reports = [r for r in read_iu_xray() if r.text()]
    held = [i % every == every - 1 for i in range(len(reports))]
    keep = [i for i, r in enumerate(reports) if r.findings]
    normal = list(IU_LABELS).index("normal")
    y = torch.tensor([int(reports[i].labels[normal]) for i in keep])
    is_held = torch.tensor([held[i] for i in keep])
    texts = [reports[i].text(sections=("findings",)) for i in keep]
    rows = []
    for name, path in (("MiniLM (unadapted)", None), (f"MiniLM + MLM on IU reports ({args.steps} steps)", out / "encoder")):
        x = embed(TextEncoder(path, max_length=128), texts)
        r = logistic_probe(x[~is_held], y[~is_held], x[is_held], y[is_held], num_classes=2)
        rows.append((name, r["auroc"], r["accuracy"]))
    ppl = (m["heldout_perplexity_before"], m["heldout_perplexity_after"])
    print(f"\nIU X-ray reports: MLM on {m['train_texts']} reports, perplexity on {m['heldout_texts']} held out; "
          f"'normal' classifier on findings text: {int((~is_held).sum())} train / {int(is_held.sum())} held-out "
          f"reports ({float(y[is_held].float().mean()):.3f} normal); MLM run {minutes:.1f} min\n")
    print("| text encoder | held-out masked-token perplexity | 'normal' AUROC (findings) | accuracy |")
    print("|---|---|---|---|")
    for (name, auroc, acc), p in zip(rows, ppl):
        print(f"| {name} | {p:.2f} | {auroc:.4f} | {acc:.4f} |")


if __name__ == "__main__":
    main()
