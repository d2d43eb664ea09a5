"""Real-data loading for 3D pretraining: does the loader keep up with the training step, cold and cached?

For 3D NIfTI sets read through the 3D MAE recipe's own data path (``build_data``: the ``mr_3d`` preset, i.e.
RAS + resampling to ``data.preset_args.spacing`` + intensity scaling, then the MAE view: a random-resized crop
to ``encoder.img_size``), volumes/s through a DataLoader with ``--workers`` workers, over ``--volumes``
volumes, for each ``data.cache``:

* ``false``: every volume read and preprocessed every time (cold);
* ``true`` (in memory, per worker process): the second pass over the same loader; a fresh loader, run or
  worker starts cold again;
* ``disk`` first pass: the persistent cache being written (cold + the write);
* ``disk`` warm: a new dataset and loader (another run, other workers) reading the cache back.

Against: samples/s that the MAE recipe's training step consumes at that size on this machine (the GPU if
there is one). Sets: the MSD hippocampus train split (``../shared/data``, small cropped volumes) and copies of
the MNI152 brain at 1 mm (182 x 218 x 182, a typical full-head volume).

    python benchmarks/loader_speed.py
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from medfm.data import samples
from medfm.pretrain import METHODS, load_recipe
from medfm.pretrain.data import build_data

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_speed import consumption_rate  # noqa: E402  (the same MAE-step timing)


def mni_set(folder: Path, n: int) -> Path:
    """A folder of ``n`` copies of the MNI152 T1 brain (distinct files, so each is read and cached on its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(samples.mni152("t1"))
    for i in range(n):
        shutil.copy(src, folder / f"mni_{i:03d}.nii.gz")
    return folder


def rate(path: str, cache, cache_dir: Path, size: int, spacing: float, workers: int, n: int, passes: int = 1) -> float:
    """Volumes/s of the last of ``passes`` passes over ``n`` positions of the recipe's training stream."""
    cfg = load_recipe(REPO / "encoders" / "mae_vit_3d.yaml", {
        "encoder": {"img_size": size}, "data": {"path": path, "split": None, "cache": cache,
                                                "cache_dir": str(cache_dir), "preset": "mr_3d",
                                                "preset_args": {"spacing": spacing}, "preflight": False}})
    data = build_data(cfg, METHODS.get_plugin("mae"))
    keys = data.sampler(batch_size=1)
    loader = DataLoader(data.keyed, batch_size=None, sampler=[k for k, _ in zip(keys, range(n))],
                        num_workers=workers, persistent_workers=workers > 0 and passes > 1)
    for p in range(passes):
        t = time.perf_counter()
        for _ in loader:
            pass
        elapsed = time.perf_counter() - t
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=96, help="encoder.img_size (the view side)")
    ap.add_argument("--batch", type=int, default=2, help="batch of the MAE step timed for consumption")
    ap.add_argument("--mni-copies", type=int, default=8)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    need = consumption_rate(3, args.size, args.batch, 2)
    print(f"device for the MAE step: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; "
          f"{args.workers} loader workers; view {args.size}^3; MAE ViT-S step consumes {need:.2f} volumes/s\n")
    print("| set | volumes | spacing (mm) | cache false | cache true (2nd pass) | disk, 1st pass | disk, warm "
          "| warm / cold | warm / MAE step |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = []
        hippo = SHARED / "msd_hippocampus" / "manifest.csv"
        if hippo.exists():
            sets.append(("MSD hippocampus (train+val)", str(hippo), 200, 1.0))
        sets.append((f"MNI152 1 mm x {args.mni_copies}", str(mni_set(tmp / "mni", args.mni_copies)), args.mni_copies, 1.5))
        for name, path, n, spacing in sets:
            cache_dir = tmp / f"cache_{len(name)}"
            cold = rate(path, False, cache_dir, args.size, spacing, args.workers, n)
            memory = rate(path, True, cache_dir, args.size, spacing, args.workers, n, passes=2)
            first = rate(path, "disk", cache_dir, args.size, spacing, args.workers, n)
            warm = rate(path, "disk", cache_dir, args.size, spacing, args.workers, n)
            print(f"| {name} | {n} | {spacing} | {cold:.1f} | {memory:.1f} | {first:.1f} | {warm:.1f} "
                  f"| {warm / cold:.2f} | {warm / need:.2f} |", flush=True)


if __name__ == "__main__":
    main()
