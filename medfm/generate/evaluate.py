"""``medfm evaluate RUN`` for a generator: is the generated data any use, and what is it like?

From the run's own training data (or ``data``) and a held-out real split (``split``, default ``val``):

1. ``n`` samples are generated for conditions drawn from the training set (its class frequencies, its
   prompts, its label maps) into ``OUT/generated/`` (a manifest every recipe reads);
2. **utility** (class conditioning): the classification recipe (``tasks/classify_2d.yaml`` or ``_3d``,
   with ``overrides``) is trained three times with the same budget: on the real training split, on
   the generated set only, and on both; each is tested on the real held-out split (AUROC);
3. **conditioning accuracy** (class conditioning): the real-only classifier, with its validation
   threshold, predicts the class each sample was generated for (beside its accuracy on real images);
4. **Fréchet distance / MMD** in the feature space of a named encoder (``features``: a medfm encoder or
   run; default: the real-only classifier's encoder, else a fixed random-init ViT), beside the same
   distances between two disjoint real training subsets of the same size;
5. **diversity** (MS-SSIM of generated pairs vs real pairs) and **memorisation** (nearest training
   image per sample vs per held-out real image, histogram and closest pairs in ``memorisation.png``).

Everything lands in ``OUT`` (default ``RUN/eval_<split>``): ``metrics.json``, ``generated/``,
``utility/{real,generated,both}/`` (ordinary fine-tuning runs), ``memorisation.png``. A finished
utility run is reused when the evaluation is repeated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medfm.artifacts import load
from medfm.atomic import write_json
from medfm.data import DataError, open_dataset
from medfm.encoders import create_encoder, preprocess_transform
from medfm.evaluate.generative import EncoderFeatures, feature_distances, memorisation, memorisation_png, pairwise_ms_ssim
from medfm.finetune import load_task_recipe, run_finetune
from medfm.run import RunFolder, find_recipe
from medfm.run.recipe import merge
from medfm.finetune.classification import evaluate_classification

from .spec import DiffusionSpec
from .export import export_generated, model_hash
from .recipe import load_generator_recipe, open_training_set

UTILITY_SETS = ("real", "generated", "both")


def stack_images(ds, indices: Sequence[int]) -> torch.Tensor:
    """The preprocessed images of ``ds`` at ``indices`` as one tensor."""
    return torch.stack([torch.as_tensor(ds[int(i)]["image"]).float() for i in indices])


def draw_conditions(generator, train, indices: Sequence[int]) -> dict:
    """Conditions taken from the training samples at ``indices``: their classes, prompts or label maps."""
    c = generator.conditioning
    if c == "class":
        names = generator.spec.class_names
        return {"classes": [names[int(train[int(i)]["label"])] for i in indices]}
    if c == "text":
        return {"prompts": [train[int(i)]["text"] for i in indices]}
    if c == "mask":
        return {"masks": [torch.as_tensor(train[int(i)]["mask"]).round().long() for i in indices]}
    return {"n": len(indices)}


def utility(cfg: dict, data: str, split: str, manifest: Path, out: Path, classify: str | None,
            overrides: Sequence[str]) -> dict:
    """AUROC on the real ``split`` of the classification recipe trained on real, generated and both."""
    recipe = find_recipe(classify or f"classify_{cfg['diffusion']['spatial_dims']}d", kind="tasks")
    base = load_task_recipe(recipe, list(overrides))
    variants = {"real": {}, "generated": {"train_real": False, "train_from": [str(manifest)]},
                "both": {"train_from": [str(manifest)]}}
    results = {}
    for name in UTILITY_SETS:
        folder = out / "utility" / name
        if not (folder / "metrics.json").exists():
            c = merge(base, {"data": {"path": str(data), "val_split": split, "test_split": None, **variants[name]}})
            print(f"utility: training the classifier on {name} data")
            run_finetune(c, folder, overwrite=folder.exists())  # an interrupted earlier attempt is redone
        m = json.loads((folder / "metrics.json").read_text())
        results[name] = {k: m[split][k] for k in ("auroc", "accuracy", "balanced_accuracy") if k in m[split]}
        results[name]["steps"] = m["steps"]
    results["recipe"] = str(recipe)
    results["overrides"] = list(overrides)
    return results


def conditioning_accuracy(classifier_run: Path, manifest: Path, split: str, class_names: list, out: Path) -> dict:
    """The real-only classifier (its validation threshold) on the generated set, labelled with the class
    each sample was generated for."""
    out.mkdir(parents=True, exist_ok=True)
    model = load(classifier_run / "model")
    run_metrics = json.loads((classifier_run / "metrics.json").read_text())
    thresholds = run_metrics[split].get("selected_thresholds")
    ds = open_dataset(manifest, label="label", classes=class_names, transform=preprocess_transform(model.spec["preprocess"]))
    res, _ = evaluate_classification(model, ds, out, "generated", False, class_names, thresholds)
    return {"accuracy": res["accuracy"], "balanced_accuracy": res["balanced_accuracy"], "auroc": res["auroc"],
            "n": res.get("n", len(ds)), "real_accuracy": run_metrics[split]["accuracy"],
            "real_balanced_accuracy": run_metrics[split]["balanced_accuracy"], "classifier": str(classifier_run)}


def feature_encoder(features: str | None, classifier_run: Path | None, spec: DiffusionSpec) -> tuple[EncoderFeatures, str]:
    """The encoder whose feature space the distances use, and its name for the table."""
    if features:
        enc = load(features)
        return EncoderFeatures(enc, getattr(enc, "img_size", None)), str(features)
    if classifier_run is not None:
        enc = load(classifier_run / "encoder")
        return EncoderFeatures(enc, getattr(enc, "img_size", None)), f"{classifier_run / 'encoder'} (the real-only classifier)"
    torch.manual_seed(0)
    dims, size = spec.spatial_dims, spec.image_size
    enc = create_encoder("vit_tiny", spatial_dims=dims, in_chans=spec.in_chans, img_size=size,
                         patch_size=max(size // 8, 1))
    return EncoderFeatures(enc, size), f"vit_tiny random init (seed 0, patch {max(size // 8, 1)})"


def evaluate_generator(run: str | Path, data: str | None = None, split: str | None = "val", out: str | None = None,
                       n: int | None = None, features: str | None = None, classify: str | None = None,
                       overrides: Sequence[str] = (), batch_size: int = 32, steps: int | None = None) -> dict:
    """Generate, then measure utility, conditioning accuracy, feature distances, diversity and memorisation
    (see the module docstring); writes ``metrics.json`` into ``out``."""
    run = Path(run)
    split = split or "val"
    cfg = load_generator_recipe(overrides=RunFolder(run).read_recipe())
    generator = load(run)
    data = str(data or cfg["data"]["path"])
    dest = Path(out) if out else run / f"eval_{split}"
    dest.mkdir(parents=True, exist_ok=True)
    train = open_training_set(cfg, data)
    heldout = open_training_set(merge(cfg, {"data": {"split": split}}), data)
    if len(heldout) == 0:
        raise DataError(f"{data}: the held-out split {split!r} has no images (give --split NAME)")
    n = n or min(len(train), 500)
    rng = np.random.default_rng(0)
    draw = rng.choice(len(train), size=n, replace=n > len(train))
    manifest = export_generated(generator, dest / "generated", **draw_conditions(generator, train, draw), seed=0,
                                steps=steps, batch_size=batch_size, model=model_hash(run))
    generated_set = open_dataset(manifest, spatial_dims=generator.spec.spatial_dims,
                                 transform=preprocess_transform(generator.spec.preprocess))
    fake = stack_images(generated_set, range(len(generated_set)))
    metrics: dict = {"run": str(run), "data": data, "split": split, "n_generated": n, "generated": str(manifest),
                     "sampler": generator.spec.sampler, "steps": steps or generator.spec.sample_steps,
                     "guidance_scale": generator.spec.guidance_scale}
    classifier_run = None
    if generator.conditioning == "class":
        metrics["utility"] = utility(cfg, data, split, manifest, dest, classify, overrides)
        classifier_run = dest / "utility" / "real"
        metrics["conditioning"] = conditioning_accuracy(classifier_run, manifest, split, generator.spec.class_names,
                                                        dest / "conditioning")
    feats, feats_name = feature_encoder(features, classifier_run, generator.spec)
    train_all = stack_images(train, range(len(train)))  # loaded once: the real subsets and the memorisation check
    perm = torch.as_tensor(rng.permutation(len(train)))
    m = min(n, len(train) // 2)
    real_a, real_b = train_all[perm[:m]], train_all[perm[m:2 * m]]
    metrics["features"] = feats_name
    metrics["distance"] = {"generated_vs_real": feature_distances(feats, real_a, fake[:m] if len(fake) > m else fake),
                           "real_vs_real": feature_distances(feats, real_a, real_b)}
    metrics["diversity"] = {"generated": pairwise_ms_ssim(fake), "real": pairwise_ms_ssim(real_a)}
    held = stack_images(heldout, range(min(len(heldout), 500)))
    mem = memorisation(fake, held, train_all)
    memorisation_png(mem, fake, train_all, dest / "memorisation.png")
    metrics["memorisation"] = {k: v for k, v in mem.items() if not torch.is_tensor(v)}
    write_json(dest / "metrics.json", metrics)
    return metrics


def summary_lines(metrics: dict) -> list[str]:
    """The evaluation's headline numbers as a small table for the console."""
    lines = [f"generator evaluation on {metrics.get('split')} ({metrics.get('n_generated')} generated, "
             f"{metrics.get('sampler')} {metrics.get('steps')} steps, guidance {metrics.get('guidance_scale')})"]
    u = metrics.get("utility")
    if u:
        lines.append("  utility, AUROC on real " + metrics["split"] + ":  " +
                     "  ".join(f"{k} {u[k]['auroc']:.4f}" for k in UTILITY_SETS if k in u))
    c = metrics.get("conditioning")
    if c:
        lines.append(f"  conditioning accuracy   {c['accuracy']:.4f} (balanced {c['balanced_accuracy']:.4f}); "
                     f"the same classifier on real images {c['real_accuracy']:.4f}")
    d = metrics.get("distance")
    if d:
        g, r = d["generated_vs_real"], d["real_vs_real"]
        lines.append(f"  Frechet distance        generated {g['frechet']:.3f}  real-vs-real {r['frechet']:.3f}")
        lines.append(f"  MMD (KID kernel)        generated {g['mmd']:.4f}  real-vs-real {r['mmd']:.4f}")
        lines.append(f"    features: {metrics['features']}")
    v = metrics.get("diversity")
    if v:
        lines.append(f"  MS-SSIM between pairs   generated {v['generated']['ms_ssim']:.3f}  real {v['real']['ms_ssim']:.3f}")
    mem = metrics.get("memorisation")
    if mem:
        lines.append(f"  nearest training image  generated median {mem['generated_median']:.4f}  held-out real "
                     f"median {mem['heldout_median']:.4f}  ({100 * mem['fraction_closer_than_heldout_p05']:.1f} % "
                     "closer than the held-out 5th percentile)")
    return lines
