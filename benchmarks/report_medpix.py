"""Report generation on MedPix 2.0 captions: the model against the three baselines, over seeds.

``tasks/report_2d.yaml`` (ViT encoder + 2-block MiniLM decoder with a compact vocabulary) trained on the
``train`` split (1653 CT/MR images with their figure captions) and scored on ``dev`` (197; the test split
is withheld) for each seed: BLEU-1/4, ROUGE-L, CIDEr, METEOR (pycocoevalcap), and whether the generated
caption names the image's modality, plane and body region (manifest columns ``type``, ``plane``,
``location_category``, keywords below), for the model and the most-common / random / nearest-neighbour
training caption. Mean ± std over seeds; training time and generation speed on this machine.

    python benchmarks/report_medpix.py --data ../shared/data/medpix2/manifest.csv --steps 600 --seeds 0 1 2
    python benchmarks/report_medpix.py --data ../shared/data/medpix2/manifest.csv --text findings   # case level

``--prompt-attributes type plane location_category``: heads predicting those manifest columns from the image
prompt the decoder (``report_generation.prompt_attributes``).

``--text findings``: one study per MedPix case (its images, up to 4) with the case's Findings text from
``cases_{train,dev}.jsonl`` as the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

import medfm
from medfm.finetune import load_task_recipe, run_finetune
from medfm.finetune.recipe import open_split
from medfm.finetune.report_generation import generate_reports

REPO = Path(__file__).resolve().parents[1]
ATTRIBUTES = {
    "type": {"CT": ["ct", "computed tomography", "hounsfield"], "MR": ["mr", "mri", "magnetic resonance", "t1", "t2",
                                                                       "flair", "weighted"]},
    "plane": {"Axial": ["axial", "transverse"], "Coronal": ["coronal"], "Sagittal": ["sagittal"]},
    "location_category": {
        "Head": ["head", "brain", "skull", "cranial", "intracranial", "orbit", "sinus", "cerebral", "ventricle"],
        "Thorax": ["chest", "thorax", "thoracic", "lung", "lungs", "pulmonary", "mediastinal", "heart", "cardiac"],
        "Abdomen": ["abdomen", "abdominal", "liver", "hepatic", "pancreas", "bowel", "spleen", "gallbladder"],
        "Spine and Muscles": ["spine", "spinal", "vertebral", "cervical", "lumbar", "muscle", "knee", "shoulder"],
        "Reproductive and Urinary System": ["pelvis", "pelvic", "bladder", "kidney", "renal", "uterus", "prostate",
                                            "ovary", "ovarian", "testis", "scrotal"],
    },
}
SCORES = ("bleu_1", "bleu_4", "rouge_l", "cider", "meteor")


def case_manifest(data: Path, out: Path) -> Path:
    """The image manifest with each case's Findings text (``findings``) beside every one of its images."""
    findings = {}
    for split in ("train", "dev"):
        with open(data.parent / f"cases_{split}.jsonl") as f:
            for line in f:
                case = json.loads(line)
                findings[case["U_id"]] = " ".join(((case.get("Case") or {}).get("Findings") or "").split())
    with open(data) as f:
        rows = list(csv.DictReader(f))
    rows = [{**r, "image": str(data.parent / r["image"]), "findings": findings.get(r["case_id"], "")}
            for r in rows if findings.get(r["case_id"])]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cases_manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def run_seed(args, seed: int) -> tuple[dict, float, float]:
    out = Path(args.out) / f"seed{seed}"
    study = {"study": "case_id", "max_images": 4, "max_length": 128} if args.text == "findings" else {}
    cfg = load_task_recipe(REPO / "tasks" / "report_2d.yaml", {
        "method": args.method, "seed": seed,
        "encoder": {"name": args.encoder, "img_size": args.size, "patch_size": 8},
        "report_generation": {"text": args.text, "attributes": ATTRIBUTES, "eval_batch_size": 32,
                              "prompt_attributes": args.prompt_attributes, **study},
        "data": {"val_split": "dev", "test_split": None, "batch_size": args.batch, "num_workers": 2},
        "optim": {"lr": args.lr, "warmup_steps": args.steps // 10},
        "trainer": {"max_steps": args.steps, "checkpoint_every_n_steps": 200, "log_every_n_steps": 10},
    })
    if not (out / "metrics.json").exists():
        run_finetune(cfg, out, data_path=args.data, resume=(out / "checkpoints" / "last.ckpt").exists())
    metrics = json.loads((out / "metrics.json").read_text())
    model = medfm.load(out)  # generation speed of the reloaded model, beam search as in the recipe
    dev = open_split(cfg, "dev", path=args.data)
    t0 = time.perf_counter()
    generate_reports(model, dev, 32, **cfg["report_generation"]["generation"])
    return metrics, metrics["train_time_s"], len(dev) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="medpix2/manifest.csv")
    ap.add_argument("--out", default=str(REPO / "runs" / "report_medpix"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--encoder", default="vit_tiny")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--method", default="full", help="linear_probe | lora | full ...")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--text", default="caption", choices=("caption", "findings"))
    ap.add_argument("--prompt-attributes", nargs="*", default=[], metavar="COLUMN",
                    help="manifest columns predicted from the image that prompt the decoder (e.g. type plane location_category)")
    args = ap.parse_args()
    if args.text == "findings":
        args.data = str(case_manifest(Path(args.data), Path(args.out)))
    results, train_s, gen = [], [], []
    for seed in args.seeds:
        m, t, g = run_seed(args, seed)
        results.append(m["dev"])
        train_s.append(t)
        gen.append(g)
    names = [k for k in results[0] if isinstance(results[0][k], dict)]
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"MedPix 2.0 dev, {args.text} (n={results[0]['n']}), {args.encoder}/8 {args.size}px, {args.method}, {args.steps} steps x "
          f"{args.batch}, seeds {args.seeds}, {device}: training {np.mean(train_s):.0f} s per seed, generation "
          f"{np.mean(gen):.1f} reports/s (beam 3)\n")
    cols = [*SCORES, "clinical micro-F1", *(f"names {a}" for a in ATTRIBUTES), "distinct reports"]
    print("| captions from | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in names:
        cells = []
        for key in cols:
            if key in SCORES:
                vals = [r[name].get(key, float("nan")) for r in results]
            elif key == "clinical micro-F1":
                vals = [r[name]["clinical"]["micro"]["f1"] for r in results]
            elif key == "distinct reports":
                vals = [r[name]["distinct_reports"] for r in results]
            else:
                vals = [r[name]["attributes"][key.split(" ", 1)[1]]["accuracy"] for r in results]
            cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n| the model's image sensitivity (share of reports changed) | mean ± std |\n|---|---|")
    for key in results[0]["model"]["image_sensitivity"]:
        vals = [r["model"]["image_sensitivity"][key] for r in results]
        print(f"| {key} | {np.mean(vals):.3f} ± {np.std(vals):.3f} |")
    if "attribute_heads" in results[0]["model"]:
        print("\n| attribute head | dev accuracy |\n|---|---|")
        for key in results[0]["model"]["attribute_heads"]:
            vals = [r["model"]["attribute_heads"][key]["accuracy"] for r in results]
            print(f"| {key} | {np.mean(vals):.3f} ± {np.std(vals):.3f} |")


if __name__ == "__main__":
    main()
