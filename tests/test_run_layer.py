"""The run layer: a new method is one file and one registration line; recipe sections are declared and
checked; every artifact kind reloads alone; ``medfm evaluate RUN`` dispatches on the run; the layering holds."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import medfm
from medfm.cli import main
from medfm.encoders import CLIP, TextEncoder, create_encoder, create_model_and_transforms, saved_architecture
from medfm.pretrain import METHODS, PretrainMethod, load_recipe, register_method, run_pretrain
from medfm.finetune import ClassificationModel, SegmentationModel
from medfm.run import TrainingModule
from medfm.run.sampling import resolve_workers, usable_cores

from .conftest import REPO
from .pretrain_helpers import data_2d, losses


# --------------------------------------------------------------------- a toy method, defined here
@dataclass
class ToyConfig:
    """``toy`` recipe section."""

    scale: float = 1.0  # weight of the loss
    target_norm: float = 0.0  # the embedding norm the loss pulls towards


class ToyModule(TrainingModule):
    """Pulls the pooled embedding's norm towards ``target_norm``: a loss any encoder can lower."""

    def __init__(self, encoder, scale: float = 1.0, target_norm: float = 0.0, **optim):
        super().__init__(**optim)
        self.net, self.scale, self.target_norm = encoder, scale, target_norm

    @property
    def encoder(self):
        return self.net

    def compute_loss(self, batch):
        norm = self.net(batch["image"]).norm(dim=-1)
        return self.scale * (norm - self.target_norm).pow(2).mean(), {"norm": norm.mean().detach()}


class Toy(PretrainMethod):
    name = "toy"
    Config = ToyConfig
    module_class = ToyModule


@pytest.fixture
def toy():
    register_method(Toy)  # the one registration line a new method adds
    yield Toy
    METHODS.pop("toy")


TINY_SYNTH = ["encoder.name=vit_micro", "encoder.img_size=32", "encoder.patch_size=8", "data.regime=synthetic",
              "data.synthetic={size: 32, n_labels: 4}", "data.batch_size=8", "data.num_workers=0",
              "optim.lr=1e-3", "trainer.max_steps=12", "trainer.log_every_n_steps=1",
              "trainer.enable_progress_bar=false", "probe.every_n_steps=0"]


@pytest.mark.slow  # two pretraining runs
def test_a_toy_method_registered_here_runs_through_the_runner_and_the_cli(toy, tmp_path, capsys, caplog):
    cfg = load_recipe(REPO / "encoders" / "mae_vit_2d.yaml", ["method=toy", "toy.scale=2.0", *TINY_SYNTH])
    assert cfg["toy"] == {"scale": 2.0, "target_norm": 0.0}  # its section, with its declared defaults
    with caplog.at_level("INFO"):
        run = run_pretrain(cfg, tmp_path / "runner")
    for line in ("litlogger", "GPU available", "`Trainer.fit` stopped"):  # Lightning's known info lines filtered
        assert line not in caplog.text
    curve = losses(run)
    assert len(curve) == 12 and sum(curve[-3:]) < sum(curve[:3]), curve
    assert json.loads((run / "run.json").read_text()) == {"kind": "pretrain", "plugin": "toy", "model": "encoder"}
    encoder, transform = create_model_and_transforms(run / "encoder")  # exported with its preprocessing
    assert encoder.preprocess == {"preset": "radiograph_2d", "size": 32, "args": {}}
    # the same method from the command line, with a typo caught in its own section
    capsys.readouterr()
    assert main(["pretrain", "mae_vit_2d", "--out", str(tmp_path / "cli"), "method=toy", "toy.target_norm=1.0",
                 *TINY_SYNTH]) == 0
    assert f"run finished: {tmp_path / 'cli'} | model {tmp_path / 'cli' / 'encoder'} |" in capsys.readouterr().out
    assert (tmp_path / "cli" / "encoder" / "model.safetensors").exists()
    assert main(["pretrain", "mae_vit_2d", "--out", str(tmp_path / "typo"), "method=toy", "toy.scael=1"]) == 2
    assert "unknown recipe key 'toy.scael'; did you mean 'scale'?" in capsys.readouterr().err
    # `medfm evaluate RUN` knows what the run is: a linear probe of its encoder on labelled data
    data = data_2d(tmp_path)
    label = [] if data.endswith(".npz") else ["--label", "label"]
    assert main(["evaluate", str(run), "--data", data, "--split", "val", *label]) == 0
    m = json.loads((run / "eval_val" / "metrics.json").read_text())
    assert 0.0 <= m["linear_probe"]["auroc"] <= 1.0


def test_dataloader_workers_never_exceed_the_cores():
    cores = usable_cores()
    assert resolve_workers("auto") == min(max(cores - 1, 0), 8) and resolve_workers(64) == cores
    assert resolve_workers(0) == 0
    with pytest.raises(ValueError, match="data.num_workers must be 'auto' or a number"):
        resolve_workers("many")


def test_recipe_errors_name_the_key_the_file_and_the_nearest_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: mae\nmae:\n  mask_rato: 0.5\n")
    with pytest.raises(KeyError, match=r"bad\.yaml: unknown recipe key 'mae\.mask_rato'; did you mean 'mask_ratio'\?"):
        load_recipe(bad)
    bad.write_text("optim:\n  warmup_step: 5\n")
    with pytest.raises(KeyError, match=r"bad\.yaml: unknown recipe key 'optim\.warmup_step'; did you mean 'warmup_steps'"):
        load_recipe(bad)
    bad.write_text("mae:\n  mask_ratio: lots\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: recipe key 'mae\.mask_ratio' must be float, got 'lots'"):
        load_recipe(bad)
    with pytest.raises(ValueError, match=r"unknown pretrain method 'maee'; available: .*mae"):
        load_recipe(overrides=["method=maee"])
    # free-form sections stay free: any Lightning Trainer argument passes the recipe layer
    assert load_recipe(overrides=["trainer.deterministic=true"])["trainer"]["deterministic"] is True


# --------------------------------------------------------------------- every artifact kind reloads alone
RELOAD = """
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
import medfm

root = Path(sys.argv[1])
inputs = load_file(str(root / "inputs.safetensors"))
out = {}
for name in ("encoder", "classifier", "lora_classifier", "segmenter"):
    model = medfm.load(root / name)
    out[name] = model(inputs["image"]).detach().contiguous()
clip = medfm.load(root / "clip")
out["clip_image"] = clip.encode_image(inputs["image"]).detach().contiguous()
out["clip_text"] = clip.encode_text(["no acute findings.", "left pleural effusion."]).detach().contiguous()
text = medfm.load(root / "text")
out["text"] = text(["no acute findings."])["pooled"].detach().contiguous()
save_file(out, str(root / "outputs.safetensors"))
"""


def _spec(method: str, head: dict) -> dict:
    return {"task": "classification", "method": method, "lora": {"r": 4}, "vpt": {},
            "encoder": {"name": "vit_micro", "spatial_dims": 2, "in_chans": 1, "img_size": 32, "patch_size": 8},
            "head": head, "preprocess": {"preset": "radiograph_2d", "size": 32, "args": {}}}


@pytest.mark.slow
def test_every_artifact_kind_reloads_from_its_folder_alone_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    head = {"num_classes": 3, "dropout": 0.0, "head_norm": True}
    models = {
        "encoder": create_encoder("vit_micro", img_size=32, patch_size=8),
        "classifier": ClassificationModel.from_spec(_spec("vpt", head)),
        "lora_classifier": ClassificationModel.from_spec(_spec("lora", head)),
        "segmenter": SegmentationModel.from_spec({**_spec("full", {}), "task": "segmentation",
                                                   "head": {"num_classes": 3, "feature_size": 8}}),
    }
    for m in models.values():  # trained-looking weights, not the initial ones
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
    clip = CLIP(create_encoder("vit_micro", img_size=32, patch_size=8), TextEncoder(max_length=16), embed_dim=16)
    image = torch.rand(2, 1, 32, 32)
    expected = {name: m.eval()(image).detach() for name, m in models.items()}
    clip.eval()
    expected["clip_image"] = clip.encode_image(image).detach()
    expected["clip_text"] = clip.encode_text(["no acute findings.", "left pleural effusion."]).detach()
    expected["text"] = clip.text_encoder(["no acute findings."])["pooled"].detach()
    for name, m in models.items():
        m.save_pretrained(tmp_path / name)
    clip.save_pretrained(tmp_path / "clip")
    clip.text_encoder.save_pretrained(tmp_path / "text")
    save_file({"image": image}, str(tmp_path / "inputs.safetensors"))
    assert not list(tmp_path.rglob("recipe.yaml")) and not list(tmp_path.rglob("*.bin"))
    for name in (*models, "clip"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["medfm_class"].startswith("medfm.") and (tmp_path / name / "model.safetensors").exists()
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path)], check=True, cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    got = load_file(str(tmp_path / "outputs.safetensors"))
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_folders_in_the_layout_before_one_artifact_base_still_reload(tmp_path):
    """Folders written before the one artifact base (checked against real ones from commit 620ad64: same
    outputs): task models named ``medfm.finetune.model.Finetuned*`` with ``lora`` and ``vpt`` sections in their
    spec, encoders without ``architecture``, text towers holding BERT's unused pooler."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    head = {"num_classes": 3, "dropout": 0.0, "head_norm": True}
    cls = ClassificationModel.from_spec(_spec("lora", head)).eval()
    enc = create_encoder("vit_micro", img_size=32, patch_size=8).eval()
    text = TextEncoder(max_length=16).eval()
    for name, m in (("cls", cls), ("enc", enc), ("text", text)):
        m.save_pretrained(tmp_path / name)
    config = json.loads((tmp_path / "cls" / "config.json").read_text())
    config["medfm_class"] = "medfm.finetune.model:FinetunedClassifier"  # the shadow class of the old layout
    (tmp_path / "cls" / "config.json").write_text(json.dumps(config))
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    del config["architecture"]  # inferred from the widths, as before
    (tmp_path / "enc" / "config.json").write_text(json.dumps(config))
    weights = load_file(str(tmp_path / "text" / "model.safetensors"))
    weights.update({"pooler.dense.weight": torch.zeros(384, 384), "pooler.dense.bias": torch.zeros(384)})
    save_file(weights, str(tmp_path / "text" / "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():
        torch.testing.assert_close(medfm.load(tmp_path / "cls")(x), cls(x))
        assert type(medfm.load(tmp_path / "cls")) is ClassificationModel
        torch.testing.assert_close(medfm.load(tmp_path / "enc")(x), enc(x))
        torch.testing.assert_close(medfm.load(tmp_path / "text")(["no acute findings."])["pooled"],
                                   text(["no acute findings."])["pooled"])
    assert saved_architecture(tmp_path / "enc")["name"] == "vit_micro"


def test_a_folder_naming_a_class_outside_medfm_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"medfm_class": "os:system"}))
    with pytest.raises(ValueError, match="outside the medfm package; refusing to import it"):
        medfm.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        medfm.load(tmp_path / "nothing")


def test_encode_uses_the_preprocessing_the_encoder_recorded(tmp_path, capsys):
    enc = create_encoder("vit_micro", spatial_dims=3, img_size=32, patch_size=8)
    enc.preprocess = {"preset": "mr_3d", "size": 32, "args": {"spacing": 6.0}}
    enc.save_pretrained(tmp_path / "enc")
    assert main(["encode", "--pretrained", str(tmp_path / "enc")]) == 0  # MNI152 by default
    out = capsys.readouterr().out
    assert "preset     mr_3d: (1, 1, 32, 32, 32) (spacing (6.0, 6.0, 6.0))" in out and "embedding  (1, 48)" in out


# --------------------------------------------------------------------- layering
def test_no_private_name_is_imported_across_packages():
    """``from medfm.a import _x`` only inside package ``a`` (the import contracts run in ``make test``)."""
    bad = []
    for path in (REPO / "medfm").rglob("*.py"):
        own = ".".join(path.relative_to(REPO).with_suffix("").parts[:2])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medfm"):
                other = ".".join(node.module.split(".")[:2])
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and other != own]
    assert not bad, bad


def test_import_contracts_hold():
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.skip("import-linter is not installed (it is a dev extra: pip install -e '.[dev]')")
    res = subprocess.run([str(exe)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:]
