"""Write a pretraining run's encoder into the package as ``medfm:tiny-2d`` (``medfm/weights/tiny-2d``).

    python benchmarks/ship_tiny_2d.py runs/tiny2d --train-minutes 65 [--name tiny-2d]

The encoder folder is saved as medfm saves any encoder, then its weights are rewritten in fp16 (half the bytes;
medfm reads them into fp32 parameters). ``card.json`` records what it is, the recipe, the mixture (the run's
``mixture.json``: sources, weights, what de-duplication dropped) with each source's licence and citation from
``medfm data`` (the dropped images counted per source and reason; the run keeps the list), the steps and CPU
time of the run, the file size, and the embedding of a fixed image (the MNI152
brain's middle axial slice, a file nilearn ships) that ``tests/test_suite.py`` checks the shipped encoder against.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medfm.atomic import write_json
from medfm.data import catalogue
from medfm.encoders import create_model_and_transforms
from medfm.encoders.shipped import WEIGHTS, reference_image

CATALOGUE = {"pediatric_cxr": "pediatric_cxr", "pneumoniamnist": "pneumoniamnist", "breastmnist": "breastmnist",
             "bus_bra": "bus_bra", "busi": "busi", "lgg_flair": "lgg_flair", "medpix": "medpix2", "vqa_rad": "vqa_rad"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--name", default="tiny-2d")
    ap.add_argument("--train-minutes", type=float, required=True, help="the run's training time (its progress bar)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    dest = WEIGHTS / args.name
    model, transform = create_model_and_transforms(run / "encoder")
    model.save_pretrained(dest)
    weights = dest / "model.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(str(weights)).items()}, str(weights))
    weights.chmod(0o644)
    shipped, transform = create_model_and_transforms(dest)  # what users get: the fp16 weights in fp32
    with torch.no_grad():
        x = transform({"image": reference_image()})["image"][None]
        emb = shipped.eval()(torch.as_tensor(x)).flatten()
    mixture = json.loads((run / "mixture.json").read_text())
    counts: dict[tuple, int] = {}
    for d in mixture.pop("dropped"):  # every item stays in the run's mixture.json; the card counts them
        key = (d["source"], d["copy_of_source"], d["reason"])
        counts[key] = counts.get(key, 0) + 1
    mixture["dropped_counts"] = [{"source": s, "copy_of": c, "reason": r, "images": n} for (s, c, r), n in counts.items()]
    for s in mixture["sources"]:
        src = catalogue.get_source(CATALOGUE.get(s["name"], s["name"]))
        s.update(licence=src.licence, citation=src.citation, homepage=src.homepage)
        s.pop("resolved", None)
    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    losses = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    n = sum(v.numel() for v in shipped.state_dict().values())
    card = {
        "name": f"medfm:{args.name}",
        "summary": f"{shipped.architecture}/{shipped.patch_size[0]} at {shipped.img_size[0]} px, 1 channel, MAE on "
                   f"{len(mixture['sources'])} public 2D sets mixed ({n / 1e6:.1f} M parameters, fp16)",
        "parameters": n,
        "file_bytes": weights.stat().st_size,
        "recipe": "encoders/medfm_tiny_2d.yaml",
        "steps": losses[-1][0] + 1 if losses else None,
        "loss_first_last": [losses[0][1], losses[-1][1]] if losses else None,
        "train_minutes": args.train_minutes,
        "trained_on": "CPU, 1 thread (2-core machine), fp32",
        "licence_note": "each source keeps its own licence (listed per source); the LGG FLAIR slices are CC BY-NC-SA "
                        "4.0, so use the weights non-commercially and share them alike",
        "mixture": mixture,
        "reference_embedding": [round(float(v), 6) for v in emb],
    }
    write_json(dest / "card.json", card)
    print(f"wrote {dest}: {weights.stat().st_size / 1e6:.1f} MB of fp16 weights, {n / 1e6:.2f} M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
