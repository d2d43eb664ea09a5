"""Segmentation networks from MONAI with medfm encoders (segresnet, swinunetr, auto) and K-fold runs with their
ensemble (issue 41): each network trains and reloads alone, its encoder's weights are stored once, ``auto`` picks
the network a pretrained encoder's family has, folds partition the training split and ensemble by their logits."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.utils import ensure_tuple_rep

import medfm
from medfm.cli import main
from medfm.data import read_records
from medfm.finetune import load_task_recipe, run_finetune
from medfm.finetune.folds import FoldEnsemble, load_folds
from medfm.finetune.segmentation import resolve_network
from medfm.heads import BackboneNetwork

from .conftest import REPO
from .finetune_helpers import labelled_volumes

QUIET = ["trainer.enable_progress_bar=false", "segmentation.hd95=false", "data.num_workers=0"]
SHAPES = [(30, 34, 30), (32, 32, 30), (30, 36, 32), (31, 33, 29)] * 2


def _recipe(*overrides: str) -> dict:
    return load_task_recipe(REPO / "tasks" / "segment_3d.yaml", ["segmentation.num_classes=3", "data.batch_size=2",
                                                                 "trainer.max_steps=10", "optim.lr=3e-3",
                                                                 "trainer.log_every_n_steps=1", *QUIET, *overrides],
                            profile="tiny")


def _losses(run) -> list[float]:
    with open(run / "logs" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow  # two short 3D runs
@pytest.mark.parametrize("network, family", [("segresnet", "segres_encoder"), ("swinunetr", "swin_vit")])
def test_each_monai_network_trains_around_its_medfm_encoder_and_reloads_alone(tmp_path, network, family):
    manifest = labelled_volumes(tmp_path / "set", SHAPES, [(1.0, 1.0, 1.0)] * 8)
    extra = ["encoder.feature_size=12", "encoder.num_heads=[1,2,2,4]", "encoder.depths=[1,1,1,1]",
             "encoder.window_size=4"] if network == "swinunetr" else ["encoder.init_filters=8"]
    cfg = _recipe(f"segmentation.network={network}", f"encoder.name={family}", "encoder.patch_size=null", *extra)
    assert cfg["segmentation"]["network"] == network and cfg["encoder"]["img_size"] == 32
    run = run_finetune(cfg, tmp_path / "run", data_path=str(manifest))
    size = 64 if network == "swinunetr" else 32  # SwinUNETR: at least 64 (its bottleneck is 1/32 of it)
    assert list(ensure_tuple_rep(medfm.finetune.run_recipe(run)["encoder"]["img_size"], 3)) == [size] * 3
    losses = _losses(run)
    assert losses[-1] < losses[0], losses
    model = medfm.load(run / "model")
    assert isinstance(model, BackboneNetwork) and model.network_name == network
    # the encoder's weights are stored once, under encoder. (the MONAI network borrows it)
    keys = list(model.state_dict())
    assert any(k.startswith("encoder.net.") for k in keys) and not any(".swinViT." in k or "network.encoder." in k
                                                                        for k in keys)
    x = torch.randn(1, 1, size, size, size)
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 3, size, size, size)
        # the exported encoder is the network's own encoder, and it reloads as that family
        encoder = medfm.load(run / "encoder").eval()
        torch.testing.assert_close(encoder.forward_features(x), model.encoder.forward_features(x))
    if network == "segresnet":  # SegResNetDS's deep supervision: a full-size head per level but the lowest (of 5)
        with torch.no_grad():
            assert model.train()(x).shape == (1, 4, 3, 32, 32, 32)
        # the run's encoder as a pretrained backbone: a plan's network auto becomes its family's, and the plan's
        # 32 x 40 x 32 patch is rounded up to its 5 levels' stride 16 (not down to the recipe's ViT patch size)
        again = tmp_path / "again"
        assert main(["finetune", "segment_3d", "--data", str(manifest), "--plan", "auto", "--profile", "tiny",
                     "--encoder", str(run), "--out", str(again), "--max-steps", "2", *QUIET]) == 0
        recipe = medfm.finetune.run_recipe(again)
        assert recipe["segmentation"]["network"] == "segresnet" and recipe["encoder"]["img_size"] == [32, 48, 32]
        assert recipe["encoder"]["init_filters"] == 8 and "encoder" in str(recipe["encoder"]["pretrained"])


def test_the_networks_are_monais_own_with_the_medfm_encoder_in_its_encoders_place():
    """Loaded with one MONAI network's weights (its encoder's under encoder.net.), ours computes what MONAI's does."""
    from monai.networks.nets import SegResNetDS, SwinUNETR

    from medfm.encoders import create_encoder

    swin = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)
    cases = [
        ("swinunetr", "swin_vit", "swinViT.", SwinUNETR(1, 3, spatial_dims=3, **swin), swin, 64),
        ("segresnet", "segres_encoder", "encoder.",
         SegResNetDS(3, init_filters=8, in_channels=1, out_channels=3, blocks_down=(1, 2, 2, 4), dsdepth=3),
         dict(init_filters=8, blocks_down=(1, 2, 2, 4)), 32),
    ]
    for network, family, prefix, ref, args, size in cases:
        torch.manual_seed(0)
        ref.eval()
        ours = BackboneNetwork(create_encoder(family, spatial_dims=3, img_size=size, **args), network, 3).eval()
        sd = {(f"encoder.net.{k[len(prefix):]}" if k.startswith(prefix) else f"network.{k}"): v
              for k, v in ref.state_dict().items()}
        ours.load_state_dict(sd)  # strict: every weight has its place, none is stored twice
        x = torch.randn(1, 1, size, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), msg=network)


def test_auto_takes_the_encoders_own_network_and_dynunet_for_a_random_vit(capsys):
    base = {"segmentation": {"network": "auto"}, "encoder": {"name": "segres_encoder", "spatial_dims": 3,
                                                             "in_chans": 1, "img_size": [40, 56, 40]}}
    cfg = json.loads(json.dumps(base))
    cfg["encoder"]["pretrained"] = "ctfm/"
    said = resolve_network(cfg)
    assert cfg["segmentation"]["network"] == "segresnet" and "auto -> segresnet" in said[0]
    assert cfg["encoder"]["img_size"] == [48, 64, 48]  # CT-FM's 5 levels: sizes divisible by 16, rounded up
    cfg = json.loads(json.dumps(base))
    cfg["encoder"].update(name="swin_vit", pretrained="model_swinvit.pt")
    resolve_network(cfg)
    assert cfg["segmentation"]["network"] == "swinunetr" and cfg["encoder"]["img_size"] == [64, 64, 64]
    cfg = json.loads(json.dumps(base))
    cfg["encoder"].update(name="vit_small", pretrained="runs/mae/encoder")
    resolve_network(cfg)
    assert cfg["segmentation"]["network"] == "unetr" and cfg["encoder"]["img_size"] == [40, 56, 40]
    cfg = json.loads(json.dumps(base))  # random init, as --profile cpu builds it: the encoder's own network too
    resolve_network(cfg)
    assert cfg["segmentation"]["network"] == "segresnet" and cfg["encoder"]["img_size"] == [48, 64, 48]
    cfg = json.loads(json.dumps(base))
    cfg["encoder"].update(name="vit_small")
    resolve_network(cfg)
    assert cfg["segmentation"]["network"] == "dynunet"  # a random ViT: nnU-Net's network, no medfm encoder
    # segresnet from random init replaces a ViT by its own family, as deep as the patch allows (40: 3 halvings)
    cfg = {"segmentation": {"network": "segresnet"}, "encoder": {"name": "vit_small", "patch_size": 16,
                                                                  "spatial_dims": 3, "in_chans": 1,
                                                                  "img_size": [40, 56, 40]}}
    resolve_network(cfg)
    assert cfg["encoder"]["name"] == "segres_encoder" and cfg["encoder"]["blocks_down"] == [1, 2, 2, 4]
    assert "patch_size" not in cfg["encoder"] and cfg["encoder"]["img_size"] == [40, 56, 40]
    # pretrained weights of another family under an explicit network: one clear error
    cfg = {"segmentation": {"network": "swinunetr"}, "encoder": {"name": "segres_encoder", "pretrained": "ctfm/",
                                                                  "spatial_dims": 3, "in_chans": 1, "img_size": 64}}
    with pytest.raises(ValueError, match="takes a swin_vit encoder"):
        resolve_network(cfg)
    with pytest.raises(ValueError, match="one of unetr, dynunet, segresnet, swinunetr, auto"):
        resolve_network({"segmentation": {"network": "unet"}, "encoder": {}})


def test_the_folds_of_a_split_partition_it(tmp_path):
    manifest = labelled_volumes(tmp_path / "set", [(8, 8, 8)] * 13, [(1.0, 1.0, 1.0)] * 13)
    train = {r.image for r in read_records(manifest, split="train")[0]}
    parts = [{r.image for r in read_records(manifest, split=f"train fold {k} of 3")[0]} for k in range(3)]
    assert set().union(*parts) == train and sum(map(len, parts)) == len(train)
    assert sorted(map(len, parts)) == [3, 3, 4]
    for k in range(3):
        rest = {r.image for r in read_records(manifest, split=f"train without fold {k} of 3")[0]}
        assert rest == train - parts[k]
    again = {r.image for r in read_records(manifest, split="train fold 1 of 3")[0]}
    assert again == parts[1]  # drawn with a fixed seed: the same parts every time
    with pytest.raises(Exception, match="0 <= k < n"):
        read_records(manifest, split="train fold 3 of 3")
    # by a column: the rows sharing a value (a patient's slices) fall in one part
    rows = list(csv.DictReader(open(manifest)))
    for i, r in enumerate(rows):
        r["patient"] = f"p{i // 3}"
    grouped = tmp_path / "set" / "grouped.csv"
    with open(grouped, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    patient = {str(tmp_path / "set" / r["image"]): r["patient"] for r in rows}
    seen: dict = {}
    for k in range(3):
        part = read_records(grouped, split=f"train fold {k} of 3 by patient")[0]
        rest = read_records(grouped, split=f"train without fold {k} of 3 by patient")[0]
        assert not {patient[r.image] for r in part} & {patient[r.image] for r in rest}
        for r in part:
            assert seen.setdefault(patient[r.image], k) == k
    with pytest.raises(Exception, match="no column 'site'"):
        read_records(grouped, split="train fold 0 of 3 by site")


def test_an_ensemble_averages_its_models_logits():
    class Constant(torch.nn.Module):
        num_classes, spec = 2, {"head": {}}

        def __init__(self, value):
            super().__init__()
            self.value = torch.nn.Parameter(torch.tensor(float(value)))

        def forward(self, x):
            return self.value * torch.ones(x.shape[0], 2, *x.shape[2:])

    out = FoldEnsemble([Constant(1), Constant(4)])(torch.zeros(1, 1, 4, 4))
    assert torch.allclose(out, torch.full((1, 2, 4, 4), 2.5))


@pytest.mark.slow  # two folds of a tiny DynUNet through the command line
def test_folds_train_on_their_parts_and_predict_and_evaluate_as_one_ensemble(tmp_path, capsys):
    manifest = labelled_volumes(tmp_path / "set", SHAPES, [(1.0, 1.0, 1.0)] * 8)
    run = tmp_path / "folds"
    args = ["finetune", "segment_3d", "--data", str(manifest), "--plan", "auto", "--profile", "tiny", "--folds", "2",
            "--out", str(run), "--max-steps", "4", "segmentation.feature_size=8", *QUIET]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| ensemble |" in out and "| fold_0 |" in out
    for k in range(2):
        recipe = medfm.finetune.run_recipe(run / f"fold_{k}")
        assert recipe["data"]["train_split"] == f"train without fold {k} of 2"
        assert recipe["data"]["val_split"] == f"train fold {k} of 2" and recipe["data"]["test_split"] == "val"
        fold = json.loads((run / f"fold_{k}" / "metrics.json").read_text())
        assert fold["n_train"] == 3 and fold["val"]["n"] == 2  # 6 training cases: 3 train, 3 validate each fold
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["folds"] == 2 and metrics["split"] == "val" and metrics["ensemble"]["n"] == 2
    assert set(metrics["per_fold"]) == {"fold_0", "fold_1"}
    ensemble, _ = load_folds(run)
    x = torch.randn(1, 1, 32, 40, 32)
    with torch.no_grad():
        folds = [medfm.load(run / f"fold_{k}" / "model").eval()(x) for k in range(2)]
        torch.testing.assert_close(ensemble.eval()(x), (folds[0] + folds[1]) / 2)
    assert main(["predict", str(run), str(tmp_path / "set" / "images" / "c3.nii.gz"), "--out", str(tmp_path / "p")]) == 0
    pred, src = nib.load(tmp_path / "p" / "c3_seg.nii.gz"), nib.load(tmp_path / "set" / "images" / "c3.nii.gz")
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert main(["evaluate", str(run), "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["ensemble"]["n"] == 2
    # a finished fold is kept on --resume: nothing trains again
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert capsys.readouterr().out.count("finished earlier, kept") == 2
