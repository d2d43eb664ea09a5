"""Segmentation planned from the data (issue 41): the fingerprint and nnU-Net's rules on volumes with known
spacings and shapes, `medfm plan`, and `--plan auto` training MONAI's DynUNet with deep supervision."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medfm.cli import main
from medfm.data.fingerprint import fingerprint
from medfm.data.transforms import ForegroundCropd
from medfm.finetune.planning import make_plan, plan_overrides

from .conftest import SHARED
from .finetune_helpers import labelled_volumes


def test_an_isotropic_mr_set_plans_its_median_spacing_a_patch_like_nnunets_and_zscore(tmp_path):
    shapes = [(36, 50, 36), (34, 52, 35), (35, 50, 34), (37, 49, 36)] * 2
    manifest = labelled_volumes(tmp_path, shapes, [(1.0, 1.0, 1.0)] * 8)
    fp = fingerprint(manifest)
    assert fp.n_cases == 6 and fp.labels == [0, 1, 2] and fp.num_classes == 3 and fp.modality == "mr"
    assert set(fp.class_cases) == {1, 2} and all(v > 0 for v in fp.class_volume.values())
    plan = make_plan(fp)
    assert plan.spacing == [1.0, 1.0, 1.0] and plan.patch == [40, 56, 40] and plan.pools == [3, 3, 3]
    assert len(plan.strides) == len(plan.kernel_size) == 4 and plan.normalization == "zscore"
    o = plan_overrides(plan)
    assert o["data"]["preset"] == "mr_3d" and o["data"]["preset_args"]["normalize"] == "zscore"
    assert o["segmentation"]["num_classes"] == 3 and o["segmentation"]["network"] == "auto"


def test_an_anisotropic_ct_set_keeps_its_thick_axis_unpooled_and_clips_to_its_foreground(tmp_path):
    z = [2.5, 3.0, 3.0, 3.0, 3.5, 5.0, 3.0, 3.0]
    manifest = labelled_volumes(tmp_path, [(96, 96, 20)] * 8, [(0.8, 0.8, s) for s in z], ct=True)
    fp = fingerprint(manifest, split=None)
    assert fp.modality == "ct" and fp.native_spacing_varies
    plan = make_plan(fp)
    assert plan.spacing[:2] == [0.8, 0.8]
    assert plan.spacing[2] == pytest.approx(np.percentile(z, 10))  # nnU-Net's anisotropic rule: the 10th percentile
    assert plan.kernel_size[0] == [3, 3, 1] and plan.strides[1] == [2, 2, 1]  # in-plane first
    assert plan.pools[0] > plan.pools[2]
    assert all(p % 2**k == 0 for p, k in zip(plan.patch, plan.pools))
    lo, hi, mean, std = plan.ct_stats
    assert lo < mean < hi and 20 < mean < 60 and plan.normalization == "ct"  # the foreground's HU, not the air's
    o = plan_overrides(plan)
    assert o["data"]["preset"] == "ct_3d" and o["data"]["preset_args"]["zscore_stats"] == [mean, std]


def test_a_mask_that_is_not_a_label_map_names_the_manifest_line(tmp_path):
    manifest = labelled_volumes(tmp_path, [(16, 16, 16)] * 2, [(1.0, 1.0, 1.0)] * 2)
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), 0.5, np.float32), np.eye(4)), tmp_path / "labels" / "c1.nii.gz")
    with pytest.raises(ValueError, match=r"manifest.csv line 3: .*c1.nii.gz holds values \[0.5\]"):
        fingerprint(manifest, split=None)


def test_foreground_oversampling_centres_its_share_of_patches_on_the_mask():
    mask = torch.zeros(1, 64, 64, 64)
    mask[0, 50:54, 50:54, 50:54] = 1  # a small structure in one corner
    data = {"image": torch.rand(1, 64, 64, 64), "mask": mask}
    hits = {}
    for share in (0.0, 0.5):
        crop = ForegroundCropd(("image", "mask"), (16, 16, 16), share).set_random_state(0)
        hits[share] = np.mean([bool(crop(dict(data))["mask"].any()) for _ in range(200)])
    assert hits[0.0] < 0.1 and hits[0.5] > 0.45, hits


@pytest.mark.slow  # a DynUNet trained at tiny scale through the command line
def test_plan_writes_a_recipe_and_plan_auto_trains_a_deeply_supervised_dynunet_that_reloads(tmp_path, capsys):
    shapes = [(30, 34, 30), (32, 32, 30), (30, 36, 32), (31, 33, 29)] * 2
    manifest = labelled_volumes(tmp_path / "set", shapes, [(1.0, 1.0, 1.0)] * 8)
    assert main(["plan", str(manifest), "--out", str(tmp_path / "plan.yaml")]) == 0
    out = capsys.readouterr().out
    assert "**patch** | 32 x 40 x 32" in out and "3 classes" in out
    written = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert written["segmentation"]["network"] == "auto" and written["encoder"]["img_size"] == [32, 40, 32]
    run = tmp_path / "run"
    assert main(["finetune", "segment_3d", "--data", str(manifest), "--plan", "auto", "--profile", "tiny", "--out",
                 str(run), "--max-steps", "12", "segmentation.feature_size=8", "optim.lr=3e-3",
                 "trainer.log_every_n_steps=1"]) == 0
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["data"]["preset_args"]["spacing"] == [1.0, 1.0, 1.0]  # the plan's, not the tiny profile's 4 mm
    assert recipe["segmentation"]["num_classes"] == 3 and recipe["encoder"]["img_size"] == [32, 40, 32]
    assert recipe["segmentation"]["network"] == "dynunet"  # auto, resolved for a random init and recorded
    with open(run / "logs" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert losses[-1] < losses[0], losses
    import medfm

    model = medfm.load(run / "model")
    assert type(model).__name__ == "PlannedUNet" and model.num_classes == 3
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 1, 32, 40, 32)).shape == (1, 3, 32, 40, 32)
    assert main(["predict", str(run), "--data", str(manifest), "--split", "val", "--out", str(tmp_path / "pred")]) == 0
    for i in (3, 7):  # the val cases: a label map each, on the input's own grid
        src, pred = nib.load(tmp_path / "set" / "images" / f"c{i}.nii.gz"), nib.load(tmp_path / "pred" / f"c{i}_seg.nii.gz")
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    assert main(["predict", str(tmp_path / "set"), "--out", str(tmp_path / "x")]) == 2  # not a run: one line
    # validation chose the largest-component filter per class and recorded it with both Dice values; predict
    # applies the choice (and mirrors on request)
    post = json.loads((run / "metrics.json").read_text())["val"]["postprocessing"]
    assert post["chosen_on"] == "val" and set(post["dice_without"]) == set(post["dice_with"]) == {"class 1", "class 2"}
    assert post["largest_component"] == [n for n in ("class 1", "class 2") if post["dice_with"][n] > post["dice_without"][n]]
    assert main(["predict", str(run), str(tmp_path / "set" / "images" / "c3.nii.gz"), "--mirror", "--out",
                 str(tmp_path / "mirrored")]) == 0
    assert nib.load(tmp_path / "mirrored" / "c3_seg.nii.gz").shape == nib.load(tmp_path / "set" / "images" / "c3.nii.gz").shape


def test_mirroring_makes_the_prediction_flip_equivariant_on_every_axis():
    """nnU-Net's test-time mirroring averages the 8 flips of a volume: flipping the input flips the prediction
    exactly, which a single pass of a (random) network does not do."""
    from medfm.finetune.segmentation import mirror_axes, predict
    from medfm.heads import PlannedUNet

    torch.manual_seed(0)
    net = PlannedUNet(3, 1, 3, [3, 3, 3], [1, 2, 2], feature_size=4, deep_supervision=False)
    x = torch.randn(1, 1, 16, 20, 16)
    assert len(mirror_axes(3)) == 8 and len(mirror_axes(2)) == 4 and mirror_axes(3)[0] == ()
    for axes in [(2,), (3,), (4,), (2, 4)]:
        tta = predict(net, x, (16, 20, 16), mirror=True)
        assert torch.allclose(predict(net, x.flip(axes), (16, 20, 16), mirror=True), tta.flip(axes), atol=1e-5)
    assert not torch.allclose(predict(net, x.flip(2), (16, 20, 16)), predict(net, x, (16, 20, 16)).flip(2), atol=1e-3)


def test_largest_component_is_kept_per_class_and_only_where_validation_dice_rises():
    from medfm.finetune.segmentation import choose_postprocessing, largest_component, segmentation_metrics

    truth = torch.zeros(1, 24, 24, 24, dtype=torch.long)
    truth[0, 2:10, 2:10, 2:10] = 1
    truth[0, 14:20, 14:20, 14:20] = 2
    truth[0, 14:17, 2:5, 2:5] = 2  # class 2 truly has two parts
    pred = truth.clone()
    pred[0, 20:23, 20:23, 20:23] = 1  # a stray class-1 island
    filtered = largest_component(pred, [1, 2])
    assert (filtered[0, 20:23, 20:23, 20:23] == 0).all() and (filtered[0, 2:10, 2:10, 2:10] == 1).all()
    assert (filtered[0, 14:17, 2:5, 2:5] == 0).all()  # the smaller true class-2 part is lost too
    assert torch.equal(largest_component(pred, [2])[0, 20:23, 20:23, 20:23], pred[0, 20:23, 20:23, 20:23])
    names = ["background", "a", "b"]
    raw = [segmentation_metrics(pred[None], truth[None], 3, names, hd95=False)]
    lcc = [segmentation_metrics(filtered[None], truth[None], 3, names, hd95=False)]
    assert lcc[0]["dice"]["a"] > raw[0]["dice"]["a"] and lcc[0]["dice"]["b"] < raw[0]["dice"]["b"]
    assert choose_postprocessing(raw, lcc, names) == ["a"]  # kept where it helps, not where it hurts


def test_dynunet_refuses_a_pretrained_encoder_in_one_line(tmp_path, capsys):
    manifest = labelled_volumes(tmp_path / "set", [(16, 16, 16)] * 4, [(1.0, 1.0, 1.0)] * 4)
    code = main(["finetune", "segment_3d", "--data", str(manifest), "--out", str(tmp_path / "r"), "--profile", "tiny",
                 "segmentation.network=dynunet", "--method", "lora"])
    err = capsys.readouterr().err
    assert code == 2 and "segmentation.network=dynunet trains MONAI's DynUNet whole" in err
    # network auto becomes a DynUNet for a random ViT when the run builds: LoRA is refused there too, in one line
    code = main(["finetune", "segment_3d", "--data", str(manifest), "--out", str(tmp_path / "r2"), "--profile", "tiny",
                 "segmentation.network=auto", "--method", "lora"])
    err = capsys.readouterr().err
    assert code == 2 and "network auto chooses it for a random ViT" in err and not (tmp_path / "r2").exists()


@pytest.mark.skipif(not (SHARED / "msd_hippocampus").exists(), reason="the MSD hippocampus copy is in ../shared")
def test_the_hippocampus_plan_is_nnunets():
    fp = fingerprint(SHARED / "msd_hippocampus" / "manifest.csv", max_cases=40)
    plan = make_plan(fp)
    assert plan.spacing == [1.0, 1.0, 1.0] and plan.patch == [40, 56, 40] and len(plan.strides) == 4
    assert plan.num_classes == 3 and plan.normalization == "zscore"


class _Bright(torch.nn.Module):
    """A stand-in segmentation model with a known answer: class 1 wherever the (z-scored) image is above
    ``threshold``."""

    def __init__(self, spec: dict, threshold: float):
        super().__init__()
        self.spec, self.num_classes, self.threshold = spec, 2, threshold
        self.gain = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), (x - self.threshold) * self.gain], 1)


def test_predictions_are_written_in_the_inputs_own_oblique_lps_geometry(tmp_path):
    from medfm.data.preprocess import Preprocess
    from medfm.finetune.segmentation import predict_files

    a = np.deg2rad(20)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.2, -0.9, 2.0])  # oblique, x and y flipped (LPS), 2 mm slices
    affine[:3, 3] = [30.0, 20.0, -10.0]
    shape = (40, 48, 20)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(float)
    truth = (((grid[0] - 14) / 8) ** 2 + ((grid[1] - 28) / 10) ** 2 + ((grid[2] - 9) / 4) ** 2) < 1
    image = np.where(truth, 500.0, 100.0) + np.random.default_rng(0).normal(0, 5, shape)
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(path))
    assert "".join(nib.aff2axcodes(affine)) == "LPS"
    spec = {"encoder": {"spatial_dims": 3, "img_size": 32, "in_chans": 1}, "head": {"num_classes": 2},
            "preprocess": Preprocess("mr_3d", None, {"spacing": 1.0, "normalize": "zscore"}).record()}
    halfway = (300.0 - image.mean()) / image.std()  # between the two intensities, in z-score units
    written = predict_files(_Bright(spec, halfway), [path], tmp_path / "out", probabilities=True)
    out = nib.load(written[0])
    assert out.shape == shape and np.allclose(out.affine, affine) and nib.aff2axcodes(out.affine) == ("L", "P", "S")
    pred = np.asarray(out.dataobj) == 1
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice > 0.9, dice  # resampled to 1 mm RAS, predicted, and back onto the input's own voxels
    probs = nib.load(tmp_path / "out" / "oblique_probs.nii.gz")
    assert probs.shape == (*shape, 2) and np.allclose(np.asarray(probs.dataobj).sum(-1), 1, atol=1e-4)


@pytest.mark.skipif(not (SHARED / "lgg_flair_seg").exists(), reason="the LGG FLAIR copy is in ../shared")
def test_the_lgg_slices_get_a_2d_plan_that_keeps_their_three_channels():
    fp = fingerprint(SHARED / "lgg_flair_seg" / "manifest.csv", max_cases=40)
    plan = make_plan(fp)
    assert plan.spatial_dims == 2 and plan.patch == [128, 128] and plan.num_classes == 2 and plan.channels == 3
    o = plan_overrides(plan)
    assert o["data"]["preset"] == "radiograph_2d" and o["encoder"]["in_chans"] == 3


def test_plan_auto_is_for_segmentation_recipes(tmp_path, capsys):
    manifest = labelled_volumes(tmp_path / "set", [(16, 16, 16)] * 4, [(1.0, 1.0, 1.0)] * 4)
    assert main(["finetune", "classify_3d", "--data", str(manifest), "--plan", "auto", "--out", str(tmp_path / "r")]) == 2
    assert "--plan auto plans segmentation recipes" in capsys.readouterr().err


def test_the_poly_schedule_decays_as_nnunets():
    from medfm.run import TrainingModule

    class Linear(TrainingModule):
        def __init__(self, **optim):
            super().__init__(**optim)
            self.net = torch.nn.Linear(2, 2)

        @property
        def encoder(self):
            return self.net

    conf = Linear(lr=1e-2, schedule="poly", max_steps=100).configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(100):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-2) and seen[50] == pytest.approx(1e-2 * 0.5**0.9, rel=1e-6)
    with pytest.raises(ValueError, match="optim.schedule='step'"):
        Linear(schedule="step")


@pytest.mark.slow  # three short DynUNet runs
def test_a_killed_planned_run_resumes_to_the_same_weights(tmp_path):
    from medfm.finetune import load_task_recipe, run_finetune
    from medfm.finetune.planning import flat_overrides, plan_data

    from .conftest import REPO, KillAt

    manifest = labelled_volumes(tmp_path / "set", [(24, 24, 24)] * 8, [(1.0, 1.0, 1.0)] * 8)
    _, plan = plan_data(manifest)
    cfg = load_task_recipe(REPO / "tasks" / "segment_3d.yaml", [
        *flat_overrides(plan_overrides(plan)), "segmentation.feature_size=4", "segmentation.hd95=false",
        "data.num_workers=0", "data.batch_size=2", "data.test_split=null", "trainer.max_steps=6",
        "trainer.checkpoint_every_n_steps=3", "trainer.enable_progress_bar=false"])
    whole = run_finetune(cfg, tmp_path / "whole", data_path=str(manifest))
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_finetune(cfg, tmp_path / "split", data_path=str(manifest), callbacks=[KillAt(3)])
    split = run_finetune(cfg, tmp_path / "split", data_path=str(manifest), resume=True)
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_an_unknown_normalisation_is_an_error_not_a_silent_default():
    from medfm.data.transforms import mr_3d, radiograph_2d

    for preset in (mr_3d, radiograph_2d):
        with pytest.raises(ValueError, match="normalize='zcore': percentile"):
            preset(normalize="zcore")


def test_nnunet_augmentation_keeps_label_maps_and_mirrors_image_and_mask_together():
    """`data.preset_args.augment: nnunet`: nnU-Net's augmentation set from MONAI transforms on the training patches
    (2D and 3D); a mask stays a label map and moves with its image (mirroring, rotation, scaling)."""
    from monai.utils import set_determinism

    from medfm.data.transforms import mr_3d, radiograph_2d

    from monai.data import MetaTensor

    set_determinism(seed=0)
    image = torch.zeros(1, 20, 24, 20)
    image[0, 3:9, 4:12, 5:10] = 1.0  # an asymmetric block, the mask is where it is
    mask = MetaTensor((image > 0).long() * 2, affine=torch.eye(4))
    image = MetaTensor(image, affine=torch.eye(4))
    t = mr_3d(size=16, spacing=1.0, train=True, normalize="zscore", augment="nnunet")
    flipped = 0
    for _ in range(12):
        out = t({"image": image.clone(), "mask": mask.clone(), "meta": {"affine": torch.eye(4), "spacing": [1.0] * 3}})
        x, m = torch.as_tensor(out["image"]), torch.as_tensor(out["mask"])
        assert x.shape == m.shape == (1, 16, 16, 16) and set(m.unique().tolist()) <= {0, 2}
        if (m > 0).any():  # the mask marks the bright voxels: image and mask moved together
            assert x[m > 0].mean() > x[m == 0].mean()
        flipped += int(not torch.equal(m, torch.as_tensor(mr_3d(size=16, spacing=1.0)(
            {"image": image.clone(), "mask": mask.clone(), "meta": {"affine": torch.eye(4)}})["mask"])))
    assert flipped > 0  # something moved
    set_determinism(seed=None)
    out2d = radiograph_2d(size=32, train=True, normalize="zscore", augment="nnunet")(
        {"image": torch.rand(1, 40, 40), "mask": torch.zeros(1, 40, 40)})
    assert tuple(out2d["image"].shape) == (1, 32, 32)
    with pytest.raises(ValueError, match="augment='heavy'"):
        mr_3d(size=16, augment="heavy")


def test_the_sliding_window_stitches_a_volume_larger_than_its_patch_as_one_forward_would():
    """A per-voxel network (1x1x1 convolutions, no context) predicts the same through overlapping Gaussian-weighted
    windows as in one whole-volume forward: the windows cover every voxel and their weights are normalised; a
    volume smaller than the window is padded and cropped back."""
    from medfm.finetune.segmentation import predict

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 1))
    for shape in [(40, 52, 36), (12, 10, 14)]:
        x = torch.randn(1, 1, *shape)
        with torch.no_grad():
            whole = net(x).softmax(1)
        windowed = predict(net, x, (16, 16, 16), overlap=0.25)
        assert windowed.shape == whole.shape and torch.allclose(windowed, whole, atol=1e-5)


def test_the_cpu_profile_shrinks_a_large_patch_within_its_budget_and_keeps_what_the_plan_took_from_the_data(tmp_path):
    from medfm.finetune.planning import plan_data

    manifest = labelled_volumes(tmp_path / "big", [(96, 112, 96), (98, 110, 94), (94, 112, 98), (96, 108, 96)], [(1.0,) * 3] * 4,
                        ct=True)
    fp, full = plan_data(manifest)
    _, cpu = plan_data(manifest, profile="cpu")
    assert full.patch == [96, 112, 96] and np.prod(cpu.patch) <= 1.1 * 64**3 < np.prod(full.patch)
    assert all(c % 2**k == 0 for c, k in zip(cpu.patch, cpu.pools))  # still divisible by its own pooling
    for same in ("spacing", "num_classes", "normalization", "ct_stats", "foreground"):
        assert getattr(cpu, same) == getattr(full, same), same
    assert plan_data(manifest, profile="none")[1].patch == full.patch
