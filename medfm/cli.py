"""``medfm`` command line: ``info``, ``encode``, ``pretrain`` (every registered method: MAE, DINO, CLIP,
text MLM, dense synthetic; and diffusion generators), ``finetune`` (classification, segmentation, report
generation, visual question answering), ``evaluate RUN`` (any run kind), ``generate`` (sample a generator into a data set),
``generate-report``, ``answer`` (visual question answering), ``chat`` (a multimodal LM), ``synth``, ``quickstart``, ``benchmark`` (label efficiency), ``data`` (public data sets)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from medfm.artifacts import load as medfm_load
from medfm.atomic import write_json, write_text
from medfm.data import DataError, load, open_dataset, read_records, samples
from medfm.data.datasets import finalise_sample
from medfm.data.transforms import preset_mismatch, with_channels
from medfm.encoders import describe_encoder, list_encoders, preprocess_transform
from medfm.encoders.source import encoder_folder
from medfm.tuning import METHODS as ADAPTATIONS
from medfm.finetune import TASKS, load_task_recipe, run_finetune
from medfm.finetune.folds import FOLDS_FILE, evaluate_folds, folds_table, is_folds_run, load_folds, run_folds
from medfm.finetune.segmentation import predict_files, run_postprocessing
from medfm.heads.promptable import RESIZE, PromptableSAM, is_whole_sam, load_promptable, segment_file, write_sam
from medfm.heads.promptable_volume import PromptableVolume, segment_volume
from medfm.finetune.planning import describe, flat_overrides, plan_data, plan_overrides, plan_recipe_text
from medfm.finetune.site_adaptation import SITE_METHODS, SiteAdaptation, adapt_run
from medfm.generate import GENERATORS, export_generated, model_hash
from medfm.pretrain import METHODS
from medfm.select import STRATEGIES
from medfm.select.embeddings import CACHE_DIR as SELECT_CACHE, load_embedder
from medfm.select.curate import run_curation
from medfm.select.duplicates import COSINE, HASH_DISTANCE
from medfm.select.selection import run_selection
from medfm.run import find_recipe, list_recipes, recipe_kind, run_plugin
from medfm.run.recipe import parse_overrides, resume_config
from medfm.run.converted import write_converted
from medfm.run.runner import Stopped
from medfm.run.folder import RECIPE_NAME
from medfm.run.profiles import PROFILES
from medfm.run.trainer import device_description
from medfm.synthetic import SynthConfig, export_synthetic

PACKAGES = ("medfm", "torch", "torchvision", "timm", "monai", "open_clip_torch", "transformers", "lightning", "torchmetrics", "peft", "nibabel", "pydicom", "safetensors", "huggingface_hub")


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    print(f"python      {platform.python_version()} ({platform.platform()})")
    for pkg in PACKAGES:
        print(f"{pkg:<16}{_version(pkg)}")
    print(f"device      {device_description()}")
    print("\nencoders (create_encoder(name, spatial_dims=2|3)):")
    for name in list_encoders():
        print(f"  {name:<12} {describe_encoder(name)}")
    print("\npretraining methods: " + ", ".join(METHODS) + "  (generators: " + ", ".join(GENERATORS) + ")")
    print("fine-tuning tasks:   " + ", ".join(TASKS) + "  (adaptation: " + ", ".join(ADAPTATIONS) + ")")
    print("\nrecipes:")
    for kind, paths in list_recipes().items():
        print(f"  {kind}/: " + (", ".join(p.name for p in paths) if paths else "(none yet)"))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    path = args.path or samples.mni152("t1")
    dims = load(path)["meta"]["spatial_dims"]
    mismatch = preset_mismatch(args.preset, dims) if args.preset else None
    if mismatch:
        raise ValueError(f"{path} is {dims}D; {mismatch}")
    own = bool(args.pretrained) and not args.preset  # a saved encoder brings its preprocessing
    spacing = {"spacing": args.spacing} if dims == 3 and not own else None
    embedder = load_embedder(args.encoder, args.pretrained, args.preset, args.size or (None if own else 96),
                             spatial_dims=dims, preset_args=spacing)
    t0 = time.perf_counter()
    sample = finalise_sample(embedder.transform(load(path)))
    t_load = time.perf_counter() - t0
    x = sample["image"][None]
    with torch.inference_mode():
        t1 = time.perf_counter()
        emb = embedder.model(x)
        t_enc = time.perf_counter() - t1
    n_params = sum(p.numel() for p in embedder.model.parameters())
    print(f"input      {path}")
    print(f"preset     {embedder.preprocess.preset}: {tuple(x.shape)} (spacing {tuple(round(s, 2) for s in sample['meta']['spacing'])})")
    print(f"encoder    {embedder.name} {dims}D, {n_params / 1e6:.1f}M parameters, {device_description()}")
    print(f"embedding  {tuple(emb.shape)}  (norm {emb.norm().item():.2f})")
    print(f"time       load+preprocess {t_load:.2f} s, encode {t_enc:.2f} s")
    return 0


def _overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """``--set`` and trailing ``KEY=VALUE`` overrides, plus ``KEY=value`` for each given flag (``flags``:
    argument name -> recipe key)."""
    out = list(args.set or []) + list(args.overrides or [])
    out += [f"{key}={getattr(args, name)}" for name, key in flags.items() if getattr(args, name) is not None]
    return out


def _rank_zero() -> bool:
    """True in the first (or only) process: print once, not per DDP process."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def _recipe(loader, recipe: str | Path, args: argparse.Namespace, overrides: list[str]) -> tuple[dict, dict | None]:
    """The recipe to run and, when resuming, what it changes: ``--resume`` continues with the run's own
    recipe.yaml and the overrides given now (a changed value needs ``--allow-change KEY``); ``--profile``
    shaped the recipe when the run started and is already in its recipe.yaml."""
    if not args.resume:
        return loader(recipe, overrides, args.profile), None
    data = [f"data.path={args.data}"] if args.data else []
    return resume_config(loader, args.out, [*overrides, *data], allow=args.allow_change or ())


def cmd_pretrain(args: argparse.Namespace) -> int:
    overrides = _overrides(args, {"max_steps": "trainer.max_steps", "devices": "trainer.devices"})
    saved = Path(args.out) / RECIPE_NAME
    recipe = saved if args.resume and saved.exists() else find_recipe(args.recipe, kind=("encoders", "generators"))
    kind = recipe_kind(recipe, among=("pretrain", "generate"))  # read from the recipe: method: mae | diffusion | ...
    cfg, changes = _recipe(kind.load, recipe, args, overrides)
    kind.run(cfg, args.out, data_path=args.data, resume=args.resume, overwrite=args.overwrite,
             changes=changes)  # prints where everything is
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    overrides = _overrides(args, {"max_steps": "trainer.max_steps", "method": "method", "shots": "shots"})
    if args.encoder is not None:
        overrides.append(f"encoder.pretrained={encoder_folder(args.encoder)}")
    if args.plan == "auto" and not args.resume:  # the plan's keys after the profile, the user's overrides last
        given = load_task_recipe(find_recipe(args.recipe, kind="tasks"), overrides)
        if given["task"] != "segmentation":
            raise ValueError(f"--plan auto plans segmentation recipes (segment_2d, segment_3d); {args.recipe} is "
                             f"{given['task']}")
        data = args.data or given["data"]["path"]
        if not data:
            raise ValueError("--plan auto reads the data it plans from: give --data MANIFEST")
        fp, plan = plan_data(data, split=given["data"]["train_split"], mask_key=given["segmentation"]["mask"],
                             profile=args.profile)
        named = [o for o in overrides if o.startswith("segmentation.network=")]  # the user's choice stands
        print(f"planned from {fp.n_cases} training cases: spacing {plan.spacing}, patch {plan.patch}, "
              f"{plan.num_classes} classes, {plan.normalization} normalisation, network "
              + (named[-1].split("=", 1)[1] if named else "auto"))
        overrides = flat_overrides(plan_overrides(plan)) + overrides
    if args.folds is not None:  # K runs and their ensemble; a resumed one continues with the recipe it started with
        saved = Path(args.out) / FOLDS_FILE
        info = json.loads(saved.read_text()) if args.resume and saved.exists() else None
        cfg = info["recipe"] if info else load_task_recipe(find_recipe(args.recipe, kind="tasks"), overrides, args.profile)
        group = info.get("group") if info else args.fold_by
        out = run_folds(cfg, args.out, args.folds, data_path=args.data, resume=args.resume, overwrite=args.overwrite,
                        group=group)
        print(f"ensemble of {args.folds} folds: {out} (medfm predict {out} IMAGE... --out DIR)")
        return 0
    cfg, changes = _recipe(load_task_recipe, find_recipe(args.recipe, kind="tasks"), args, overrides)
    out = run_finetune(cfg, args.out, data_path=args.data, resume=args.resume, overwrite=args.overwrite, changes=changes)
    if _rank_zero():
        metrics = json.loads((out / "metrics.json").read_text())
        print("\n".join(TASKS.get_plugin(cfg["task"]).summary(metrics)) + f"\nmetrics: {out / 'metrics.json'}")
    return 0


# `medfm evaluate` flags -> the option names plug-ins declare (``RunPlugin.evaluate_options``)
EVALUATE_FLAGS = {"data": "--data", "split": "--split", "out": "--out", "label": "--label", "classes": "--classes",
                  "text": "--text", "templates": "--prompt", "n": "--n", "features": "--features",
                  "classify": "--classify", "overrides": "KEY=VALUE", "groups": "--groups", "robustness": "--robustness",
                  "mirror": "--mirror"}


def _evaluate_options(args: argparse.Namespace) -> dict:
    """The options the user gave ``medfm evaluate``, by the name plug-ins declare."""
    given = {"data": args.data, "out": args.out, "label": args.label, "text": args.text, "templates": args.prompt,
             "n": args.n, "features": args.features, "classify": args.classify, "robustness": args.robustness,
             "classes": [c for c in args.classes.split(",") if c] if args.classes else None,
             "groups": [c for c in args.groups.split(",") if c] if args.groups else None,
             "overrides": list(args.overrides) if args.overrides else None, "mirror": args.mirror or None}
    if args.split is not None:
        given["split"] = None if args.split in ("", "all") else args.split
    return {k: v for k, v in given.items() if v is not None or k == "split"}


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.mode == "zero-shot":  # the older spelling of `medfm evaluate CLIP_RUN`
        args.run = args.run or args.model
        if not args.run or not args.data:
            raise SystemExit("medfm evaluate zero-shot: give --model RUN (a CLIP run) and --data MANIFEST")
    run = args.run or (args.mode if args.mode not in (None, "zero-shot") else None)
    if not run:
        raise SystemExit("medfm evaluate: give a run folder (medfm evaluate RUN, or --run RUN)")
    run = Path(run)
    options = _evaluate_options(args)
    if is_folds_run(run):  # a K-fold run: its ensemble
        other = [EVALUATE_FLAGS[o] for o in options if o not in ("data", "split", "out")]
        if other:
            raise ValueError(f"{', '.join(other)} does not apply to {run} (the folds of a segmentation run); its "
                             "evaluation takes --data, --split, --out")
        print(folds_table(evaluate_folds(run, split=options.get("split"), data=options.get("data"),
                                         out=options.get("out"))))
        return 0
    plugin = run_plugin(run)
    unknown = plugin.unknown_evaluate_options(options)
    if unknown:
        takes = ", ".join(EVALUATE_FLAGS[o] for o in plugin.evaluate_options)
        raise ValueError(f"{', '.join(EVALUATE_FLAGS[o] for o in unknown)} does not apply to {run} (a {plugin.kind} "
                         f"run of {plugin.name}); its evaluation takes {takes or 'no options'}")
    metrics = plugin.evaluate(run, **options)
    print("\n".join(plugin.summary(metrics)))
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    overrides = parse_overrides(_overrides(args, {}))
    for key, flag in (("params", args.params), ("collapse_share", args.collapse_share)):
        if flag is not None:
            overrides.setdefault("site_adaptation", {})[key] = flag
    out = adapt_run(args.run, args.out, args.method, args.data, args.split, args.steps, args.lr, resume=args.resume,
                    overwrite=args.overwrite, overrides=overrides)
    metrics = json.loads((out / "metrics.json").read_text())
    print("\n".join(SiteAdaptation(metrics["task"]).summary(metrics)) + f"\nadapted run: {out} (medfm evaluate {out} "
          f"--data {args.data} --split {args.split})")
    return 0


def _cycle(items: list, n: int | None) -> list:
    """``items`` repeated in turn up to ``n`` (default: each once)."""
    return [items[i % len(items)] for i in range(n or len(items))]


def cmd_generate(args: argparse.Namespace) -> int:
    generator = medfm_load(args.model)
    if not hasattr(generator, "generate") or not hasattr(generator, "conditioning"):
        raise ValueError(f"{args.model}: a {type(generator).__name__}, not a diffusion generator")
    cond: dict = {}
    if args.classes:
        names = generator.spec.class_names or []
        classes = names if args.classes == "all" else [c.strip() for c in args.classes.split(",") if c.strip()]
        generator.class_indices(classes)  # unknown names fail before anything is generated
        cond["classes"] = _cycle(classes, args.n)
    if args.prompt:
        cond["prompts"] = _cycle(list(args.prompt), args.n)
    if args.masks:
        masks_ds = open_dataset(args.masks, spatial_dims=generator.spec.spatial_dims)
        paths = [masks_ds.describe(i) for i in range(len(masks_ds))]
        order = _cycle(list(range(len(masks_ds))), args.n)
        cond["masks"] = [masks_ds[i]["image"].round().long() for i in order]
        cond["mask_sources"] = [paths[i] for i in order]
    if not cond and generator.conditioning != "none":
        raise ValueError(f"{args.model} is {generator.conditioning}-conditioned: give "
                         + {"class": "--classes", "text": "--prompt", "mask": "--masks DIR"}[generator.conditioning])
    manifest = export_generated(generator, args.out, **cond, n=args.n, seed=args.seed, steps=args.steps,
                                sampler=args.sampler, guidance_scale=args.guidance, batch_size=args.batch_size,
                                model=model_hash(args.model))
    print(f"wrote {manifest} (grid: {manifest.parent / 'grid.png'}); use it as data: --data {manifest}")
    return 0


def cmd_generate_report(args: argparse.Namespace) -> int:
    model = medfm_load(args.model)
    if hasattr(model, "answer_image"):  # a multimodal LM writes the report it is asked for
        generation = {"num_beams": args.beams} if args.beams else {}
        for path in args.images:
            print(f"{path}: {model.answer_image(path, model.report_prompt(), **generation)}")
        return 0
    if not hasattr(model, "generate_from_memory"):
        raise ValueError(f"{args.model}: a {type(model).__name__}, not a report-generation model")
    transform = preprocess_transform(model.spec["preprocess"])
    generation = dict(model.spec["head"].get("generation", {}), **({"num_beams": args.beams} if args.beams else {}))
    for path in args.images:
        sample = finalise_sample(transform(load(path)))
        print(f"{path}: {model.generate(sample['image'][None], **generation)[0]}")
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    """``medfm answer --model RUN IMAGE "QUESTION"``: the classifier's answer and its probability, and the
    decoder's open-ended answer where the model has one."""
    if not args.question.strip():
        raise ValueError("the question is empty: give it as the second argument, e.g. \"Is there a pneumothorax?\"")
    model = medfm_load(args.model)
    if hasattr(model, "answer_image"):  # a multimodal LM: free text
        print(f"answer: {model.answer_image(args.image, args.question)}")
        return 0
    if not hasattr(model, "generate_answers"):
        raise ValueError(f"{args.model}: a {type(model).__name__}, not a visual question answering model "
                         "(medfm finetune tasks/vqa_2d.yaml)")
    transform = with_channels(preprocess_transform(model.spec["preprocess"]), model.spec["encoder"]["in_chans"])
    image = finalise_sample(transform(load(args.image, spatial_dims=model.spec["encoder"]["spatial_dims"])))["image"][None]
    answer, score = model.answer(image, [args.question])
    print(f"answer: {answer[0]}  (score {score[0]:.3f})")
    if model.decoder is not None:
        print(f"open-ended: {model.generate_answers(image, [args.question], **model.spec['head'].get('generation', {}))[0]}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """``medfm chat --model RUN IMAGE``: several turns about one image with a multimodal-LM run (one question per
    line on standard input; an empty line or end of input stops)."""
    model = medfm_load(args.model)
    if not hasattr(model, "answer_image"):
        raise ValueError(f"{args.model}: a {type(model).__name__}, not a multimodal LM (medfm finetune tasks/mllm_2d.yaml)")
    image = model.read_image(args.image)
    turns: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        turns.append({"from": "human", "value": line.strip()})
        reply = model.answer([turns], image)[0]
        turns.append({"from": "gpt", "value": reply})
        print(f"model: {reply}", flush=True)


def cmd_export(args: argparse.Namespace) -> int:
    """``medfm export RUN --out DIR``: a multimodal-LM run as a transformers LLaVA folder (LoRA merged)."""
    from medfm.heads.llava_export import to_llava

    model = medfm_load(args.run)
    if not hasattr(model, "answer_image"):
        raise ValueError(f"{args.run}: a {type(model).__name__}; `medfm export` writes multimodal-LM runs "
                         "(medfm finetune tasks/mllm_2d.yaml) as LLaVA folders")
    to_llava(model, args.out)
    print(f"wrote {args.out}: LlavaForConditionalGeneration (vision tower, projector, LM with LoRA merged), "
          "tokenizer and image processor: transformers' LlavaForConditionalGeneration.from_pretrained reads it")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    cfg = SynthConfig(spatial_dims=args.dims, size=args.size, n_labels=args.labels, kind=args.kind)
    manifest = export_synthetic(cfg, args.n, args.out, seed=args.seed)
    print(f"wrote {args.n} samples: {manifest} (contact sheet: {manifest.parent / 'contact_sheet.png'})")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from medfm.quickstart import quickstart

    data = {}
    for item in args.data or []:
        key, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--data {item!r}: give STEP=PATH (e.g. --data segment_3d=volumes.csv)")
        data[key] = path
    steps = tuple(s for s in (args.steps or "").split(",") if s) or None
    quickstart(args.out, fast=args.fast, data=data, label=args.label, **({"steps": steps} if steps else {}))
    return 0


def _pairs(items, flag: str, example: str) -> dict[str, str]:
    """``NAME=VALUE`` command-line items as a dict (a clear error naming the flag otherwise)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{flag} {item!r}: give NAME=VALUE (e.g. {flag} {example})")
        out[key] = value
    return out


def cmd_benchmark(args: argparse.Namespace) -> int:
    from medfm.benchmark import LabelEfficiency, default_tasks

    budget: dict[str, int] = {}
    for item in args.pretrain_budget.split(","):
        key, sep, value = item.rpartition("=")
        budget[key if sep else "default"] = int(value)
    steps = {k: int(v) for k, v in _pairs(args.finetune_steps, "--finetune-steps", "lora=200").items()}
    data = _pairs(args.data, "--data", "pneumonia=pneumoniamnist.npz")
    tasks = args.tasks.split(",") if args.tasks else default_tasks(data)
    LabelEfficiency(args.out, data, tasks, args.inits.split(","), args.methods.split(","), args.shots.split(","),
                    [int(s) for s in args.seeds.split(",")], budget, steps,
                    None if args.profile == "none" else args.profile,
                    _pairs(args.encoder, "--encoder", "mae=runs/gpu_mae"), args.pool,
                    overrides=parse_overrides(args.set or []), strategies=args.strategies.split(",")).run()
    return 0


def _run_options(p: argparse.ArgumentParser, fn) -> None:
    """What every recipe-driven training command takes besides its own flags: step budget, resume, and
    recipe overrides (``--set KEY=VALUE`` or bare ``KEY=VALUE``)."""
    p.add_argument("--max-steps", type=int, default=None, help="sets trainer.max_steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with "
                   "the run's own recipe.yaml (overrides that change it need --allow-change)")
    p.add_argument("--allow-change", action="append", metavar="KEY", help="with --resume: let an override change "
                   "this saved recipe key (recorded in run.json; trainer.max_steps and the like are always allowed)")
    p.add_argument("--overwrite", action="store_true", help="replace the run outputs already in --out")
    p.add_argument("--profile", default=None, choices=tuple(PROFILES),
                   help="shrink the recipe to a machine: cpu = ViT-Tiny/8, 64 px or 32^3 at 3 mm, 500 steps; tiny = "
                        "ViT-Micro, 4 steps, a smoke test (recipes default to GPU scale; KEY=VALUE overrides still win)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override (repeatable)")
    p.set_defaults(fn=fn, takes_overrides=True)


def _quickstart_parser(sub) -> None:
    """``medfm quickstart``."""
    p = sub.add_parser("quickstart", help="the main job end to end at a small scale, no data or network needed "
                       "(~9 min on a 2-core CPU; --fast: ~1 min)",
                       epilog="steps: pretrain_3d (synthesis engine), segment_3d (MNI152 tissue vs random init), "
                              "pretrain_2d (MAE), probe_2d (vs random init), report (report generation), diffusion")
    p.add_argument("--out", default="runs/quickstart", help="folder: report.md, summary.png, one run folder per step "
                   "(an earlier quickstart there is replaced)")
    p.add_argument("--fast", action="store_true", help="a few steps each (~15 s): shows that everything runs")
    p.add_argument("--data", action="append", metavar="STEP=PATH", help="your own data for a step: segment_3d=MANIFEST "
                   "(image, mask, split), images_2d=NPZ|MANIFEST (with --label), report=MANIFEST (image, text, split)")
    p.add_argument("--label", default="level", help="images_2d manifests: the label column (default: level)")
    p.add_argument("--steps", default=None, help="comma-separated subset of the steps (the encoders they need run too)")
    p.set_defaults(fn=cmd_quickstart)


def _benchmark_parser(sub) -> None:
    """``medfm benchmark``."""
    p = sub.add_parser("benchmark", help="label efficiency: K labelled examples per class, every encoder init against "
                       "random init, mean +- std over seeds (tables + one plot per task)",
                       epilog="tasks: pneumonia (needs --data pneumonia=NPZ), medpix_region, medpix_modality (--data "
                              "medpix=MANIFEST), breastmnist (--data breastmnist=NPZ), breast_us (--data "
                              "breast_us=MANIFEST), mni_tissue (nilearn's MNI152, no data). Finished runs in --out are kept.")
    p.add_argument("--data", action="append", metavar="NAME=PATH", help="pneumonia=pneumoniamnist.npz, "
                   "medpix=medpix2/manifest.csv (repeatable)")
    p.add_argument("--tasks", default=None, help="comma-separated (default: those whose data is given, and mni_tissue)")
    p.add_argument("--inits", default="random,mae,dino,clip,synth", help="encoder inits (default: all); any name given "
                   "with --encoder too")
    p.add_argument("--encoder", action="append", metavar="INIT=PATH", help="use these weights for an init instead of "
                   "pretraining here (a run or encoder folder, or a weight file such as a timm checkpoint; INIT@DOMAIN "
                   "for one domain)")
    p.add_argument("--methods", default="linear_probe,lora", help="adaptations (default: linear_probe,lora); probe: "
                   "a logistic regression on frozen embeddings, seconds a cell")
    p.add_argument("--strategies", default="balanced", help="which K get labels: balanced (K per class at random, the "
                   "default) and medfm select's random, kmeans, typiclust, probcover, coreset (K x classes, no labels)")
    p.add_argument("--shots", default="1,5,10,25,100,all", help="labelled examples per class (MNI: one slab vs all)")
    p.add_argument("--seeds", default="0,1,2", help="few-shot draws / fine-tuning seeds (default: 0,1,2)")
    p.add_argument("--pretrain-budget", default="500", help="pretraining steps of every encoders/ recipe, or per init: "
                   "500,dino=150 (default 500)")
    p.add_argument("--finetune-steps", action="append", metavar="METHOD=STEPS", help="fine-tuning steps per method "
                   "(default: the profile's; e.g. lora=200)")
    p.add_argument("--profile", default="cpu", choices=(*PROFILES, "none"), help="size profile of every recipe "
                   "(default cpu: ViT-Tiny/8 at 64 px / 32^3; none: the recipes' GPU scale)")
    p.add_argument("--pool", default="avg", choices=("avg", "token"), help="the frozen features every init is read out "
                   "with (default avg: mean of the patch tokens)")
    p.add_argument("--set", action="append", metavar="pretrain.KEY=VALUE", help="override in every pretraining "
                   "(pretrain.KEY=VALUE) or fine-tuning (finetune.KEY=VALUE) recipe, e.g. finetune.optim.lr=1e-2; "
                   "repeatable. A finished run in --out trained otherwise is an error: give a new --out")
    p.add_argument("--out", default="runs/label_efficiency", help="folder: results.csv, label_efficiency.md, <task>.png, "
                   "pretrain/ and finetune/ run folders")
    p.set_defaults(fn=cmd_benchmark)


def cmd_suite(args: argparse.Namespace) -> int:
    from medfm.suite import run_suite

    run_suite(args.encoders, args.out, args.suite, args.data_root, [int(s) for s in args.seeds.split(",")], args.size,
              args.tasks.split(",") if args.tasks else None, cache=None if args.no_cache else SELECT_CACHE)
    return 0


def _suite_parser(sub) -> None:
    """``medfm suite``."""
    p = sub.add_parser("suite", help="score encoders on a downstream suite with frozen features: linear probe and k-NN "
                       "at 1 / 10 / all labels per class, zero-shot, a segmentation probe; two or more: compared",
                       epilog="ENCODER: a run or encoder folder, a public model (file, folder, hf:ORG/NAME), medfm:tiny-2d, "
                              "random or random:NAME (random init). The default suite: PneumoniaMNIST, BreastMNIST, "
                              "BUS-BRA, MedPix modality / region / plane, LGG FLAIR (medfm/evaluate/suites/default_2d.yaml)")
    p.add_argument("encoders", nargs="+", metavar="ENCODER", help="the encoders (the first is the reference of the "
                   "comparison)")
    p.add_argument("--suite", default="default", help="a suite YAML file, or a medfm suite name (default)")
    p.add_argument("--data-root", default=None, help="the folder the suite's data paths are relative to (default "
                   "$MEDFM_SUITE_DATA; sets prepared by `medfm data prepare` are found too)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
    p.add_argument("--seeds", default="0,1,2", help="few-shot draws / probe seeds (default 0,1,2)")
    p.add_argument("--size", type=int, default=None, help="input size (default: the encoder's recorded one; random: 64)")
    p.add_argument("--no-cache", action="store_true", help="compute embeddings again instead of reading the cache")
    p.add_argument("--out", default="runs/suite", help="folder: suite.md, suite.csv, suite.png, compare.md")
    p.set_defaults(fn=cmd_suite)


def cmd_models(args: argparse.Namespace) -> int:
    from medfm.encoders.formats import convert_checkpoint, identify, list_formats, nearest_format, open_checkpoint
    from medfm.encoders.language_model import list_language_models
    from medfm.encoders.shipped import list_shipped

    words = list(args.words)
    if not words:
        print("public models medfm reads (encoder.pretrained= / --encoder FILE|FOLDER|hf:ORG/NAME):\n")
        for f in list_formats():
            print(f"{f.name}  -> encoder {f.architecture!r}\n  source      {f.source}\n  preprocess  {f.preprocess}"
                  f"\n  license     {f.license}\n  example     {f.example}\n")
        print("also: timm state dicts of medfm's ViT / ResNet sizes, and every medfm encoder or run folder "
              "(docs/checkpoints.md)")
        print("\nencoders shipped with medfm (--encoder medfm:NAME, no network):\n")
        for name, what, where in list_shipped():
            print(f"{name}  {what}\n  folder      {where}\n")
        print("\nlanguage models (mllm.language_model=; also a transformers causal-LM folder, hf:ORG/NAME or a .gguf file):\n")
        for name, what, where in list_language_models():
            print(f"{name}  {what}\n  file        {where}\n")
        return 0
    if words[0] == "convert":
        if len(words) != 2 or not args.out:
            raise SystemExit("medfm models convert: give one checkpoint and --out FOLDER")
        out = (write_sam(words[1], Path(args.out), args.resize) if is_whole_sam(words[1])
               else write_converted(words[1], Path(args.out)))
        print(f"converted {words[1]} -> {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
        return 0
    if len(words) != 1:
        raise SystemExit("medfm models: give one checkpoint (or: medfm models convert CHECKPOINT --out FOLDER)")
    ckpt = open_checkpoint(words[0])
    fmt = identify(ckpt)
    if fmt is None:
        raise ValueError(f"{words[0]}: no public format fits; {nearest_format(ckpt)}")
    converted = convert_checkpoint(ckpt)
    n = sum(v.numel() for v in converted.state_dict.values())
    print(f"{words[0]}: {fmt.name} ({fmt.source})")
    print(f"encoder     {converted.architecture}({', '.join(f'{k}={v!r}' for k, v in converted.args.items())})")
    print(f"parameters  {n / 1e6:.2f}M")
    print(f"preprocess  {converted.preprocess}")
    print(f"license     {fmt.license}")
    return 0


def _models_parser(sub) -> None:
    """``medfm models``."""
    p = sub.add_parser("models", help="public foundation models medfm reads (DINOv2, RAD-DINO, BiomedCLIP, SAM, "
                       "SwinUNETR-SSL, CT-FM, torchxrayvision), which one a checkpoint is, or convert one")
    p.add_argument("words", nargs="*", metavar="CHECKPOINT | convert CHECKPOINT",
                   help="a weight file, a folder or hf:ORG/NAME: its format, the encoder it becomes and its "
                        "preprocessing; `convert CHECKPOINT --out FOLDER` writes it as medfm folders")
    p.add_argument("--out", default=None, help="convert: the folder to write")
    p.add_argument("--resize", default=None, choices=RESIZE, help="convert, a whole SAM: its input convention "
                   "(longest: SAM's resize-longest-side, pixel mean / std, padding; square: MedSAM's [0, 1] square "
                   "resize; square_norm: SAM-Med2D's square resize with pixel mean / std; default: square when the "
                   "file's name says medsam, square_norm for SAM-Med2D's name or adapters, else longest)")
    p.set_defaults(fn=cmd_models)


def _points(values: list[str], dims: int = 2) -> tuple[list[list[float]], list[int]]:
    """``--point x,y[,label]`` (``i,j,k[,label]`` for a native 3D model: ``dims`` 3) values as coordinates and
    labels (1 foreground by default, 0 background)."""
    coords, labels = [], []
    form = "x,y" if dims == 2 else "i,j,k"
    for v in values:
        parts = [float(t) for t in v.split(",")]
        if len(parts) not in (dims, dims + 1) or (len(parts) == dims + 1 and parts[dims] not in (0, 1)):
            raise ValueError(f"--point {v}: give {form} or {form},label with label 1 (foreground) or 0 (background)")
        coords.append(parts[:dims])
        labels.append(int(parts[dims]) if len(parts) == dims + 1 else 1)
    return coords, labels


def segment_manifest(args: argparse.Namespace) -> int:
    """``medfm segment --model M --data MANIFEST``: every object of a split scored with simulated prompts."""
    from medfm.finetune.promptable import evaluate_prompted, mask_values

    if args.image or args.box or args.point:
        raise ValueError("--data scores a manifest with prompts simulated from its masks: give no IMAGE, --box or --point")
    model = load_promptable(args.model, resize=args.resize)
    if isinstance(model, PromptableVolume):
        raise ValueError(f"{args.model}: a native 3D model is scored with simulated clicks by its task: medfm evaluate "
                         f"RUN --data {args.data} --split {args.split}")
    ds = open_dataset(args.data, split=args.split, spatial_dims=2, mask_key=args.mask)
    head = model.spec.get("head", {})
    classes = head.get("classes") or sorted({v for vs in mask_values(ds, args.split or "manifest") for v in vs} - {0.0})
    names = head.get("class_names") or [f"class {c:g}" for c in classes]
    clicks = [int(c) for c in args.clicks.split(",")]
    out, split = Path(args.out), args.split or "all"
    res = evaluate_prompted(model, ds, classes, names, out, split, clicks, args.jitter, args.max_objects)
    write_json(out / "metrics.json", {"model": str(args.model), "data": str(args.data), "split": args.split, **res})
    print(f"{res['n']} objects: box Dice {res['box_dice']:.4f}, "
          + ", ".join(f"{c} click{'s' if c > 1 else ''} {res[f'click_{c}_dice']:.4f}" for c in clicks)
          + f"; {out / 'metrics.json'}, {out / f'prompted_{split}.html'}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    if args.data:
        return segment_manifest(args)
    if not args.image:
        raise ValueError("medfm segment needs an IMAGE (or --data MANIFEST to score a split with simulated prompts)")
    model = load_promptable(args.model, resize=args.resize)
    if isinstance(model, PromptableVolume):  # native 3D: clicks (i, j, k) in the volume
        if args.box or args.slice is not None or not args.point:
            raise ValueError(f"{args.model}: a native 3D model is prompted by clicks in the volume: --point i,j,k[,label] "
                             "(voxel indices of the input), no --box or --slice")
        points, labels = _points(args.point, dims=3)
        out = segment_volume(model, args.image, args.out, points, labels)
        print(f"mask: {args.out} ({int(out['mask'].sum())} voxels of {out['mask'].size}; the input's affine and grid)")
        return 0
    box = [float(t) for t in args.box.split(",")] if args.box else None
    if box is not None and (len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]):
        raise ValueError(f"--box {args.box}: give x0,y0,x1,y1 with x1 > x0 and y1 > y0 (the input's pixels)")
    points, labels = _points(args.point or [])
    if box is None and not points:
        raise ValueError("medfm segment needs a prompt: --box x0,y0,x1,y1 and / or --point x,y[,label] ...")
    volume = str(args.image).lower().endswith((".nii", ".nii.gz"))
    if not volume and not str(args.out).lower().endswith(".png"):
        raise ValueError(f"--out {args.out}: the mask is written as a PNG (mask.png)")
    if volume and args.slice is None:
        raise ValueError(f"{args.image}: a volume needs --slice K (the slice of the last voxel axis the prompt is on)")
    out = segment_file(model, args.image, args.out, box=box, points=points or None, labels=labels or None,
                       multimask=args.multimask, index=args.slice)
    if volume:
        sl = out["slices"]
        print(f"mask: {args.out} ({int(out['mask'].sum())} voxels on {len(sl)} slices"
              + (f", {sl[0]}..{sl[-1]}" if sl else "") + f" of {out['mask'].shape[2]}; the input's affine)")
        return 0
    best, mask = out["best"], out["mask"]
    ious = ", ".join(f"{v:.3f}" for v in out["iou"].tolist())
    print(f"mask: {args.out} ({int(mask.sum())} of {mask.size} pixels, {mask.shape[1]} x {mask.shape[0]}); predicted "
          f"IoU {ious}" + (f" (mask {best} of {len(out['iou'])} written)" if args.multimask else ""))
    return 0


def _segment_parser(sub) -> None:
    """``medfm segment``."""
    p = sub.add_parser("segment", help="promptable segmentation with a SAM / MedSAM model: a box or points on "
                       "an image, a mask at the image's size",
                       epilog="example: medfm segment --model sam_vit_b.pth scan.png --box 40,60,120,150 --out mask.png")
    p.add_argument("image", nargs="?", help="a 2D image (PNG, JPEG, ...), or a NIfTI volume with --slice (propagated "
                   "slice by slice)")
    p.add_argument("--model", required=True, help="a SAM / MedSAM checkpoint, its `medfm models convert` folder, or "
                   "a promptable fine-tuning run (tasks/promptable_2d.yaml, or tasks/promptable_3d.yaml: clicks in a "
                   "volume)")
    p.add_argument("--slice", type=int, default=None, help="volumes: the slice (index along the last voxel axis) the "
                   "prompt is on; x, y are the first and second voxel indices")
    p.add_argument("--box", default=None, help="x0,y0,x1,y1 in the image's pixels")
    p.add_argument("--point", action="append", default=None, help="x,y[,label] in the image's pixels (label 1: "
                   "foreground, the default; 0: background); a native 3D model (tasks/promptable_3d.yaml): i,j,k[,label] "
                   "voxel indices of the volume; repeatable")
    p.add_argument("--multimask", action="store_true", help="three candidate masks; the one with the highest "
                   "predicted IoU is written")
    p.add_argument("--resize", default=None, choices=RESIZE, help="a checkpoint's input convention (see medfm "
                   "models convert --resize)")
    p.add_argument("--data", default=None, help="instead of an image: a segmentation manifest whose objects are "
                   "scored with simulated prompts (a jittered box, then clicks); --out is then a folder")
    p.add_argument("--split", default="val", help="--data: the split scored (default val)")
    p.add_argument("--mask", default="mask", help="--data: the manifest column of the label maps")
    p.add_argument("--clicks", default="1,3,5,10", help="--data: click counts scored (default 1,3,5,10)")
    p.add_argument("--jitter", type=int, default=5, help="--data: box sides moved outward 0..N pixels (default 5)")
    p.add_argument("--max-objects", type=int, default=None, help="--data: score at most this many objects")
    p.add_argument("--out", required=True, help="the mask (PNG, 0 / 255, the image's size; a volume's: NIfTI, 0 / 1, "
                   "the input's affine); with --data a folder (metrics.json, prompted_SPLIT.html)")
    p.set_defaults(fn=cmd_segment)


def _info_parser(sub) -> None:
    """``medfm info``."""
    p = sub.add_parser("info", help="versions, device, registered encoders and recipes")
    p.set_defaults(fn=cmd_info)


def _encode_parser(sub) -> None:
    """``medfm encode``."""
    p = sub.add_parser("encode", help="embed one image or volume with an encoder (default: the MNI152 brain)")
    p.add_argument("path", nargs="?", help="NIfTI, DICOM file/folder, PNG/JPEG (default: nilearn's MNI152 T1)")
    p.add_argument("--encoder", default="vit_small", help="registered encoder name (see `medfm info`)")
    p.add_argument("--pretrained", default=None, help="save_pretrained folder, hub id or weight file")
    p.add_argument("--preset", default=None, help="radiograph_2d | ct_3d | mr_3d (default: by dimension)")
    p.add_argument("--size", type=int, default=None, help="crop/resize size per side (default: what --pretrained "
                   "recorded, else 96)")
    p.add_argument("--spacing", type=float, default=2.0, help="3D resampling in mm (default 2.0)")
    p.set_defaults(fn=cmd_encode)


def _pretrain_parser(sub) -> None:
    """``medfm pretrain``."""
    p = sub.add_parser("pretrain", help=f"pretraining ({', '.join(METHODS)}) from a recipe in encoders/, or a diffusion "
                       "generator from a recipe in generators/",
                       epilog="Any recipe key can be overridden: KEY=VALUE, e.g. mae.mask_ratio=0.6 data.batch_size=32")
    p.add_argument("recipe", help="recipe file or name, e.g. encoders/mae_vit_2d.yaml, mae_vit_2d or diffusion_2d")
    p.add_argument("--data", default=None, help="npz, CSV/JSONL manifest or folder (sets data.path)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, logs, encoder/")
    p.add_argument("--devices", type=int, default=None, help="sets trainer.devices (>1: DDP)")
    _run_options(p, cmd_pretrain)


def _finetune_parser(sub) -> None:
    """``medfm finetune``."""
    p = sub.add_parser("finetune", help=f"fine-tune an encoder on a task ({', '.join(TASKS)}) from a recipe in tasks/",
                       epilog="Any recipe key can be overridden: KEY=VALUE, e.g. optim.lr=3e-4 lora.r=4")
    p.add_argument("recipe", help="recipe file or name, e.g. tasks/classify_2d.yaml or classify_2d")
    p.add_argument("--encoder", default=None,
                   help="pretrained encoder: a pretraining run, a save_pretrained folder, a weight file or "
                        "timm:<name> (default: the recipe's encoder.pretrained; none: random init)")
    p.add_argument("--data", default=None, help="npz or CSV/JSONL manifest with splits (sets data.path)")
    p.add_argument("--out", required=True, help="run folder: metrics.json, figures, model, checkpoints")
    p.add_argument("--method", default=None, help="linear_probe | full | lora | vpt | ssf | bitfit (sets method)")
    p.add_argument("--shots", type=int, default=None, help="few-shot: K training examples per class")
    p.add_argument("--plan", default=None, choices=("auto",), help="segmentation: plan spacing, patch, network, "
                   "normalisation and classes from the data (see `medfm plan`); a --profile then only shrinks "
                   "width and steps")
    p.add_argument("--folds", type=int, default=None, help="segmentation: train K folds of the training split "
                   "(OUT/fold_k, each validated on its part) and score their ensemble on the validation split; "
                   "medfm predict OUT ensembles them")
    p.add_argument("--fold-by", default=None, metavar="COLUMN", help="with --folds: a manifest column whose rows "
                   "stay in one fold (e.g. patient, for 2D slices)")
    _run_options(p, cmd_finetune)


def cmd_plan(args: argparse.Namespace) -> int:
    fp, plan = plan_data(args.data, split=args.split or None, mask_key=args.mask, max_cases=args.max_cases,
                         profile=args.profile)
    recipe = find_recipe("segment_3d" if plan.spatial_dims == 3 else "segment_2d", kind="tasks")
    cfg = load_task_recipe(recipe, [*flat_overrides(plan_overrides(plan)), f"data.path={Path(args.data).resolve()}",
                                    f"segmentation.mask={args.mask}"])
    print(describe(fp, plan))
    if args.out:
        write_text(Path(args.out), plan_recipe_text(fp, plan, cfg))
        print(f"recipe: {args.out}  (medfm finetune {args.out} --out runs/planned [--profile cpu])")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if is_folds_run(run):  # a K-fold run: the ensemble of its folds, with the filter most of them chose
        model, keep = load_folds(run)
    else:
        model = medfm_load(run / "model" if (run / "model" / "config.json").exists() else run)
        keep = run_postprocessing(run)
    if not hasattr(model, "num_classes") or "preprocess" not in getattr(model, "spec", {}):
        hint = ("; a promptable model segments from prompts: medfm segment --model RUN IMAGE --box x0,y0,x1,y1 --out mask.png"
                if isinstance(model, PromptableSAM) else
                "; a native 3D promptable model segments from clicks: medfm segment --model RUN VOLUME --point i,j,k --out "
                "mask.nii.gz" if isinstance(model, PromptableVolume) else "")
        raise ValueError(f"{args.run}: a {type(model).__name__}, not a segmentation run (medfm finetune "
                         f"tasks/segment_*.yaml){hint}")
    paths = list(args.images)
    if args.data:
        paths += [r.image for r in read_records(args.data, split=args.split or None)[0]]
    if not paths:
        raise ValueError("nothing to predict: give IMAGE paths or --data MANIFEST [--split SPLIT]")
    keep = [] if args.no_postprocess else keep
    written = predict_files(model, paths, args.out, probabilities=args.probabilities, overlap=args.overlap,
                            mirror=args.mirror, largest_component_of=keep, progress="predicting")
    post = f"; largest component kept for {', '.join(keep)} (chosen on validation)" if keep else ""
    print(f"{len(paths)} label maps in {args.out} (each in its input's space){post}, last: {written[-1].name}")
    return 0


def _predict_parser(sub) -> None:
    """``medfm predict``."""
    p = sub.add_parser("predict", help="label maps from a segmentation run, one per image, in each input's own space",
                       epilog="example: medfm predict runs/seg3d scan.nii.gz --out predictions | medfm predict "
                              "runs/seg3d --data volumes.csv --split val --out predictions")
    p.add_argument("run", help="a segmentation run folder (or its model/ folder, or a --folds run: the ensemble)")
    p.add_argument("images", nargs="*", help="NIfTI volumes, DICOM folders or 2D images")
    p.add_argument("--data", default=None, help="a manifest: predict its images (with --split, one split)")
    p.add_argument("--split", default=None, help="the manifest split to predict (default: every row)")
    p.add_argument("--out", required=True, help="folder: NAME_seg.nii.gz (NAME_seg.png in 2D) per input")
    p.add_argument("--probabilities", action="store_true", help="also NAME_probs.nii.gz (class probabilities)")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default 0.25)")
    p.add_argument("--mirror", action="store_true", help="test-time mirroring over every axis (nnU-Net's; 4x the "
                   "time in 2D, 8x in 3D)")
    p.add_argument("--no-postprocess", action="store_true", help="skip the largest-component filter the run's "
                   "validation chose")
    p.set_defaults(fn=cmd_predict)


def _plan_parser(sub) -> None:
    """``medfm plan``."""
    p = sub.add_parser("plan", help="fingerprint a segmentation manifest and plan its run as nnU-Net does "
                       "(spacing, patch, network depth, normalisation, classes)",
                       epilog="example: medfm plan data/msd_hippocampus/manifest.csv --out hippocampus.yaml")
    p.add_argument("data", help="CSV/JSONL manifest with image and mask columns and a split column")
    p.add_argument("--split", default="train", help="the split to fingerprint (default train; '' for every row)")
    p.add_argument("--mask", default="mask", help="the mask column (default mask)")
    p.add_argument("--max-cases", type=int, default=None, help="read only the first N cases")
    p.add_argument("--profile", default=None, help="cpu: cap the patch and batch at the CPU profile's budgets "
                   "(what `medfm finetune --plan auto --profile cpu` plans)")
    p.add_argument("--out", default=None, help="write the planned recipe (YAML) here")
    p.set_defaults(fn=cmd_plan)


def _evaluate_parser(sub) -> None:
    """``medfm evaluate``."""
    p = sub.add_parser("evaluate", help="evaluate any run: a fine-tuned task on a held-out split, a CLIP run "
                       "zero-shot, a pretrained encoder by a linear probe, a text MLM run by perplexity",
                       epilog="examples: medfm evaluate RUN --split test | medfm evaluate CLIP_RUN --data "
                              "manifest.csv --split dev --classes type,plane --text caption | medfm evaluate "
                              "MAE_RUN --data pneumoniamnist.npz --split val")
    p.add_argument("mode", nargs="?", help="the run folder (or `zero-shot`, the older spelling, with --model)")
    p.add_argument("--run", default=None, help="the run folder (same as the positional RUN)")
    p.add_argument("--model", default=None, help="zero-shot: a CLIP run (older spelling)")
    p.add_argument("--label", default=None, help="pretraining runs: the manifest label column for the linear probe")
    p.add_argument("--data", default=None, help="npz or manifest (default: the run's data)")
    p.add_argument("--split", default=None, help="split to evaluate (default: test for fine-tuned runs, val for "
                   "pretraining, CLIP and generator runs; zero-shot: 'all' for every row)")
    p.add_argument("--classes", default=None, help="zero-shot: manifest label columns, comma-separated "
                   "(their values are the class names)")
    p.add_argument("--text", default=None, help="zero-shot: manifest text column for image <-> text retrieval")
    p.add_argument("--prompt", action="append", default=None, metavar="TEMPLATE",
                   help="zero-shot prompt template with {} for the class name (repeatable: an ensemble)")
    p.add_argument("--out", default=None, help="folder for metrics.json and figures (default: RUN/eval_SPLIT)")
    p.add_argument("--robustness", default=None, metavar="SPEC", help="fine-tuned runs: score the split clean and "
                   "under a robustness spec's perturbations (robustness/cxr, mr, ct or your own YAML)")
    p.add_argument("--groups", default=None, help="classification: manifest columns (comma-separated: site, scanner, "
                   "sex, ...) to report metrics per group by, with the worst group and the gap's bootstrap interval")
    p.add_argument("--mirror", action="store_true", help="segmentation: predict with test-time mirroring (nnU-Net's; "
                   "4x the time in 2D, 8x in 3D)")
    p.add_argument("--n", type=int, default=None, help="generators: samples to generate (default: min(train, 500))")
    p.add_argument("--features", default=None, help="generators: the encoder (folder or run) whose feature space the "
                   "Frechet distance and MMD use (default: the real-only classifier's encoder)")
    p.add_argument("--classify", default=None, help="generators: the classification recipe of the utility test "
                   "(default: tasks/classify_2d.yaml or _3d); trailing KEY=VALUE override it")
    p.set_defaults(fn=cmd_evaluate, takes_overrides=True)


def _generate_parser(sub) -> None:
    """``medfm generate``."""
    p = sub.add_parser("generate", help="sample a diffusion generator run into a data set (PNG / NIfTI + manifest)",
                       epilog="examples: medfm generate --model runs/gen2d --classes all --n 500 --out gen | "
                              "medfm generate --model runs/gen3d --masks synth/labels --out gen3d")
    p.add_argument("--model", required=True, help="a generator run (medfm pretrain generators/diffusion_*.yaml) or its model/")
    p.add_argument("--classes", default=None, help="class names (or indices), comma-separated, or 'all'; used in turn")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a prompt (repeatable; used in turn)")
    p.add_argument("--masks", default=None, help="a folder (or manifest) of label maps: one volume/image per map")
    p.add_argument("--n", type=int, default=None, help="number of samples (default: one per mask / prompt / class)")
    p.add_argument("--seed", type=int, default=0, help="sample i is seeded by seed + i")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    p.add_argument("--sampler", default=None, choices=("ddpm", "ddim", "dpm"), help="default: the recipe's")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1: none)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, help="folder: images/, labels/ (masks), manifest.csv, grid.png")
    p.set_defaults(fn=cmd_generate)


def _generate_report_parser(sub) -> None:
    """``medfm generate-report``."""
    p = sub.add_parser("generate-report", help="write a report for each image or volume with a report-generation run")
    p.add_argument("images", nargs="+", help="PNG/JPEG, NIfTI or DICOM files (preprocessed as the model was trained)")
    p.add_argument("--model", required=True, help="a `medfm finetune tasks/report_2d.yaml` run (or its model/ folder)")
    p.add_argument("--beams", type=int, default=None, help="beam width (default: the run's recipe)")
    p.set_defaults(fn=cmd_generate_report)


def _answer_parser(sub) -> None:
    """``medfm answer``."""
    p = sub.add_parser("answer", help="answer a question about an image or volume with a VQA run",
                       epilog='example: medfm answer --model runs/vqa image.png "Is there a pneumothorax?"')
    p.add_argument("image", help="PNG/JPEG, NIfTI or DICOM file (preprocessed as the model was trained)")
    p.add_argument("question", help="the question, in quotes")
    p.add_argument("--model", required=True, help="a `medfm finetune tasks/vqa_2d.yaml` run (or its model/ folder)")
    p.set_defaults(fn=cmd_answer)


def _chat_parser(sub) -> None:
    """``medfm chat``."""
    p = sub.add_parser("chat", help="talk about an image or volume with a multimodal-LM run (questions on standard input)",
                       epilog='example: printf "What modality is this?\\nIs it normal?\\n" | medfm chat --model runs/mllm scan.png')
    p.add_argument("image", help="PNG/JPEG, NIfTI or DICOM file (preprocessed as the model was trained)")
    p.add_argument("--model", required=True, help="a `medfm finetune tasks/mllm_2d.yaml` run (or its model/ folder)")
    p.set_defaults(fn=cmd_chat)


def _export_parser(sub) -> None:
    """``medfm export``."""
    p = sub.add_parser("export", help="write a multimodal-LM run as a transformers LlavaForConditionalGeneration folder",
                       epilog="example: medfm export runs/mllm_vqa --out llava_vqa")
    p.add_argument("run", help="a `medfm finetune tasks/mllm_2d.yaml` run with a 2D ViT encoder (or its model/ folder)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.set_defaults(fn=cmd_export)


def _adapt_parser(sub) -> None:
    """``medfm adapt``."""
    p = sub.add_parser("adapt", help="adapt a classification run to a new site from its unlabelled images (batch-norm "
                       "statistics, TENT, entropy on LoRA, SHOT); writes a new run",
                       epilog="example: medfm adapt runs/busbra --data breast_us/manifest.csv --split target "
                              "--method shot --out runs/busbra_to_busi; then medfm evaluate runs/busbra_to_busi "
                              "--data breast_us/manifest.csv --split target")
    p.add_argument("run", help="a finished classification run (medfm finetune)")
    p.add_argument("--data", required=True, help="the new site's images: a manifest or npz (labels are never read)")
    p.add_argument("--split", default="target", help="its split to adapt on (default target)")
    p.add_argument("--method", required=True, choices=tuple(SITE_METHODS),
                   help="norm: re-estimate batch-norm statistics; tent: entropy on normalisation parameters; "
                        "lora_entropy: entropy on LoRA parameters; shot: information maximisation + centroid pseudo-labels")
    p.add_argument("--out", required=True, help="the adapted run's folder")
    p.add_argument("--steps", type=int, default=None, help="adaptation steps (default: one pass for norm, 50 otherwise)")
    p.add_argument("--lr", default="auto", help="learning rate (default: the method's, medfm.finetune.site_adaptation.SITE_METHODS)")
    p.add_argument("--params", default=None, choices=("auto", "norm", "lora", "encoder"),
                   help="which parameters learn (default: the method's own)")
    p.add_argument("--collapse-share", type=float, default=None,
                   help="predicted-class share on the target that counts as a collapse (default 0.9)")
    p.add_argument("--resume", action="store_true", help="continue the adaptation in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run outputs already in --out")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override (repeatable), e.g. data.batch_size=16")
    p.set_defaults(fn=cmd_adapt, takes_overrides=True)


def _embedder_args(p) -> None:
    """The encoder flags ``medfm select`` and ``medfm curate`` share."""
    p.add_argument("--encoder", default="vit_tiny", help="registered encoder name, randomly initialised (default "
                   "vit_tiny), when --pretrained is not given")
    p.add_argument("--pretrained", default=None, help="a medfm run or encoder folder, or a public model file / folder "
                   "(`medfm models`): its weights and recorded preprocessing")
    p.add_argument("--preset", default=None, help="radiograph_2d | ct_3d | mr_3d (default: the encoder's own)")
    p.add_argument("--size", type=int, default=None, help="input size per side (default: the encoder's own, else 224)")
    p.add_argument("--split", default="train", help="the split to read (default train; a folder is all 'train')")
    p.add_argument("--cache", default=str(SELECT_CACHE), help=f"embedding cache folder (default {SELECT_CACHE}; "
                   "'none' recomputes)")
    p.add_argument("--seed", type=int, default=0, help="seed (random-init weights, clustering, random picks)")


def _embedder(args: argparse.Namespace):
    dims = 3 if args.preset in ("ct_3d", "mr_3d") else 2
    return load_embedder(args.encoder, args.pretrained, args.preset, args.size, spatial_dims=dims, seed=args.seed)


def _select_parser(sub) -> None:
    """``medfm select``."""
    p = sub.add_parser("select", help="which examples to label next: cold start (typicality, coverage) or active "
                       "learning from foundation-model embeddings",
                       epilog="example: medfm select pool.csv --budget 20 --strategy typiclust --out runs/round1")
    p.add_argument("data", help="the unlabelled pool: npz, CSV/JSONL manifest or folder")
    p.add_argument("--budget", type=int, required=True, help="how many items to pick")
    p.add_argument("--strategy", default="typiclust", help=f"{' | '.join(STRATEGIES)} (default typiclust)")
    p.add_argument("--labelled", default=None, help="CSV of the items labelled so far (an earlier selected.csv, or a "
                   "manifest of pool images): never picked again; its labels fit the probe of entropy/margin/badge")
    p.add_argument("--label", default=None, help="label column of --labelled (default 'label')")
    p.add_argument("--classes", type=int, default=None, help="number of classes, when known (ProbCover's radius)")
    p.add_argument("--out", required=True, help="folder for selected.csv, selection.json, selection.png")
    _embedder_args(p)
    p.set_defaults(fn=cmd_select)


def cmd_select(args: argparse.Namespace) -> int:
    summary = run_selection(_embedder(args), args.data, args.out, args.budget, args.strategy, split=args.split,
                            labelled=args.labelled, label=args.label, seed=args.seed, n_classes=args.classes,
                            cache=None if args.cache == "none" else args.cache)
    print(f"{args.strategy}: picked {summary['budget']} of {summary['pool']} ({summary['labelled']} labelled before) "
          f"with {summary['encoder']} in {summary['wall_s']:.1f} s\n"
          f"selection: {Path(args.out) / 'selected.csv'}\nfigure:    {Path(args.out) / 'selection.png'}")
    return 0


def _curate_parser(sub) -> None:
    """``medfm curate``."""
    p = sub.add_parser("curate", help="duplicates, cross-split leaks, label conflicts and outliers in a data set "
                       "(HTML report with thumbnails, findings CSV), a cleaned copy and a cluster-balanced subset",
                       epilog="example: medfm curate data/manifest.csv --label label --patient patient --out runs/curate")
    p.add_argument("data", help="npz, CSV/JSONL manifest or folder: every split is read; the input is never changed")
    p.add_argument("--out", required=True, help="folder for report.html, findings.csv, summary.json")
    p.add_argument("--label", default=None, help="label column (an npz's own labels are used): conflicts among duplicates")
    p.add_argument("--patient", default=None, help="patient / case column: the same value in two splits is a leak")
    p.add_argument("--hash-distance", type=int, default=HASH_DISTANCE, help=f"pHash bits of 64 for a near-duplicate "
                   f"(default {HASH_DISTANCE})")
    p.add_argument("--cosine", type=float, default=COSINE, help=f"centred-embedding cosine for a near-duplicate "
                   f"(default {COSINE})")
    p.add_argument("--no-embeddings", action="store_true", help="pixel hashes only (no encoder, no outliers)")
    p.add_argument("--balanced", type=int, default=None, help="also write balanced.csv: this many items spread over "
                   "a hierarchical k-means of the embeddings (pretraining subsets)")
    p.add_argument("--clean", action="store_true", help="also write clean.csv / clean.npz without the later copies "
                   "and the held-out side of every leak")
    _embedder_args(p)
    p.set_defaults(fn=cmd_curate)


def cmd_curate(args: argparse.Namespace) -> int:
    embedder = None if args.no_embeddings else _embedder(args)
    s = run_curation(args.data, args.out, embedder, args.label, args.patient, args.hash_distance, args.cosine,
                     args.balanced, args.clean, args.seed, cache=None if args.cache == "none" else args.cache)
    print(f"{s['items']} items ({', '.join(f'{k}: {v}' for k, v in s['splits'].items())}) in {s['wall_s']} s\n"
          f"duplicates {s['duplicate']}, leaks {s['leak']}, patient leaks {s['patient_leak']}, "
          f"label conflicts {s['label_conflict']}, outliers {s['outlier']}, rows repeating a file {s['same_file']}"
          + (f"\ncleaned copy: {s['clean']} ({s['dropped']} dropped)" if "clean" in s else "")
          + f"\nreport: {Path(args.out) / 'report.html'}")
    return 0


def _synth_parser(sub) -> None:
    """``medfm synth``."""
    p = sub.add_parser("synth", help="write a synthetic set (random label maps + random appearance) as NIfTI")
    p.add_argument("--dims", type=int, choices=(2, 3), default=3)
    p.add_argument("--size", type=int, default=96, help="side length in voxels (default 96)")
    p.add_argument("--n", type=int, default=200, help="number of samples (default 200)")
    p.add_argument("--labels", type=int, default=8, help="labels per map incl. background (default 8)")
    p.add_argument("--kind", default="mixed", choices=("noise", "shapes", "mixed"), help="label-map generator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder: images/, labels/, manifest.csv, contact_sheet.png")
    p.set_defaults(fn=cmd_synth)


def cmd_data(args: argparse.Namespace) -> int:
    from medfm.data import catalogue

    if args.action == "list":
        rows = catalogue.list_sources(args.name or "")
        if not rows:
            raise KeyError(f"no data set name contains {args.name!r} (`medfm data list` shows them all)")
        width = max(len(s.name) for s in rows)
        print(f"{'name':<{width}}  {'size':<14} {'licence':<28} what")
        for s in rows:
            print(f"{s.name:<{width}}  {s.size:<14} {s.licence:<28} {s.title}")
        print(f"\n{len(rows)} data sets; files go to {catalogue.data_root()} ($MEDFM_DATA). "
              "`medfm data info NAME` for source, checksum and citation.")
        return 0
    if not args.name:
        raise ValueError(f"medfm data {args.action} needs a NAME (`medfm data list` shows them)")
    source = catalogue.get_source(args.name)
    if args.action == "info":
        print(catalogue.describe(source))
        return 0
    kwargs = {"dest": args.dest, "file": args.file, "mirror": args.mirror, "progress": not args.quiet}
    if args.action == "fetch":
        where = catalogue.fetch(args.name, **kwargs)
        print(f"{args.name}: fetched and verified in {where}" + (" (bundled: nothing to download)" if source.bundled else "")
              + f"; next: medfm data prepare {args.name}" + (f" --dest {args.dest}" if args.dest else ""))
        return 0
    path = catalogue.prepare(args.name, **kwargs)
    print(f"{args.name}: ready at {path}" + (f"\n  e.g. {source.example}" if source.example else ""))
    return 0


def _data_parser(sub) -> None:
    """``medfm data``."""
    p = sub.add_parser("data", help="the public data sets: list, info (source, licence, citation), fetch "
                       "(resumable, verified), prepare (into a medfm manifest)")
    p.add_argument("action", choices=("list", "info", "fetch", "prepare"))
    p.add_argument("name", nargs="?", default=None, help="a data set (list: a filter on the names)")
    p.add_argument("--dest", default=None, help="folder for this data set (default: $MEDFM_DATA/NAME, "
                   "$MEDFM_DATA defaulting to ~/.cache/medfm/data)")
    p.add_argument("--file", default=None, help="a copy of the source file downloaded by hand (verified, then used)")
    p.add_argument("--mirror", default=None, help="a base URL that serves the same file names (a local mirror)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_data)


# one function per command, in `medfm --help` order
PARSERS = (_quickstart_parser, _data_parser, _benchmark_parser, _suite_parser, _info_parser, _models_parser, _encode_parser, _pretrain_parser, _finetune_parser,
           _plan_parser, _predict_parser, _segment_parser,
           _evaluate_parser, _adapt_parser, _generate_parser, _generate_report_parser, _answer_parser, _chat_parser, _export_parser,
           _select_parser,
           _curate_parser,
           _synth_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfm", description="Medical foundation models: encoders, pretraining, tasks.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad or (extra and not getattr(args, "takes_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    args.overrides = extra
    try:
        return args.fn(args)
    except Stopped as e:  # SIGTERM: the checkpoint is written; say so and exit 143 so job chains see it
        print(f"medfm {args.command}: {e}", file=sys.stderr)
        return e.code
    except (DataError, KeyError, ValueError, OSError, FloatingPointError) as e:
        print(f"medfm {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """An error's message as the user should read it: a KeyError's text without quotes, and an error raised in
    a DataLoader worker ("Caught DataError in DataLoader worker process 0 ... Original Traceback ...") as
    the original error's own last line."""
    msg = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    if "in DataLoader worker process" in msg and "Original Traceback" in msg:
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        msg = last.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception): ", last) else last
    return msg


if __name__ == "__main__":
    sys.exit(main())
