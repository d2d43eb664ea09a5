"""CLIP on MedPix 2.0: image-caption retrieval and zero-shot type / plane / body region on ``dev``.

``encoders/clip_vit_2d.yaml`` with the packaged MiniLM text tower (all but its last block locked), trained on the ``train`` split (1653 CT/MR
images with their figure captions), evaluated on ``dev`` (197; the test split is withheld) with
``medfm.evaluate.zeroshot.evaluate_zero_shot``: image->caption and caption->image R@1/5/10 against chance,
and zero-shot accuracy for ``type`` (CT vs MR), ``plane`` and ``location_category`` against the
majority-class rate, with class names phrased as prompts below.

    python benchmarks/medpix_clip.py --data ../shared/data/medpix2/manifest.csv --steps 300
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from medfm.evaluate.zeroshot import evaluate_zero_shot
from medfm.pretrain import load_recipe, run_pretrain

REPO = Path(__file__).resolve().parents[1]
PROMPTS = {  # class value -> the phrase put into the templates
    "type": {"CT": "a CT scan (computed tomography)", "MR": "an MRI scan (magnetic resonance)"},
    "plane": {"Axial": "an axial slice", "Sagittal": "a sagittal slice", "Coronal": "a coronal slice",
              "Multiple or Montage": "a montage of several images", "Other View (see caption)": "an oblique view",
              "NOS - Not specified": "a medical image", "3D Reconstruction": "a 3D reconstruction",
              "AP": "an anteroposterior view"},
    "location_category": {"Head": "the head and brain", "Spine and Muscles": "the spine",
                          "Thorax": "the chest and lungs", "Abdomen": "the abdomen",
                          "Reproductive and Urinary System": "the pelvis, kidneys and bladder"},
}
TEMPLATES = ("{}.", "a medical image of {}.", "an image showing {}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="medpix2/manifest.csv")
    ap.add_argument("--out", default=str(REPO / "runs" / "medpix_clip"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--encoder", default="resnet18", help="image tower (a registered encoder)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()
    out = Path(args.out)
    vit = args.encoder.startswith("vit")
    cfg = load_recipe(REPO / "encoders" / "clip_vit_2d.yaml", {
        "encoder": {"name": args.encoder, "img_size": args.size, "patch_size": 8 if vit else None},
        # the MiniLM tower frozen but for its last block: its full backward pass would cost ~5 s a step here
        "clip": {"max_length": 48, "embed_dim": 128, "lock_text": True, "unlocked_layers": 1},
        "data": {"batch_size": args.batch, "num_workers": 2},
        "optim": {"lr": args.lr, "warmup_steps": args.steps // 10},
        "trainer": {"max_steps": args.steps, "checkpoint_every_n_steps": 100, "log_every_n_steps": 10},
    })
    t0 = time.perf_counter()
    if not (out / "model" / "config.json").exists():
        run_pretrain(cfg, out, data_path=args.data, resume=(out / "checkpoints" / "last.ckpt").exists())
    minutes = (time.perf_counter() - t0) / 60
    classes = list(PROMPTS)
    m = evaluate_zero_shot(out, args.data, classes, split="dev", text_key="caption", templates=TEMPLATES,
                           prompts=PROMPTS, out=out / "zero_shot_dev")
    print(f"\nMedPix 2.0 CLIP: {args.encoder} at {args.size}x{args.size} + MiniLM, {args.steps} steps x {args.batch} "
          f"(train 1653), {minutes:.1f} min; dev n={m['n']}\n")
    r = m["retrieval"]
    print("| direction | R@1 | R@5 | R@10 |")
    print("|---|---|---|---|")
    for way, name in (("image_to_text", "image -> caption"), ("text_to_image", "caption -> image"), ("chance", "chance")):
        print(f"| {name} | " + " | ".join(f"{r[way][k]:.3f}" for k in ("R@1", "R@5", "R@10")) + " |")
    print("\n| label | classes | zero-shot accuracy | balanced accuracy | majority-class rate |")
    print("|---|---|---|---|---|")
    for c in classes:
        v = m[c]
        print(f"| {c} | {len(v['classes'])} | {v['accuracy']:.3f} | {v['balanced_accuracy']:.3f} | {v['majority_rate']:.3f} |")
    print(f"\nfigures and metrics: {out / 'zero_shot_dev'}")


if __name__ == "__main__":
    main()
