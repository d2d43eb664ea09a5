"""``medfm`` command line: ``info`` and ``encode`` (more commands arrive with their modules)."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("medfm", "torch", "torchvision", "timm", "monai", "open_clip_torch", "transformers", "diffusers",
            "lightning", "torchmetrics", "peft", "nibabel", "pydicom", "safetensors", "huggingface_hub")


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        return f"cuda x{torch.cuda.device_count()} ({', '.join(sorted(names))})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return f"cpu ({torch.get_num_threads()} threads)"


def cmd_info(args: argparse.Namespace) -> int:
    from medfm.encoders import list_encoders
    from medfm.encoders.registry import _REGISTRY
    from medfm.recipes import list_recipes

    print(f"python      {platform.python_version()} ({platform.platform()})")
    for pkg in PACKAGES:
        print(f"{pkg:<16}{_version(pkg)}")
    print(f"device      {device_description()}")
    print("\nencoders (create_encoder(name, spatial_dims=2|3)):")
    for name in list_encoders():
        doc = (_REGISTRY[name].__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<12} {doc}")
    print("\nrecipes:")
    for kind, paths in list_recipes().items():
        print(f"  {kind}/: " + (", ".join(p.name for p in paths) if paths else "(none yet)"))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    import torch

    from medfm.data import load
    from medfm.data.datasets import _finalise
    from medfm.data.samples import mni152
    from medfm.data.transforms import PRESETS
    from medfm.encoders import create_encoder

    path = args.path or mni152("t1")
    t0 = time.perf_counter()
    sample = load(path)
    dims = sample["meta"]["spatial_dims"]
    preset = args.preset or ("mr_3d" if dims == 3 else "radiograph_2d")
    kwargs = {"size": args.size}
    if dims == 3:
        kwargs["spacing"] = args.spacing
    sample = _finalise(PRESETS[preset](**kwargs)(sample))
    t_load = time.perf_counter() - t0
    x = sample["image"][None]
    model = create_encoder(args.encoder, spatial_dims=dims, in_chans=x.shape[1], img_size=args.size,
                           pretrained=args.pretrained).eval()
    with torch.inference_mode():
        t1 = time.perf_counter()
        emb = model(x)
        t_enc = time.perf_counter() - t1
    n_params = sum(p.numel() for p in model.parameters())
    print(f"input      {path}")
    print(f"preset     {preset}: {tuple(x.shape)} (spacing {tuple(round(s, 2) for s in sample['meta']['spacing'])})")
    print(f"encoder    {args.encoder} {dims}D, {n_params / 1e6:.1f}M parameters, {device_description()}")
    print(f"embedding  {tuple(emb.shape)}  (norm {emb.norm().item():.2f})")
    print(f"time       load+preprocess {t_load:.2f} s, encode {t_enc:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfm", description="Medical foundation models: encoders, pretraining, tasks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, registered encoders and recipes")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("encode", help="embed one image or volume with an encoder (default: the MNI152 brain)")
    p.add_argument("path", nargs="?", help="NIfTI, DICOM file/folder, PNG/JPEG (default: nilearn's MNI152 T1)")
    p.add_argument("--encoder", default="vit_small", help="registered encoder name (see `medfm info`)")
    p.add_argument("--pretrained", default=None, help="save_pretrained folder, hub id or weight file")
    p.add_argument("--preset", default=None, help="radiograph_2d | ct_3d | mr_3d (default: by dimension)")
    p.add_argument("--size", type=int, default=96, help="crop/resize size per side (default 96)")
    p.add_argument("--spacing", type=float, default=2.0, help="3D resampling in mm (default 2.0)")
    p.set_defaults(fn=cmd_encode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from medfm.data.errors import DataError

    try:
        return args.fn(args)
    except (DataError, KeyError, ValueError) as e:
        print(f"medfm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
