"""Pretraining mixtures (issue 40): sources drawn at their weights, recorded, de-duplicated against evaluation
splits, resumed after a kill to the same weights. Data: real MNI152 axial slices (nilearn's file) as npz sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medfm.cli import main
from medfm.data import DataError, load, samples
from medfm.pretrain import run_pretrain
from medfm.pretrain.data import build_data
from medfm.pretrain.registry import METHODS

from .conftest import KillAt
from .pretrain_helpers import tiny_recipe


def _uint8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(Image.fromarray((255 * a / max(a.max(), 1e-6)).astype(np.uint8)).resize((32, 32), Image.BILINEAR))
    return a


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, str]:
    """Two sources (axial and coronal slices of the MNI152 brain) and an evaluation set (sagittal slices of it: no
    copy of any source image), 32 px npz files. (Slices of one orientation are look-alikes at 32 px: a central
    crop of one matches another, and the mixture drops them as copies.)"""
    tmp = tmp_path_factory.mktemp("mixture")
    vol = load(samples.mni152("t1"))["image"][0].numpy()
    axial = np.stack([_uint8(vol[:, :, z]) for z in range(50, 140, 6)])
    coronal = np.stack([_uint8(vol[:, y]) for y in range(60, 150, 6)])
    sagittal = np.stack([_uint8(vol[x]) for x in range(40, 160, 8)])
    out = {}
    for name, images in (("lower", axial), ("upper", coronal), ("eval", sagittal)):
        labels = (np.arange(len(images)) % 2)[:, None]
        np.savez(tmp / f"{name}.npz", train_images=images, train_labels=labels, val_images=images, val_labels=labels)
        out[name] = str(tmp / f"{name}.npz")
    return out


def _recipe(sources, **data):
    return tiny_recipe("mae_vit_2d", data={"sources": sources, **data}, trainer={"max_steps": 8})


def test_a_mixture_draws_each_source_at_its_weight_and_records_itself(sets, tmp_path, capsys):
    cfg = _recipe([{"path": sets["lower"], "weight": 1.0}, {"path": sets["upper"], "weight": 3.0, "name": "top"}])
    data = build_data(cfg, METHODS.get_plugin("mae"))
    mix = data.keyed.dataset
    picks = np.array([mix.pick(p)[0] for p in range(4000)])
    assert abs((picks == 1).mean() - 0.75) < 0.03, (picks == 1).mean()
    # every image of a source is drawn (with replacement): 15 images, 1,000 draws
    assert len({mix.pick(p)[1] for p in range(4000) if mix.pick(p)[0] == 0}) == 15
    # positions address samples: the same position is the same image, whatever asked before
    assert torch.equal(mix[17]["image"], mix[17]["image"]) and set(mix[17]) == {"image"}
    rec = data.mixture
    assert [s["name"] for s in rec["sources"]] == ["lower", "top"]
    assert [s["share"] for s in rec["sources"]] == [0.25, 0.75] and rec["sources"][1]["images"] == 15
    assert "mixture: lower 15 images (weight 0.25), top 15 images (weight 0.75)" in capsys.readouterr().out
    run = run_pretrain(cfg, tmp_path / "run")
    recorded = json.loads((run / "mixture.json").read_text())
    assert recorded["sources"] == rec["sources"] and (run / "encoder" / "config.json").exists()


def test_a_planted_evaluation_image_is_dropped_and_said(sets, tmp_path, capsys):
    """A suite's evaluation image hidden in a source (and one source's image in a later one) never trains."""
    with np.load(sets["lower"]) as d, np.load(sets["eval"]) as e:
        images = np.concatenate([d["train_images"], e["val_images"][4:5], d["train_images"][2:3]])
    planted = tmp_path / "planted.npz"
    np.savez(planted, train_images=images, train_labels=np.zeros((len(images), 1), int))
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: t\ntasks:\n  - {{name: brain, data: {sets['eval']}, val: val}}\n")
    cfg = _recipe([{"path": sets["upper"], "name": "upper"}, {"path": str(planted), "name": "planted"}],
                  exclude_suite=str(suite))
    data = build_data(cfg, METHODS.get_plugin("mae"))
    dropped = data.mixture["dropped"]
    said = capsys.readouterr().out
    assert [(d["source"], d["copy_of_source"]) for d in dropped] == [("planted", "brain:val"), ("planted", "planted")]
    assert dropped[0]["item"].endswith("sample 15") and dropped[0]["copy_of"].endswith("[val] sample 4")
    assert "dropped 1 image(s) of planted, a copy of an evaluation image in brain:val" in said
    assert [s["kept"] for s in data.mixture["sources"]] == [15, 15]
    assert data.mixture["excluded"] == [{"name": "brain:val", "images": 15}]


def test_a_killed_mixture_run_resumes_to_the_same_weights(sets, tmp_path):
    cfg = _recipe([{"path": sets["lower"], "weight": 2.0}, {"path": sets["upper"]}])
    cfg["trainer"]["checkpoint_every_n_steps"] = 4
    whole = run_pretrain(cfg, tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_pretrain(cfg, tmp_path / "split", callbacks=[KillAt(4)])
    split = run_pretrain(cfg, tmp_path / "split", resume=True)
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_bad_mixtures_are_one_line(sets, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"data.sources\[1\] \(.*upper.npz\): weight must be a number > 0"):
        build_data(_recipe([sets["lower"], {"path": sets["upper"], "weight": 0}]), METHODS.get_plugin("mae"))
    with pytest.raises(DataError, match="data source 'nowhere.npz': no such file or folder"):
        build_data(_recipe([{"path": "nowhere.npz"}]), METHODS.get_plugin("mae"))
    with pytest.raises(ValueError, match="replaces data.path"):
        build_data(_recipe([sets["lower"]], path=sets["upper"]), METHODS.get_plugin("mae"))
    assert main(["pretrain", "mae_vit_2d", "--profile", "tiny", "--out", str(tmp_path / "r"),
                 f"data.sources=[{{path: {sets['lower']}, wieght: 2}}]"]) == 2
    assert "data.sources[0]" in capsys.readouterr().err


def test_a_centre_cropped_small_copy_of_a_full_frame_is_found(tmp_path):
    """MedMNIST's copy of a film (a centre square crop, 28 px) against the same film resized whole (squashed to a
    square): PneumoniaMNIST and the 224 px pediatric chest X-rays. A look-alike (the slice 30 mm above) is kept."""
    from medfm.data import open_dataset
    from medfm.pretrain.mixture import deduplicate

    vol = load(samples.mni152("t1"))["image"][0].numpy()

    def u8(a):
        return (255 * a / a.max()).astype(np.uint8)

    film, other = u8(vol[:, :, 100].T), u8(vol[:, :, 130].T)
    film, other = np.concatenate([film, film[:, :40]], 1), np.concatenate([other, other[:, :40]], 1)  # wide frames
    h, w = film.shape
    square = film[:, (w - h) // 2:(w - h) // 2 + h]
    small = np.asarray(Image.fromarray(square).resize((28, 28), Image.BILINEAR))
    frames = np.stack([np.asarray(Image.fromarray(a).resize((64, 64), Image.BILINEAR)) for a in (film, other)])
    np.savez(tmp_path / "frames.npz", train_images=frames, train_labels=np.zeros((2, 1), int))
    np.savez(tmp_path / "eval.npz", val_images=small[None], val_labels=np.zeros((1, 1), int))
    frames_ds = open_dataset(tmp_path / "frames.npz", split="train")
    keep, dropped = deduplicate([frames_ds], ["frames"], [("eval:val", open_dataset(tmp_path / "eval.npz", split="val"))],
                                progress=False)
    assert keep == [[1]], dropped
    assert dropped[0]["copy_of_source"] == "eval:val" and dropped[0]["item"].endswith("sample 0")
