"""``medfm suite ENCODER [ENCODER ...]``: score encoders on a downstream suite with frozen features, in one command.

Foundation encoders are judged on many tasks with frozen features (DINOv2's linear and k-NN evaluations, the
MedMNIST tables, clip_benchmark's zero-shot). For every task of a suite file (:mod:`medfm.evaluate.suite_spec`;
``default``: PneumoniaMNIST, BreastMNIST, BUS-BRA, MedPix modality / body region / plane, LGG FLAIR) and every
encoder (a run, an ``encoder/`` folder, a converted public model, ``medfm:tiny-2d``, ``random`` or
``random:NAME`` for a randomly initialised one):

* classification: a logistic-regression probe (L-BFGS, :func:`medfm.evaluate.probe.logistic_probe`) and a
  weighted k-NN (DINO's: the 20 nearest training embeddings by cosine, votes ``exp(cos / 0.07)``, on embeddings
  centred on the training mean) with 1, 10 and
  all labelled examples per class (the few-shot draws differ per seed and are the same for every encoder), scored
  by AUROC (macro one-vs-rest) and accuracy on the task's evaluation split;
* zero-shot where the encoder is a CLIP run and the task names prompts;
* segmentation: a linear probe on the frozen last feature map (a 1x1 classifier trained with Adam, logits
  upsampled to the image), foreground Dice.

Embeddings come from the embedding cache (:mod:`medfm.select.embeddings`): a second suite over the same encoder
and data computes nothing again. Writes ``OUT/suite.csv`` (one row per encoder, task, method, shots, seed),
``OUT/suite.md`` (mean ± std over seeds), ``OUT/suite.png`` and, for two or more encoders, ``OUT/compare.md``:
each encoder against the first with the difference's 95 % confidence interval (a paired bootstrap over the
evaluation items, the same resamples for both encoders, metric averaged over seeds).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics.functional.classification as tmc

from medfm.atomic import write_text
from medfm.data import DataError, open_dataset
from medfm.data.preprocess import Preprocess
from medfm.data.transforms import with_channels
from medfm.encoders import create_encoder
from medfm.evaluate.probe import embed_dataset, logistic_probe
from medfm.evaluate.suite_spec import Suite, SuiteTask, read_suite, task_data
from medfm.figures import pyplot, save_figure
from medfm.progress import progress_bar
from medfm.select.embeddings import CACHE_DIR, Embedder, embed, load_embedder
from medfm.tuning import few_shot_indices

KNN_K, KNN_T = 20, 0.07  # DINO's k-NN evaluation (Caron et al. 2021): 20 neighbours, temperature 0.07
BOOTSTRAP = 300


def open_encoder(given: str, size: int | None = None, seed: int = 0) -> Embedder:
    """An encoder of the suite: ``random`` / ``random:NAME`` (randomly initialised, ``size`` px, default 64),
    anything else as :func:`medfm.select.embeddings.load_embedder` reads it (a run, an encoder folder, a public
    model, ``medfm:NAME``)."""
    if given == "random" or given.startswith("random:"):
        name = given.partition(":")[2] or "vit_tiny"
        kw = {"patch_size": 8} if name.startswith("vit") else {}
        torch.manual_seed(seed)
        size = size or 64
        model = create_encoder(name, spatial_dims=2, in_chans=1, img_size=size, **kw).eval()
        pre = Preprocess("radiograph_2d", size, {})
        return Embedder(model, with_channels(pre.transform(), 1), pre, f"random:{name}")
    return load_embedder(pretrained=given, size=size)


def auroc(scores: torch.Tensor, y: torch.Tensor) -> float:
    k = scores.shape[1]
    if k == 2:
        return float(tmc.binary_auroc(scores[:, 1], y))
    return float(tmc.multiclass_auroc(scores, y, num_classes=k, average="macro"))


def accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(1) == y).float().mean())


def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, num_classes: int,
               k: int = KNN_K, t: float = KNN_T) -> torch.Tensor:
    """Class scores (N, K) of a weighted k-NN on l2-normalised embeddings (DINO's evaluation), rows summing to 1.
    The embeddings are centred on the training mean first: a randomly initialised ViT's embeddings share one large
    direction (cosines of 0.99 between any two images), and uncentred its k-NN ranks worse than chance."""
    mean = train_x.float().mean(0)
    a, b = F.normalize(train_x.float() - mean, dim=1), F.normalize(val_x.float() - mean, dim=1)
    sim, idx = (b @ a.T).topk(min(k, len(a)), dim=1)
    votes = torch.zeros(len(b), num_classes).scatter_add_(1, train_y[idx], (sim / t).exp())
    return votes / votes.sum(1, keepdim=True)


@dataclass
class Scored:
    """One cell of the table: its row, and the evaluation scores the comparison resamples."""

    row: dict
    scores: torch.Tensor | None = None  # (N, K) class scores; segmentation: (N, 2) per image, 2 x overlap and sizes
    target: torch.Tensor | None = None


def shot_draws(y: np.ndarray, shots: list, seeds: list[int]) -> list[tuple[str, int, list[int]]]:
    """(shots, seed, training indices): K per class drawn per seed; ``all`` once (the probe is deterministic)."""
    out = []
    for s in shots:
        if s == "all":
            out.append(("all", seeds[0], list(range(len(y)))))
        else:
            out += [(str(s), seed, few_shot_indices(y, int(s), seed)) for seed in seeds]
    return out


def common_classes(task: SuiteTask, xt, yt, xv, yv):
    """The items of the classes with at least ``task.min_train`` training and one evaluation example, labels
    renumbered 0..K-1 (MedPix's plane has classes of one or two images); says which classes were left out."""
    least = task.min_train
    nt, nv = (torch.bincount(y, minlength=int(max(yt.max(), yv.max())) + 1) for y in (yt, yv))
    keep = ((nt >= least) & (nv >= 1)).nonzero().flatten()
    if len(keep) < 2:
        raise DataError(f"task {task.name}: fewer than two classes with {least} training and one evaluation "
                        "example")
    if len(keep) < len(nt):
        left = len(nt) - len(keep)
        print(f"suite: {task.name}: {left} class(es) with fewer than {least} training examples or none to "
              f"evaluate on left out ({int(nt[keep].sum())} of {len(yt)} training, {int(nv[keep].sum())} of "
              f"{len(yv)} evaluation items kept)")
    new = torch.full((len(nt),), -1, dtype=torch.long)
    new[keep] = torch.arange(len(keep))
    mt, mv = new[yt] >= 0, new[yv] >= 0
    return xt[mt], new[yt[mt]], xv[mv], new[yv[mv]], len(keep)


def classification(task: SuiteTask, enc: Embedder, data: str, shots: list, seeds: list[int], cache) -> list[Scored]:
    # a row without a label (MedPix has one) is left out with a warning naming it, not the whole task
    _, xt, yt = embed(enc, data, split=task.train, label=task.label, cache=cache, on_error="skip")
    _, xv, yv = embed(enc, data, split=task.val, label=task.label, cache=cache, on_error="skip")
    if yt is None or yv is None:
        raise DataError(f"{data}: task {task.name} needs class labels (give `label:` a manifest column)")
    xt, xv, yt, yv = (torch.as_tensor(a) for a in (xt, xv, yt, yv))
    xt, yt, xv, yv, k = common_classes(task, xt, yt, xv, yv)
    out = []
    for shot, seed, idx in shot_draws(yt.numpy(), shots, seeds):
        i = torch.as_tensor(idx)
        base = {"task": task.name, "kind": "classify", "shots": shot, "seed": seed, "n_train": len(idx)}
        probe = logistic_probe(xt[i], yt[i], xv, yv, num_classes=k)["val_scores"]
        near = knn_scores(xt[i], yt[i], xv, k)
        for method, scores in (("linear", probe), ("knn", near)):
            out.append(Scored({**base, "method": method, "auroc": auroc(scores, yv), "accuracy": accuracy(scores, yv)},
                              scores, yv))
    return out


def zero_shot(task: SuiteTask, given: str, data: str) -> list[Scored]:
    """Zero-shot scores of a CLIP run's two towers on the task's evaluation split, each class named by the task's
    prompt in medfm's prompt templates (:func:`medfm.evaluate.zeroshot.class_embeddings`); none for an encoder
    without a text tower."""
    from medfm.encoders import preprocess_transform
    from medfm.evaluate.zeroshot import class_embeddings, load_clip_run, zero_shot_scores

    try:
        model = load_clip_run(encoder_run(given))
    except (FileNotFoundError, ValueError, OSError):
        return []
    ds = open_dataset(data, split=task.val, label=task.label, on_error="skip",
                      transform=preprocess_transform(model.image_encoder.preprocess))
    classes = [str(c) for c in getattr(ds, "classes", None) or []]
    missing = [c for c in classes if c not in task.zero_shot]
    if missing:
        raise ValueError(f"task {task.name}: zero_shot names no prompt for class(es) {missing}")
    img, y = embed_dataset(model, ds, forward=model.encode_image)
    scores = zero_shot_scores(img, class_embeddings(model, [task.zero_shot[c] for c in classes]))
    return [Scored({"task": task.name, "kind": "classify", "method": "zero_shot", "shots": "0", "seed": 0,
                    "n_train": 0, "auroc": auroc(scores, y), "accuracy": accuracy(scores, y)}, scores, y)]


def encoder_run(given: str) -> str:
    """The run folder an ``encoder/`` folder belongs to (a CLIP run is given either way)."""
    p = Path(given)
    return str(p.parent) if p.name == "encoder" else given


def _spread(n: int, cap: int | None) -> list[int]:
    return list(range(n)) if not cap or n <= cap else np.linspace(0, n - 1, cap).astype(int).tolist()


@torch.no_grad()
def feature_maps(enc: Embedder, data: str, split: str, cap: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen last feature map (N, D, h, w) and the masks (N, H, W) of a segmentation split."""
    ds = open_dataset(data, split=split, transform=enc.transform, mask_key="mask")
    if len(ds) == 0:
        raise DataError(f"{data}: split {split!r} is empty")
    feats, masks = [], []
    idx = _spread(len(ds), cap)
    for start in progress_bar(range(0, len(idx), 64), desc=f"feature maps {split}", unit="batch"):
        items = [ds[j] for j in idx[start:start + 64]]
        if "mask" not in items[0]:
            raise DataError(f"{ds.describe(idx[start])}: a segmentation task needs a `mask` column")
        x = torch.stack([torch.as_tensor(s["image"]) for s in items])
        feats.append(enc.model.forward_intermediates(x, indices=1, norm=True)[-1].float())
        masks.append(torch.stack([torch.as_tensor(s["mask"])[0] for s in items]).long())
    return torch.cat(feats), torch.cat(masks)


def segmentation(task: SuiteTask, enc: Embedder, data: str, seeds: list[int], steps: int = 300) -> list[Scored]:
    """A 1x1 classifier on the frozen last feature map, logits upsampled to the masks: foreground Dice per image
    (images without foreground score 1 when nothing is predicted, else 0) and over all pixels."""
    ft, mt = feature_maps(enc, data, task.train, task.max_train)
    fv, mv = feature_maps(enc, data, task.val, task.max_val)
    k = int(max(mt.max(), mv.max())) + 1
    mean, std = ft.mean((0, 2, 3), keepdim=True), ft.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    ft, fv = (ft - mean) / std, (fv - mean) / std
    # class weights 1 / sqrt(frequency): a FLAIR lesion is ~1 % of the pixels, and unweighted a linear head
    # predicts background everywhere
    freq = torch.bincount(mt.flatten(), minlength=k).float().clamp_min(1)
    weight = (freq.sum() / freq).sqrt()
    weight = weight / weight.mean()
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        head = torch.nn.Conv2d(ft.shape[1], k, 1)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for _ in range(steps):
                b = torch.randint(len(ft), (min(64, len(ft)),), generator=g)
                logits = F.interpolate(head(ft[b]), size=mt.shape[-2:], mode="bilinear", align_corners=False)
                loss = F.cross_entropy(logits, mt[b], weight=weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
        pred = torch.cat([F.interpolate(head(fv[i:i + 64]), size=mv.shape[-2:], mode="bilinear",
                                        align_corners=False).argmax(1) for i in range(0, len(fv), 64)])
        p, t = (pred > 0).flatten(1).float(), (mv > 0).flatten(1).float()
        inter, size = (p * t).sum(1), p.sum(1) + t.sum(1)
        per_image = torch.where(size > 0, 2 * inter / size.clamp_min(1), torch.ones_like(size))
        pooled = float(2 * inter.sum() / size.sum().clamp_min(1))
        out.append(Scored({"task": task.name, "kind": "segment", "method": "linear", "shots": "all", "seed": seed,
                           "n_train": len(ft), "dice": pooled, "dice_per_image": float(per_image.mean())},
                          torch.stack([2 * inter, size], 1), None))
    return out


def run_suite(encoders: list[str], out: str | Path, suite: str = "default", data_root: str | None = None,
              seeds: list[int] = (0, 1, 2), size: int | None = None, tasks: list[str] | None = None,
              cache: str | Path | None = CACHE_DIR) -> list[dict]:
    """Score every encoder on every task of ``suite`` whose data is here; write the tables, the figure and (two or
    more encoders) the comparison to ``out``. Returns the rows."""
    spec: Suite = read_suite(suite)
    chosen = spec.tasks
    if tasks:
        unknown = sorted(set(tasks) - {t.name for t in spec.tasks})
        if unknown:
            raise ValueError(f"suite {spec.name}: no task {unknown} (it has {', '.join(t.name for t in spec.tasks)})")
        chosen = [t for t in spec.tasks if t.name in tasks]
    embedders = {given: open_encoder(given, size) for given in encoders}  # a bad encoder fails before any work
    where = {}
    for t in chosen:
        path = task_data(t, data_root)
        if path is None:
            print(f"suite: skipping {t.name}: {t.data} is not under the data root ({data_root or '$MEDFM_SUITE_DATA'})"
                  + (f" and `medfm data prepare {t.fetch}` has not been run" if t.fetch else ""))
        else:
            where[t.name] = path
    if not where:
        raise DataError(f"suite {spec.name}: no task's data found; give --data-root (the folder holding "
                        f"{chosen[0].data}) or prepare the sets with `medfm data prepare`")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells: dict[str, list[Scored]] = {}
    for given, enc in embedders.items():
        scored = []
        for t in chosen:
            if t.name not in where:
                continue
            print(f"suite: {given} on {t.name}")
            if t.kind == "segment":
                scored += segmentation(t, enc, where[t.name], list(seeds))
            else:
                scored += classification(t, enc, where[t.name], spec.shots, list(seeds), cache)
                if t.zero_shot:
                    scored += zero_shot(t, given, where[t.name])
        for s in scored:
            s.row = {"encoder": given, **s.row}
        cells[given] = scored
    rows = [s.row for v in cells.values() for s in v]
    write_csv(out / "suite.csv", rows)
    headline = ("Linear probe, AUROC at 10 labels per class (segmentation: Dice of the linear probe on the last "
                "feature map), mean over seeds:")
    write_text(out / "suite.md", f"# Suite {spec.name}\n\n{headline}\n\n" + "\n".join(headline_table(rows))
               + "\n\nEvery method and number of labels, mean ± std over seeds:\n\n"
               + "\n".join(summary_table(rows)) + "\n")
    plot(rows, out / "suite.png")
    if len(encoders) > 1:
        write_text(out / "compare.md", "\n".join(compare(cells, encoders)) + "\n")
    print(f"suite written: {out / 'suite.md'}, {out / 'suite.csv'}, {out / 'suite.png'}"
          + (f", {out / 'compare.md'}" if len(encoders) > 1 else ""))
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    """The rows as CSV (the union of their keys; segmentation rows carry Dice, classification rows AUROC)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def metric_of(row: dict) -> str:
    return "dice" if row["kind"] == "segment" else "auroc"


def _shot_key(s: str) -> float:
    return math.inf if s == "all" else float(s)


def linear_cell(rows: list[dict], encoder: str, task: str, shots: str = "10") -> tuple[list[float], str | None]:
    """The linear probe's metric over seeds for one encoder and task at ``shots`` labels per class, or at the
    nearest shots the task has (segmentation: all), and the task's kind (None when it has no such rows)."""
    rs = [r for r in rows if r["encoder"] == encoder and r["task"] == task and r["method"] == "linear"]
    near = sorted({r["shots"] for r in rs}, key=lambda x: abs(_shot_key(x) - _shot_key(shots)))
    return [r[metric_of(r)] for r in rs if r["shots"] == near[0]] if near else [], rs[0]["kind"] if rs else None


def headline_table(rows: list[dict], shots: str = "10") -> list[str]:
    """Markdown: one row per encoder, one column per task: the linear probe's AUROC at ``shots`` labels per class
    (the nearest shots a task has; segmentation: Dice), mean over seeds, and the mean over the classification
    tasks."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    lines = ["| encoder | " + " | ".join(tasks) + " | mean (classification) |", "|---" * (len(tasks) + 2) + "|"]
    for enc in encoders:
        cells, means = [], []
        for t in tasks:
            v, kind = linear_cell(rows, enc, t, shots)
            cells.append(f"{np.mean(v):.3f}" if v else "")
            if v and kind == "classify":
                means.append(np.mean(v))
        lines.append(f"| {enc} | " + " | ".join(cells) + (f" | {np.mean(means):.3f} |" if means else " | |"))
    return lines


def summary_table(rows: list[dict]) -> list[str]:
    """Markdown: one row per (encoder, task, method), one column per shots; AUROC (Dice for segmentation),
    mean ± std over seeds."""
    shots = sorted({r["shots"] for r in rows}, key=_shot_key)
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        groups.setdefault((r["encoder"], r["task"], r["method"], metric_of(r)), {}).setdefault(r["shots"], []).append(
            r[metric_of(r)])
    heads = [f"{s} per class" if s not in ("all", "0") else ("all" if s == "all" else "zero-shot") for s in shots]
    lines = ["| encoder | task | method | metric | " + " | ".join(heads) + " |",
             "|" + "---|" * (4 + len(shots))]
    for (enc, task, method, metric), by in groups.items():
        cells = []
        for s in shots:
            v = by.get(s)
            cells.append("" if not v else f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        lines.append(f"| {enc} | {task} | {method} | {metric} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Bars: each task's linear-probe metric at 10 per class (or the nearest shots), one bar per encoder."""
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 3.6))
    width = 0.8 / len(encoders)
    for e, enc in enumerate(encoders):
        means, errs = [], []
        for t in tasks:
            v, _ = linear_cell(rows, enc, t)
            means.append(np.mean(v) if v else np.nan)
            errs.append(np.std(v) if v else 0)
        ax.bar(np.arange(len(tasks)) + e * width - 0.4 + width / 2, means, width, yerr=errs, label=enc, capsize=2)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylabel("AUROC (segmentation: Dice)")
    ax.set_title("linear probe, 10 labels per class (segmentation: all)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _metric(scored: Scored, idx: torch.Tensor) -> float:
    if scored.target is None:  # segmentation: pooled Dice of the resampled images
        t = scored.scores[idx]
        return float(t[:, 0].sum() / t[:, 1].sum().clamp_min(1))
    return auroc(scored.scores[idx], scored.target[idx])


def compare(cells: dict[str, list[Scored]], encoders: list[str], n: int = BOOTSTRAP) -> list[str]:
    """Markdown: each encoder against the first, per (task, method, shots): both means over seeds, the
    difference and its 95 % CI from a paired bootstrap over the evaluation items."""
    ref = encoders[0]
    lines = [f"# Compared with {ref}", "", "Difference = encoder - reference, metric averaged over seeds; 95 % CI: "
             f"paired bootstrap over the evaluation items ({n} resamples, the same for both encoders).", ""]
    for other in encoders[1:]:
        lines += [f"## {other} - {ref}", "", "| task | method | shots | metric | reference | encoder | difference "
                  "(95 % CI) |", "|---|---|---|---|---|---|---|"]
        mine: dict[tuple, list[Scored]] = {}
        for s in cells[other]:
            mine.setdefault((s.row["task"], s.row["method"], s.row["shots"]), []).append(s)
        theirs: dict[tuple, list[Scored]] = {}
        for s in cells[ref]:
            theirs.setdefault((s.row["task"], s.row["method"], s.row["shots"]), []).append(s)
        for key, a in mine.items():
            b = theirs.get(key)
            if not b:
                continue
            m = len(a[0].scores)
            full = torch.arange(m)
            va, vb = (np.mean([_metric(s, full) for s in x]) for x in (a, b))
            g = torch.Generator().manual_seed(0)
            diffs = []
            for _ in range(n):
                idx = torch.randint(m, (m,), generator=g)
                if a[0].target is not None and len(torch.unique(a[0].target[idx])) < a[0].scores.shape[1]:
                    continue  # a resample without every class has no AUROC
                diffs.append(np.mean([_metric(s, idx) for s in a]) - np.mean([_metric(s, idx) for s in b]))
            lo, hi = np.percentile(diffs, [2.5, 97.5]) if diffs else (np.nan, np.nan)
            metric = metric_of(a[0].row)
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {metric} | {vb:.3f} | {va:.3f} | {va - vb:+.3f} "
                         f"({lo:+.3f}, {hi:+.3f}) |")
        lines.append("")
    return lines
