"""`--profile cpu`: one table of overrides that every recipe accepts; recipe files keep GPU-scale defaults."""

from __future__ import annotations

import pytest

from medfm.cli import main
from medfm.finetune import load_task_recipe
from medfm.generate import is_generator_recipe, load_generator_recipe
from medfm.pretrain import load_recipe
from medfm.run import list_recipes
from medfm.run.profiles import SCRATCH_ENCODERS

from .pretrain_helpers import data_2d, losses


def _load(path, overrides=(), profile=None):
    if path.parent.name == "tasks":
        return load_task_recipe(path, overrides, profile)
    return (load_generator_recipe if is_generator_recipe(path) else load_recipe)(path, overrides, profile)


@pytest.mark.parametrize("path", [p for paths in list_recipes().values() for p in paths], ids=lambda p: p.name)
def test_every_recipe_takes_every_profile(path):
    full, small = _load(path), _load(path, profile="cpu")
    assert _load(path, profile="tiny")["trainer"]["max_steps"] == 4
    assert small["trainer"]["max_steps"] == 500 <= full["trainer"]["max_steps"]
    if "img_size" in full.get("encoder", {}) and not full["encoder"].get("pretrained"):
        dims = full["encoder"]["spatial_dims"]
        scratch = "segres_encoder" if (small.get("task"), dims) in SCRATCH_ENCODERS["cpu"] else "vit_tiny"  # see below
        assert small["encoder"]["name"] == scratch and small["encoder"]["img_size"] == {2: 64, 3: 32}[dims]
        if path.name not in AT_SHIPPED_SIZE:
            assert full["encoder"]["img_size"] > small["encoder"]["img_size"]


AT_SHIPPED_SIZE = {"medfm_tiny_2d.yaml"}  # the recipe of medfm:tiny-2d is written at the size it ships (ViT-Tiny/8, 64 px)


def test_3d_segmentation_from_random_init_trains_a_cnn_encoder_at_the_cpu_profile():
    """Issue 41, item 5: at the CPU profile a random-init ViT-Tiny/8 + UNETR never predicted the posterior
    hippocampus (Dice 0.00 at 500 and 1,000 steps; its near-zero learned positions leave tokens without a place),
    where a small SegResNet encoder under the same decoder and recipe scores 0.825 / 0.816 (benchmarks/RESULTS.md).
    The profile now trains that encoder from scratch; named weights and a named encoder are left alone."""
    path = list_recipes()["tasks"][0].parent / "segment_3d.yaml"
    scratch = load_task_recipe(path, ["segmentation.num_classes=3"], "cpu")["encoder"]
    assert scratch["name"] == "segres_encoder" and scratch["init_filters"] == 16 and "patch_size" not in scratch
    weights = load_task_recipe(path, ["encoder.pretrained=runs/mae3d/encoder"], "cpu")["encoder"]
    assert weights["name"] == "vit_small" and weights["patch_size"] == 16  # the weights decide
    named = load_task_recipe(path, ["encoder.name=vit_tiny"], "cpu")["encoder"]
    assert named["name"] == "vit_tiny" and named["patch_size"] == 8 and "init_filters" not in named
    assert load_task_recipe(path, [], "tiny")["encoder"]["name"] == "vit_micro"  # smoke tests stay a ViT
    assert load_task_recipe(path.with_name("segment_2d.yaml"), [], "cpu")["encoder"]["name"] == "vit_tiny"


def test_overrides_win_over_the_profile_and_weights_keep_their_architecture(tmp_path):
    path = list_recipes()["tasks"][0].parent / "classify_2d.yaml"
    cfg = load_task_recipe(path, ["trainer.max_steps=7", "encoder.pretrained=runs/x/encoder"], "cpu")
    assert cfg["trainer"]["max_steps"] == 7
    assert cfg["encoder"]["name"] == "vit_small" and cfg["encoder"]["patch_size"] == 16  # the weights decide
    assert cfg["encoder"]["img_size"] == 64
    with pytest.raises(ValueError, match="unknown profile 'gpu'; profiles: cpu, tiny"):
        load_task_recipe(path, [], "gpu")


def test_a_cpu_profile_pretraining_run_through_the_cli(tmp_path):
    data = data_2d(tmp_path)
    assert main(["pretrain", "mae_vit_2d", "--profile", "cpu", "--data", data, "--out", str(tmp_path / "run"),
                 "--max-steps", "3", "data.num_workers=0", "probe.every_n_steps=0", "trainer.log_every_n_steps=1"]) == 0
    recipe = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "name: vit_tiny" in recipe and "img_size: 64" in recipe and "max_steps: 3" in recipe
    assert len(losses(tmp_path / "run")) >= 1
    # fine-tuning from that run builds the saved network (the recipe says ViT-S/16), in 2D or inflated to 3D
    tasks = list_recipes()["tasks"][0].parent
    for name, dims in (("classify_2d", 2), ("classify_3d", 3)):
        cfg = load_task_recipe(tasks / f"{name}.yaml", [f"encoder.pretrained={tmp_path / 'run' / 'encoder'}"])
        assert (cfg["encoder"]["name"], cfg["encoder"]["patch_size"], cfg["encoder"]["spatial_dims"]) == ("vit_tiny", 8, dims)
