"""Manifests and npz archives on real data, presets, caching, batching."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medfm.data import ManifestDataset, NpzDataset, ct_3d, load, mr_3d, npz_splits, radiograph_2d, samples

from .conftest import shared_path


def test_medpix_manifest_through_generic_reader():
    manifest = shared_path("medpix2", "manifest.csv")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    dev = ManifestDataset(manifest, split="dev", label_keys="location_category", text_key="caption", spatial_dims=2)
    assert len(dev) == sum(r["split"] == "dev" for r in rows) == 197
    train = ManifestDataset(manifest, split="train", label_keys="location_category", text_key="caption")
    assert len(train) == 1653
    assert train.classes == dev.classes and "Thorax" in dev.classes  # inferred over all splits: same indices
    s = dev[0]
    first = next(r for r in rows if r["split"] == "dev")
    assert s["image"].shape[0] == 1 and s["meta"]["spatial_dims"] == 2  # grayscale PNG
    assert s["text"] == first["caption"] and dev.classes[s["label"]] == first["location_category"]
    assert s["meta"]["path"].endswith(first["image"])  # relative path resolved against the manifest folder
    assert s["meta"]["type"] == first["type"] and s["meta"]["plane"] == first["plane"]  # other columns kept


def test_medpix_batches_with_preset():
    manifest = shared_path("medpix2", "manifest.csv")
    ds = ManifestDataset(manifest, split="dev", label_keys="type", text_key="caption", transform=radiograph_2d(64, train=True))
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 1, 64, 64) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].shape == (4,) and len(batch["text"]) == 4
    from medfm.data import collate

    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert batch["image"].shape == (3, 1, 64, 64) and [m["row"] for m in batch["meta"]] == [r.line for r in ds.records[:3]]


def test_pneumoniamnist_splits():
    path = shared_path("pneumoniamnist", "pneumoniamnist_trainval.npz")
    assert npz_splits(path) == ["train", "val"]
    train, val = NpzDataset(path, "train"), NpzDataset(path, "val")
    assert (len(train), len(val)) == (3882, 524)
    assert np.bincount(val.targets).tolist() == [135, 389]  # the official val split
    s = val[0]
    assert s["image"].shape == (1, 28, 28) and s["label"] in (0, 1) and s["meta"]["spatial_dims"] == 2
    with pytest.raises(ValueError, match=r"pneumoniamnist_trainval\.npz: no 'test' split .*splits in this file: train, val"):
        NpzDataset(path, "test")


def test_npz_3d_and_multilabel(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "vol.npz", train_images=rng.integers(0, 255, (3, 28, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [2], [1]]))
    np.savez(tmp_path / "chest.npz", val_images=rng.integers(0, 255, (2, 28, 28), dtype=np.uint8),
             val_labels=np.array([[0, 1, 1], [1, 0, 0]]))
    vol = NpzDataset(tmp_path / "vol.npz")
    assert vol.spatial_dims == 3 and vol[1]["image"].shape == (1, 28, 28, 28) and vol[1]["label"] == 2
    chest = NpzDataset(tmp_path / "chest.npz", "val")
    torch.testing.assert_close(chest[0]["label"], torch.tensor([0.0, 1.0, 1.0]))


def test_jsonl_manifest_with_dicom_folder_mask_and_multilabel(tmp_path, ct_small):
    series = tmp_path / "series"
    series.mkdir()
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(samples.nibabel_file(name), series / name)
    shutil.copy(samples.mni152("t1"), tmp_path / "t1.nii.gz")
    shutil.copy(samples.mni152("gm"), tmp_path / "gm.nii.gz")
    rows = [
        {"image": "series", "effusion": 1, "opacity": 0, "report": "small left effusion", "split": "train"},
        {"image": "t1.nii.gz", "mask": "gm.nii.gz", "effusion": 0, "opacity": 1, "report": "opacity", "split": "train"},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ManifestDataset(tmp_path / "m.jsonl", split="train", label_keys=["effusion", "opacity"], text_key="report",
                         spatial_dims=3)
    assert ds.classes == ["effusion", "opacity"]
    a = ds[0]
    assert a["image"].shape == (1, 256, 256, 2) and a["text"] == "small left effusion"
    torch.testing.assert_close(a["label"], torch.tensor([1.0, 0.0]))
    ds_mask = ManifestDataset(tmp_path / "m.jsonl", label_keys=["effusion", "opacity"], mask_key="mask",
                              transform=mr_3d(size=32, spacing=4.0))
    assert "mask" not in ds_mask[0]  # an empty mask cell: no mask for that row
    b = ds_mask[1]
    assert b["image"].shape == b["mask"].shape == (1, 32, 32, 32)


def test_pipe_separated_multilabel_column(tmp_path, ct_small):
    shutil.copy(ct_small, tmp_path / "ct.dcm")
    (tmp_path / "m.csv").write_text("image,findings\nct.dcm,effusion|opacity\nct.dcm,\nct.dcm,opacity\n")
    ds = ManifestDataset(tmp_path / "m.csv", label_keys="findings", multi_label=True)
    assert ds.classes == ["effusion", "opacity"]
    assert [ds[i]["label"].tolist() for i in range(3)] == [[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]


def test_mr_preset_on_mni152(mni_t1):
    s = mr_3d(size=64, spacing=3.0)(load(mni_t1))
    assert s["image"].shape == (1, 64, 64, 64)
    assert float(s["image"].min()) >= 0.0 and float(s["image"].max()) <= 1.0
    assert s["image"].pixdim.tolist() == pytest.approx([3.0, 3.0, 3.0])


def test_ct_preset_reorients_to_ras(tmp_path):
    """A DICOM series is LPS on disk; the CT preset puts it in RAS, scales the HU window to [0, 1]."""
    folder = tmp_path / "s"
    folder.mkdir()
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(samples.nibabel_file(name), folder / name)
    s = ct_3d(size=(32, 32, 8), spacing=(8.0, 8.0, 3.0), window=(0, 500))(load(folder))
    from medfm.data.volume import describe_affine

    assert describe_affine(s["image"].affine.numpy(), 3)[1] == "RAS"
    assert s["image"].shape == (1, 32, 32, 8)
    assert float(s["image"].max()) <= 1.0


def test_train_crops_are_random_and_cache_keeps_the_deterministic_part(mni_t1, tmp_path, monkeypatch):
    shutil.copy(mni_t1, tmp_path / "t1.nii.gz")
    (tmp_path / "m.csv").write_text("image\nt1.nii.gz\n")
    calls = []
    import medfm.data.datasets as datasets

    real_load = datasets.load
    monkeypatch.setattr(datasets, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    ds = ManifestDataset(tmp_path / "m.csv", transform=mr_3d(size=24, spacing=4.0, train=True), cache=True)
    a, b = ds[0], ds[0]
    assert len(calls) == 1  # read and resampled once; only the random crop runs again
    assert a["image"].shape == b["image"].shape == (1, 24, 24, 24)
    assert not torch.equal(a["image"], b["image"])
    assert a["meta"]["spacing"] == pytest.approx((4.0, 4.0, 4.0)) and a["meta"]["orientation"] == "RAS"


def test_disk_cache_persists_the_deterministic_part_across_datasets_and_notices_changed_files(mni_t1, tmp_path,
                                                                                             monkeypatch):
    """``data.cache: disk``: a second dataset (another worker, another run) reads the resampled volume back
    instead of the NIfTI; the same sample as computed; a changed file or preset is a miss; a damaged cache
    file is recomputed; nothing but tensors, numbers and strings is stored (weights_only load)."""
    import os

    import medfm.data.datasets as datasets
    from medfm.data.cache import dataset_cache

    shutil.copy(mni_t1, tmp_path / "t1.nii.gz")
    (tmp_path / "m.csv").write_text("image\nt1.nii.gz\n")
    calls = []
    real_load = datasets.load
    monkeypatch.setattr(datasets, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))

    def open_(preset_args: dict):
        cache = dataset_cache("disk", tmp_path / "cache", {"preset": "mr_3d", **preset_args})
        return ManifestDataset(tmp_path / "m.csv", transform=mr_3d(size=24, **preset_args), cache=cache)

    fresh = ManifestDataset(tmp_path / "m.csv", transform=mr_3d(size=24, spacing=4.0))[0]
    first = open_({"spacing": 4.0})
    a = first[0]
    assert len(calls) == 2 and first.disk.misses == 1
    second = open_({"spacing": 4.0})
    b = second[0]
    assert len(calls) == 2 and second.disk.hits == 1  # read back, not re-read
    for s in (a, b):
        torch.testing.assert_close(s["image"], fresh["image"])
        assert s["meta"]["spacing"] == pytest.approx((4.0, 4.0, 4.0)) and s["meta"]["orientation"] == "RAS"
    assert open_({"spacing": 5.0})[0]["image"].shape == (1, 24, 24, 24) and len(calls) == 3  # another preset
    st = os.stat(tmp_path / "t1.nii.gz")
    os.utime(tmp_path / "t1.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    open_({"spacing": 4.0})[0]
    assert len(calls) == 4  # the file changed: computed again
    for f in (tmp_path / "cache").rglob("*.pt"):
        f.write_bytes(b"not a checkpoint")
    torch.testing.assert_close(open_({"spacing": 4.0})[0]["image"], fresh["image"])
    with pytest.raises(ValueError, match="data.cache"):
        dataset_cache("yes")
