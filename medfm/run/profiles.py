"""Size profiles: one table of overrides that fits every recipe to a smaller machine (``--profile cpu``).

The recipes in ``encoders/`` and ``tasks/`` keep their real-scale defaults (sized for a GPU). A profile
changes only the keys a recipe has (a DINO recipe gets the ``dino`` line, a segmentation recipe the
``segmentation`` line) and is applied after the recipe file and before the user's overrides, so any
value can still be set by hand. A value given as ``{2: a, 3: b}`` depends on the recipe's spatial
dimensions. When the recipe names pretrained encoder weights, the profile keeps the encoder's
architecture (``name``, ``patch_size``): the weights decide it.

``cpu``: a ViT-Tiny/8 on 64 px images or 32^3 volumes at 3 mm, 500 steps, small decoders and heads, the
online probe on a few hundred images (3D segmentation from random init: a small SegResNet encoder instead, see
:data:`SCRATCH_ENCODERS`): a useful run in minutes on a laptop CPU (see docs/running.md for
measured times). ``tiny``: ViT-Micro, 32 px / 32^3, 4 steps, a random tiny LM: checks in seconds that a recipe runs on your data
(and how the README's commands are tested); its numbers mean nothing.
"""

from __future__ import annotations

import copy

PROFILES: dict[str, dict] = {
    "cpu": {
        "encoder": {"name": "vit_tiny", "img_size": {2: 64, 3: 32}, "patch_size": 8},
        "data": {"batch_size": {2: 32, 3: 2}, "preset_args": {3: {"spacing": 3.0}}},
        "optim": {"warmup_steps": 25},
        "trainer": {"max_steps": 500, "log_every_n_steps": 10, "checkpoint_every_n_steps": 100},
        "probe": {"every_n_steps": 250, "max_train": 300, "max_val": 200},
        "mae": {"decoder_dim": 96, "decoder_depth": 2, "decoder_heads": 4},
        # DINO at a CPU's batch and step budget collapses to the uniform solution with the paper's ViT head
        # (measured: benchmarks/RESULTS.md, "Label efficiency"); a BatchNorm head, 1024 prototypes and a faster
        # teacher keep the outputs apart
        "dino": {"hidden_dim": 512, "bottleneck_dim": 128, "output_dim": 1024, "batch_norm": True, "momentum": 0.98,
                 "freeze_last_layer_steps": 20},
        "view": {"local_size": {2: 24, 3: 16}},  # DINO's local crops: 3/7 of the global size, as at 224 px
        "synth_seg": {"feature_size": 8},
        "synth_contrastive": {"feature_size": 8},
        "segmentation": {"feature_size": 8, "sw_batch_size": 2},
        "report_generation": {"decoder_layers": 1, "vocab_size": 2000, "eval_batch_size": 8},
        "diffusion": {"channels": [16, 32, 64], "sample_steps": 25},
        "mllm": {"max_length": 128, "eval_limit": 200, "eval_batch_size": 16},
        # `--plan auto`: the largest patch and batch (voxels) the plan may choose; spacing, classes and normalisation
        # stay the data's (medfm.finetune.planning)
        "plan": {"budget": {2: 256 * 256, 3: 64**3}, "batch_budget": {2: 12 * 256 * 256, 3: 2 * 64**3}},
    },
    # a smoke test of a recipe on your data in seconds (ViT-Micro, 32 px / 32^3, 4 steps): not for results
    "tiny": {
        "encoder": {"name": "vit_micro", "img_size": 32, "patch_size": {2: 8, 3: 8}},
        "data": {"batch_size": {2: 8, 3: 2}, "num_workers": 0, "preset_args": {3: {"spacing": 4.0}}},
        "optim": {"warmup_steps": 1},
        "trainer": {"max_steps": 4, "log_every_n_steps": 1, "checkpoint_every_n_steps": 4},
        "probe": {"every_n_steps": 0},
        "mae": {"decoder_dim": 24, "decoder_depth": 1, "decoder_heads": 2},
        "dino": {"hidden_dim": 64, "bottleneck_dim": 32, "output_dim": 128, "freeze_last_layer_steps": 1},
        "view": {"local_size": 16},
        "clip": {"embed_dim": 32, "max_length": 32},
        "text_mlm": {"max_length": 32, "holdout_every": 100},  # the held-out perplexity on 39 reports, not 392
        "synth_seg": {"feature_size": 8},
        "synth_contrastive": {"feature_size": 8},
        "segmentation": {"feature_size": 8, "sw_batch_size": 2, "hd95": False},
        "report_generation": {"decoder_layers": 1, "vocab_size": 400, "max_length": 32, "eval_batch_size": 8,
                              "meteor": False, "generation": {"num_beams": 1, "max_new_tokens": 8}},
        "diffusion": {"image_size": 32, "channels": [8, 16, 16], "head_channels": 8, "sample_steps": 2, "preview": 4},
        "mllm": {"language_model": "tiny-random-llama", "max_length": 96, "eval_limit": 16, "eval_batch_size": 8,
                 "generation": {"max_new_tokens": 6}},
    },
}

ARCHITECTURE = ("name", "patch_size")  # kept when the recipe loads pretrained weights

# The encoder a profile trains from random initialisation, by (task, spatial dims), where its ViT cannot learn the
# task in the profile's budget. A random-init ViT's learned position embedding starts near zero (std 0.02), and in a
# few hundred CPU steps it does not learn where a token lies in its crop: its tokens say what is there, not where,
# so the UNETR decoder can find a structure by its intensity but not tell its parts apart (MSD hippocampus at 1 mm,
# ViT-Tiny/8, 500 steps: anterior Dice 0.67, posterior 0.00, never predicted; the same ViT with fixed sin-cos
# positions: 0.12 / 0.67). A small SegResNet encoder under the same decoder and recipe: 0.825 / 0.816
# (benchmarks/RESULTS.md, issue 41). Under a plan it is SegResNetDS's encoder; 16 initial filters (5.0 M parameters
# in all) score 0.880 ± 0.001 in 500 steps where 8 (1.25 M) score 0.874 ± 0.002, at ~1.5x the time of a step.
# Named weights (--encoder) always keep their own architecture.
SCRATCH_ENCODERS: dict[str, dict[tuple[str, int], dict]] = {
    "cpu": {("segmentation", 3): {"name": "segres_encoder", "init_filters": 16, "blocks_down": [1, 2, 2, 4],
                                  "patch_size": None},
            # the native 3D promptable recipe's own encoder (it is CPU-sized as it is): a ViT would not learn where
            ("promptable_3d", 3): {"name": "segres_encoder", "init_filters": 16, "blocks_down": [1, 2, 2, 4],
                                   "patch_size": None}},
}


def spatial_dims(cfg: dict) -> int:
    """The recipe's spatial dimensions (its encoder's, or a generator's)."""
    for section in ("encoder", "diffusion"):
        if isinstance(cfg.get(section), dict) and "spatial_dims" in cfg[section]:
            return int(cfg[section]["spatial_dims"])
    return 2


def _pick(value, dims: int):
    """``{2: a, 3: b}`` -> the value for ``dims`` (None: leave the key alone); anything else as is."""
    if isinstance(value, dict) and set(value) <= {2, 3}:
        return value.get(dims)
    return value


def plan_limits(profile: str | None, dims: int) -> dict:
    """``make_plan``'s ``budget`` / ``batch_budget`` under ``profile`` (none: the plan's own, GPU-sized)."""
    if profile in (None, "none"):
        return {}
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    return {k: _pick(v, dims) for k, v in PROFILES[profile].get("plan", {}).items()}


def profile_overrides(profile: str, cfg: dict, user: dict | None = None) -> dict:
    """The overrides ``profile`` makes to the resolved recipe ``cfg`` (only keys ``cfg`` has). ``user``: the
    overrides the user gave; an encoder they name is theirs (no :data:`SCRATCH_ENCODERS` swap)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
    dims = spatial_dims(cfg)
    out: dict = {}
    for section, values in PROFILES[profile].items():
        if not isinstance(cfg.get(section), dict):
            continue
        for key, value in values.items():
            value = _pick(value, dims)
            if value is None or key not in cfg[section]:
                continue
            if section == "encoder" and key in ARCHITECTURE and cfg["encoder"].get("pretrained"):
                continue
            out.setdefault(section, {})[key] = copy.deepcopy(value)
    scratch = SCRATCH_ENCODERS.get(profile, {}).get((cfg.get("task"), dims))
    named = "name" in ((user or {}).get("encoder") or {})
    if scratch and isinstance(cfg.get("encoder"), dict) and not cfg["encoder"].get("pretrained") and not named:
        out.setdefault("encoder", {}).update(copy.deepcopy(scratch))
    return out
