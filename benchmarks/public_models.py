"""Public foundation models at full size: conversion time, peak memory and parameter counts.

For every family `medfm models` lists, the upstream model is built with random weights from its own package
(transformers, timm, segment-anything, open_clip, MONAI, torchvision / torchxrayvision) at its published size,
saved in the upstream layout, then converted by medfm in a fresh process (``create_encoder(...,
pretrained=FILE)`` through ``create_model_and_transforms``, or ``clip_from_open_clip`` for BiomedCLIP): wall time of the conversion and load, the
process's peak resident memory above its state after imports, and the parameter counts of the upstream model
and of the medfm encoder (equal, less the heads medfm drops). Nothing is downloaded: weights are random.

    python benchmarks/public_models.py [--only dinov2-hf-B,sam-B] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# name: (format, what is built, published parameter count of that part, source of the published number)
CASES = {
    "dinov2-hf-B": ("dinov2-hf", "HF Dinov2Model ViT-B/14, 518 px (RAD-DINO's size)", "86M", "DINOv2 paper, Table 15"),
    "dinov2-hf-L": ("dinov2-hf", "HF Dinov2Model ViT-L/14, 518 px", "300M", "DINOv2 paper, Table 15"),
    "dinov2-timm-L-reg4": ("dinov2-timm", "timm vit_large_patch14_reg4_dinov2", "300M", "DINOv2 paper (+4 registers)"),
    "biomedclip": ("open-clip-timm", "open_clip ViT-B/16 + BERT-base (BiomedCLIP layout)", "", ""),
    "sam-B": ("sam", "segment-anything SAM ViT-B (image encoder used)", "", ""),
    "sam-L": ("sam", "segment-anything SAM ViT-L (image encoder used)", "", ""),
    "swinunetr-ssl": ("swinunetr-ssl", "MONAI SwinUNETR feature 48: its Swin ViT", "", ""),
    "ct-fm": ("ct-fm", "MONAI SegResEncoder, 32 filters, blocks (1, 2, 2, 4, 4)", "", ""),
    "m3d-vit": ("monai-vit", "MONAI ViT-B, 32x256x256, 4x16x16 perceptron patches", "", ""),
    "xrv-densenet121": ("xrv-densenet121", "torchxrayvision DenseNet(weights=None)", "7.0M", "torchvision densenet121, 1 channel, 18 outputs"),
    "xrv-resnet50": ("xrv-resnet50", "torchvision resnet50, 1-channel stem, 18 outputs", "23.5M + fc", "torchvision resnet50"),
}


def _count(module_or_sd) -> int:
    if isinstance(module_or_sd, dict):
        return sum(v.numel() for k, v in module_or_sd.items() if v.is_floating_point() and "running_" not in k)
    return sum(p.numel() for p in module_or_sd.parameters())


def make(name: str, folder: Path) -> dict:
    """Build the upstream model with random weights and save it in its own layout; its parameter count."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if name.startswith("dinov2-hf"):
        from transformers import Dinov2Config, Dinov2Model

        size = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12) if name.endswith("B") else \
            dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)
        model = Dinov2Model(Dinov2Config(image_size=518, patch_size=14, **size))
        model.save_pretrained(folder)
        return {"path": str(folder), "upstream_params": _count(model)}
    if name == "dinov2-timm-L-reg4":
        import timm
        from safetensors.torch import save_file

        model = timm.create_model("vit_large_patch14_reg4_dinov2", num_classes=0)
        save_file(model.state_dict(), folder / "model.safetensors")
        return {"path": str(folder / "model.safetensors"), "upstream_params": _count(model)}
    if name == "biomedclip":
        import open_clip
        from transformers import AutoTokenizer, BertConfig

        from medfm.encoders import default_text_model_path

        bert = folder / "bert"
        AutoTokenizer.from_pretrained(default_text_model_path()).save_pretrained(bert)
        BertConfig().save_pretrained(bert)  # BERT-base, as PubMedBERT
        cfg = {"embed_dim": 512,
               "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                              "timm_proj": "linear", "image_size": 224},
               "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "mlp",
                            "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256,
                            "hf_model_pretrained": False}}
        model = open_clip.CustomTextCLIP(embed_dim=512, vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
        hub = folder / "hub"
        hub.mkdir()
        (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
        torch.save(model.state_dict(), hub / "open_clip_pytorch_model.bin")
        return {"path": str(hub), "upstream_params": _count(model)}
    if name.startswith("sam"):
        from segment_anything import sam_model_registry

        sam = sam_model_registry["vit_b" if name.endswith("B") else "vit_l"](checkpoint=None)
        torch.save(sam.state_dict(), folder / "sam.pth")
        return {"path": str(folder / "sam.pth"), "upstream_params": _count(sam.image_encoder),
                "upstream_whole": _count(sam)}
    if name == "swinunetr-ssl":
        from monai.networks.nets import SwinUNETR

        model = SwinUNETR(in_channels=1, out_channels=14, feature_size=48)
        sd = {f"module.{k}".replace("mlp.linear", "mlp.fc"): v for k, v in model.swinViT.state_dict().items()}
        torch.save({"state_dict": sd}, folder / "model_swinvit.pt")
        return {"path": str(folder / "model_swinvit.pt"), "upstream_params": _count(model.swinViT),
                "upstream_whole": _count(model)}
    if name == "ct-fm":
        from monai.networks.nets.segresnet_ds import SegResEncoder
        from safetensors.torch import save_file

        model = SegResEncoder(spatial_dims=3, init_filters=32, in_channels=1, blocks_down=(1, 2, 2, 4, 4))
        save_file(model.state_dict(), folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"init_filters": 32, "blocks_down": [1, 2, 2, 4, 4]}))
        return {"path": str(folder), "upstream_params": _count(model)}
    if name == "m3d-vit":
        from monai.networks.nets import ViT
        from safetensors.torch import save_file

        model = ViT(in_channels=1, img_size=(32, 256, 256), patch_size=(4, 16, 16), proj_type="perceptron")
        save_file({f"vision_encoder.{k}": v for k, v in model.state_dict().items()}, folder / "model.safetensors")
        return {"path": str(folder / "model.safetensors"), "upstream_params": _count(model)}
    if name == "xrv-densenet121":
        import torchxrayvision as xrv

        model = xrv.models.DenseNet(weights=None)
        torch.save(model.state_dict(), folder / "xrv_densenet.pth")
        return {"path": str(folder / "xrv_densenet.pth"), "upstream_params": _count(model)}
    if name == "xrv-resnet50":
        import torchvision

        model = torchvision.models.resnet50(num_classes=18, weights=None)
        model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        torch.save(model.state_dict(), folder / "xrv_resnet50.pth")
        return {"path": str(folder / "xrv_resnet50.pth"), "upstream_params": _count(model)}
    raise KeyError(name)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def convert(name: str, path: str) -> dict:
    """Convert and load in this (fresh) process: seconds, peak MB above the post-import state, parameters."""
    import medfm.encoders as enc
    from medfm.encoders.openclip import clip_from_open_clip

    base = _rss_mb()
    t = time.perf_counter()
    if name == "biomedclip":
        model = clip_from_open_clip(path)
        arch = "clip (clip_vit + BERT)"
    else:
        model = enc.create_model_and_transforms(path)[0]  # read, recognise, convert once, build, load strictly
        arch = model.architecture
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_mb": _rss_mb() - base, "medfm_params": _count(model), "architecture": arch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated case names")
    p.add_argument("--keep", default=None, help="folder for the upstream files (default: a temporary one)")
    p.add_argument("--make", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--convert", nargs=2, metavar=("NAME", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make:
        print(json.dumps(make(args.make[0], Path(args.make[1]))))
        return
    if args.convert:
        import warnings

        warnings.simplefilter("ignore")
        print(json.dumps(convert(*args.convert)))
        return
    names = args.only.split(",") if args.only else list(CASES)
    root = Path(args.keep or tempfile.mkdtemp(prefix="medfm_public_"))
    print(f"{'case':<20} {'format':<16} {'medfm encoder':<24} {'convert s':>9} {'peak MB':>8} "
          f"{'upstream':>10} {'medfm':>10}  published")
    for name in names:
        run = lambda *a: json.loads(subprocess.run([sys.executable, __file__, *a], check=True, capture_output=True,  # noqa: E731
                                                   text=True).stdout.strip().splitlines()[-1])
        made = run("--make", name, str(root / name))
        got = run("--convert", name, made["path"])
        fmt, what, published, src = CASES[name]
        print(f"{name:<20} {fmt:<16} {got['architecture']:<24} {got['seconds']:>9.2f} {got['peak_mb']:>8.0f} "
              f"{made['upstream_params'] / 1e6:>9.2f}M {got['medfm_params'] / 1e6:>9.2f}M  {published} {src}".rstrip(),
              flush=True)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(root / name)], check=True)


if __name__ == "__main__":
    main()
