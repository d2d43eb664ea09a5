"""One Vision Transformer for 2D images and 3D volumes.

Built from timm's transformer ``Block`` with timm's parameter names
(``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N``, ``norm``,
``fc_norm``), so timm / MAE / DINO 2D checkpoints load unchanged and can be
inflated to 3D (see :mod:`medfm.encoders.weights`). The only difference between
2D and 3D is the patch-embedding convolution and the shape of the token grid.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from timm.layers import trunc_normal_
from monai.utils import ensure_tuple_rep
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices
from timm.layers import QuickGELU, SwiGLUPacked
from timm.models.vision_transformer import Block

from .input_norm import input_layer
from .interface import EncoderBase
from .registry import register_encoder


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, through a Conv2d or Conv3d named ``proj`` (timm's name)."""

    def __init__(self, spatial_dims: int, patch_size: tuple[int, ...], in_chans: int, embed_dim: int):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        x = self.proj(x)
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid


def resample_grid_embed(pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int],
                        antialias: bool = False) -> torch.Tensor:
    """Resample grid position embeddings (1, N, D) from ``old_grid`` to ``new_grid`` (same number of dims).

    Bicubic in 2D (timm's choice; ``antialias`` as DINOv2 with registers does), trilinear in 3D.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, *old_grid, d).movedim(-1, 1).float()
    mode = "bicubic" if len(old_grid) == 2 else "trilinear"
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=False,
                         antialias=antialias and len(old_grid) == 2)
    return grid.movedim(1, -1).reshape(1, -1, d).to(pos.dtype)


def _source_grid(n: int, src_dims: int, config: dict | None) -> tuple[int, ...]:
    """The token grid of a source position embedding with ``n`` grid tokens (from its config when known)."""
    if config and "img_size" in config and "patch_size" in config:
        dims = config.get("spatial_dims", src_dims)
        img = ensure_tuple_rep(config["img_size"], dims)
        ps = ensure_tuple_rep(config["patch_size"], dims)
        grid = tuple(i // p for i, p in zip(img, ps))
        if math.prod(grid) == n:
            return grid
    root = round(n ** (1.0 / src_dims))
    if root**src_dims != n:
        raise ValueError(f"cannot infer the {src_dims}D token grid of a position embedding with {n} patch tokens")
    return (root,) * src_dims


def _source_prefix(n: int, src_dims: int, config: dict | None) -> int:
    """Number of prefix (class- and register-token) slots in a source position embedding of length ``n``."""
    if config is not None:
        if config.get("no_embed_class", False):
            return 0
        return (1 if config.get("class_token", True) else 0) + int(config.get("reg_tokens", 0))
    for prefix in (1, 0):  # timm ViTs keep a class-token slot first
        if round((n - prefix) ** (1.0 / src_dims)) ** src_dims == n - prefix:
            return prefix
    raise ValueError(f"cannot split a position embedding of length {n} into prefix tokens and a {src_dims}D grid")


class ViT(EncoderBase):
    """Vision Transformer over 2D (C, H, W) or 3D (C, D, H, W) inputs.

    Args:
        spatial_dims: 2 or 3.
        img_size: the input size the position embedding is built for; other sizes
            divisible by the patch size work too (the embedding is resampled).
        patch_size: an int, or one entry per spatial dim (e.g. ``(4, 16, 16)`` for thick-slice CT).
        pos_embed: ``"learned"`` (timm default, initialised at random) or ``"sincos"``
            (fixed, not trained, as in MAE).
        global_pool: what ``forward`` returns: ``"token"`` (the class token) or ``"avg"`` (the mean of
            the patch tokens: MAE's and data2vec's choice for frozen features, where a short
            self-supervised run leaves the class token untrained).
        fc_norm: timm's switch: ``True`` normalises after pooling (``fc_norm``), ``False`` before it
            (``norm`` on every token); ``None`` is timm's default (``True`` for ``"avg"``). An encoder
            trained with one pooling can be read out with the other when ``fc_norm=False``: the
            parameters are the same.
        init_values: LayerScale (``ls1`` / ``ls2``, CaiT / DINOv2), None for none.
        reg_tokens: register tokens after the class token (Darcet et al., "Vision Transformers Need
            Registers"; DINOv2-reg), timm's ``reg_token``.
        no_embed_class: timm's switch: the position embedding covers the patch tokens only (the class and
            register tokens carry none), as timm stores DINOv2 with registers.
        norm_eps: LayerNorm epsilon (1e-6 in timm and DINOv2; 1e-5 in torch's default, open_clip).
        mlp: ``"gelu"`` (timm's ``Mlp``), ``"quick_gelu"`` (the same with OpenAI CLIP's ``x * sigmoid(1.702 x)``) or
            ``"swiglu"`` (timm's ``SwiGLUPacked``: ``fc1`` holds the gate
            and value halves; DINOv2-g, UNI2, Virchow2). The hidden width is ``int(embed_dim * mlp_ratio)``,
            both halves together for SwiGLU.
        input_norm: a fixed input mapping in front of the patch embedding (:class:`InputNorm`:
            ``{"channels", "mean", "std"}``): a public model's normalisation and channel count, so it reads
            the [0, 1] grey images every medfm preset produces exactly as it read its own inputs.
        pos_antialias: resample the 2D position grid with an antialiased bicubic (DINOv2 with registers).
        pre_norm: a LayerNorm on every token before the first block (timm's ``norm_pre``; CLIP's ``ln_pre`` /
            ``pre_layrnorm``).
        pos_size: the input size whose token grid the position embedding is stored at (default ``img_size``):
            a converted public model keeps its native grid (a DINOv2 folder's ``image_size``, 518 for DINOv2
            and RAD-DINO) and resamples from it to each input's grid at run time, as upstream does, so at its
            own size it computes exactly what its authors' code computes.
    """

    feature_maps = "tokens"
    lora_targets = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"  # attention and MLP projections
    input_conv = "patch_embed.proj.weight"
    adopt_keys = ("patch_size", "global_pool", "fc_norm")

    def __init__(
        self,
        spatial_dims: int = 2,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 1,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_embed: str = "learned",
        class_token: bool = True,
        global_pool: str = "token",
        fc_norm: bool | None = None,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        norm_eps: float = 1e-6,
        mlp: str = "gelu",
        input_norm: dict | None = None,
        pos_antialias: bool = False,
        pos_size: int | Sequence[int] | None = None,
        pre_norm: bool = False,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if mlp not in MLP_LAYERS:
            raise ValueError(f"mlp must be one of {sorted(MLP_LAYERS)}, got {mlp!r}")
        self.spatial_dims = spatial_dims
        self.img_size = ensure_tuple_rep(img_size, spatial_dims)
        self.patch_size = ensure_tuple_rep(patch_size, spatial_dims)
        bad = [s for s, p in zip(self.img_size, self.patch_size) if s % p]
        if bad:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        # the grid the position embedding is stored at: the input's, or a converted model's native one (resampled
        # to each input's grid at run time, as upstream DINOv2 does)
        self.pos_grid = tuple(s // p for s, p in zip(ensure_tuple_rep(pos_size or img_size, spatial_dims), self.patch_size))
        if math.prod(self.grid_size) > MAX_TOKENS:  # attention memory grows with the square of the tokens
            raise ValueError(f"img_size {self.img_size} with patch_size {self.patch_size} makes "
                             f"{math.prod(self.grid_size):,} tokens per image (at most {MAX_TOKENS:,}): check "
                             "encoder.img_size / encoder.patch_size")
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.global_pool = global_pool
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_pos_prefix = 0 if no_embed_class else self.num_prefix_tokens  # prefix slots in pos_embed
        self.pos_antialias = pos_antialias
        self.grad_checkpointing = False

        self.input_norm, conv_chans = input_layer(in_chans, input_norm)
        self.patch_embed = PatchEmbed(spatial_dims, self.patch_size, conv_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        n_pos = math.prod(self.pos_grid) + self.num_pos_prefix
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim), requires_grad=pos_embed == "learned")
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # torch.linspace, on any device
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    init_values=init_values,
                    drop_path=dpr[i],
                    norm_layer=partial(nn.LayerNorm, eps=norm_eps),
                    **MLP_LAYERS[mlp],
                )
                for i in range(depth)
            ]
        )
        use_fc_norm = global_pool == "avg" if fc_norm is None else bool(fc_norm)
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self._init_weights(pos_embed)

    # ----------------------------------------------------------------- init
    def _init_weights(self, pos_embed: str) -> None:
        if pos_embed == "sincos":
            grid = build_sincos_position_embedding(list(self.pos_grid), self.embed_dim, self.spatial_dims)
            with torch.no_grad():
                self.pos_embed[:, self.num_pos_prefix :].copy_(grid.data)
        else:
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        trunc_normal_(w.view(w.shape[0], -1), std=0.02)

    # ------------------------------------------------------- checkpoint loading
    def checkpoint_filter_fn(self, state_dict: dict[str, torch.Tensor], config: dict | None = None,
                             source_dims: int | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Adapt a ViT checkpoint to this model (timm's ``checkpoint_filter_fn`` idea): the position
        embedding is resampled to this token grid (a 2D grid in-plane, then repeated along depth), and a
        class-token slot is added or dropped. ``config`` is the source's medfm config when it has one;
        ``source_dims`` the source's number of spatial dims. Returns the state dict and what was done."""
        pos = state_dict.get("pos_embed")
        if pos is None or pos.shape == self.pos_embed.shape:
            return state_dict, []
        old = tuple(pos.shape)
        pos = self._adapt_pos_embed(pos, source_dims or self.spatial_dims, config)
        return {**state_dict, "pos_embed": pos}, [f"pos_embed: resampled {old} -> {tuple(pos.shape)} for grid {self.pos_grid}"]

    def _adapt_pos_embed(self, pos: torch.Tensor, src_dims: int, config: dict | None) -> torch.Tensor:
        src_prefix = _source_prefix(pos.shape[1], src_dims, config)
        prefix, grid_pos = pos[:, :src_prefix], pos[:, src_prefix:]
        src_grid = _source_grid(grid_pos.shape[1], src_dims, config)
        if src_dims == 2 and self.spatial_dims == 3:
            plane = resample_grid_embed(grid_pos, src_grid, self.pos_grid[1:], self.pos_antialias)
            plane = plane.reshape(1, 1, *self.pos_grid[1:], -1)
            grid_pos = plane.expand(1, self.pos_grid[0], *self.pos_grid[1:], plane.shape[-1])
            grid_pos = grid_pos.reshape(1, math.prod(self.pos_grid), -1)
        else:
            grid_pos = resample_grid_embed(grid_pos, src_grid, self.pos_grid, self.pos_antialias)
        if prefix.shape[1] < self.num_pos_prefix:  # slots the source did not have start at zero
            pad = torch.zeros(1, self.num_pos_prefix - prefix.shape[1], pos.shape[-1], dtype=pos.dtype)
            prefix = torch.cat([prefix, pad], dim=1)
        return torch.cat([prefix[:, : self.num_pos_prefix], grid_pos], dim=1)

    # ----------------------------------------------------------- timm-style API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise LR decay: stem, one group per block, final norms."""
        return dict(
            stem=r"^cls_token|^reg_token|^pos_embed|^patch_embed|^input_norm|^norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm|^fc_norm", (99999,))],
        )

    def encoder_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    # --------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"{type(self).__name__}(spatial_dims={self.spatial_dims}) expects a "
                f"{self.spatial_dims + 2}-d batch (B, C, {'D, ' if self.spatial_dims == 3 else ''}H, W), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        bad = [s for s, p in zip(x.shape[2:], self.patch_size) if s % p]
        if bad:
            raise ValueError(f"input size {tuple(x.shape[2:])} is not divisible by patch_size {self.patch_size}")

    def grid_pos_embed(self, grid: Sequence[int]) -> torch.Tensor:
        """Position embeddings of the patch tokens for a token grid, resampled if it differs from the built one."""
        return resample_grid_embed(self.pos_embed[:, self.num_pos_prefix :], self.pos_grid, grid, self.pos_antialias)

    def patchify_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Patch tokens with their position embedding added, no prefix token: (B, N, D), grid.

        Pretraining methods that drop tokens (MAE) start here.
        """
        self._check_input(x)
        tokens, grid = self.patch_embed(self.input_norm(x))
        return tokens + self.grid_pos_embed(grid), grid

    def add_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend the class token and the register tokens (with their position embeddings unless
        ``no_embed_class``), as timm orders them: class, registers, patches; then ``norm_pre`` (CLIP's
        pre-LayerNorm, identity otherwise): what the first block reads."""
        prefix = [t for t in (self.cls_token, self.reg_token) if t is not None]
        if not prefix:
            return self.norm_pre(tokens)
        prefix = torch.cat(prefix, dim=1)
        if self.num_pos_prefix:
            prefix = prefix + self.pos_embed[:, : self.num_pos_prefix]
        return self.norm_pre(torch.cat([prefix.expand(tokens.shape[0], -1, -1), tokens], dim=1))

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, tokens)
        return self.blocks(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block and norm: (B, num_prefix_tokens + N, D)."""
        tokens, _ = self.patchify_embed(x)
        return self.norm(self.run_blocks(self.add_prefix(tokens)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """Pool tokens to one embedding (B, D), as timm's ``forward_head(pre_logits=True)``."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        else:
            x = x[:, 0]
        return self.fc_norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, embed_dim)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False
    ) -> list[torch.Tensor]:
        """Feature maps (B, embed_dim, *grid) after the chosen blocks, for dense decoders.

        ``indices``: ``None`` for every block, an int ``n`` for the last ``n`` blocks,
        or a list of block indices (negative counts from the end), as in timm.
        """
        take, last = feature_take_indices(len(self.blocks), indices)
        tokens, grid = self.patchify_embed(x)
        h = self.add_prefix(tokens)
        out = []
        for i, blk in enumerate(self.blocks[: last + 1]):
            h = blk(h)
            if i in take:
                f = self.norm(h) if norm else h
                f = f[:, self.num_prefix_tokens :]
                out.append(f.transpose(1, 2).reshape(f.shape[0], self.embed_dim, *grid))
        return out


MLP_LAYERS = {"gelu": {}, "quick_gelu": {"act_layer": QuickGELU}, "swiglu": {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}}  # ViT(mlp=...)


def mlp_args(state_dict: dict[str, torch.Tensor]) -> dict:
    """``mlp`` and ``mlp_ratio`` of a ViT from its first block's weights in medfm's keys (``fc1`` holds both
    SwiGLU halves): what converters of other ViT layouts pass to :class:`ViT`."""
    hidden, inner = state_dict["blocks.0.mlp.fc1.weight"].shape[0], state_dict["blocks.0.mlp.fc2.weight"].shape[1]
    dim = state_dict["blocks.0.mlp.fc1.weight"].shape[1]
    return {"mlp": "swiglu" if hidden == 2 * inner else "gelu", "mlp_ratio": (hidden + 0.5) / dim}  # int() gives `hidden`

MAX_TOKENS = 32768  # patches per input: 512^2 at patch 4, 512^3 at 16; more is a typo, not a model

_VIT_SIZES = {
    "micro": dict(embed_dim=48, depth=4, num_heads=3),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def vit_size_name(config: dict) -> str | None:
    """The registered name (``vit_tiny``, ...) of a saved ViT config, from its width, depth and heads."""
    return next((f"vit_{size}" for size, args in _VIT_SIZES.items()
                 if all(config.get(k) == v for k, v in args.items())), None)


def _vit(size: str, spatial_dims: int, in_chans: int, img_size, **kwargs) -> ViT:
    args = dict(_VIT_SIZES[size], patch_size=16)
    args.update(kwargs)
    return ViT(spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, **args)


@register_encoder
def vit_micro(spatial_dims: int = 2, in_chans: int = 1, img_size=224, **kwargs) -> ViT:
    """ViT-Micro (width 48, 4 blocks): for smoke tests and CI, not for results."""
    return _vit("micro", spatial_dims, in_chans, img_size, **kwargs)


@register_encoder
def vit_tiny(spatial_dims: int = 2, in_chans: int = 1, img_size=224, **kwargs) -> ViT:
    """ViT-Ti/16 (width 192, 12 blocks, 3 heads), timm ``vit_tiny_patch16_224`` layout."""
    return _vit("tiny", spatial_dims, in_chans, img_size, **kwargs)


@register_encoder
def vit_small(spatial_dims: int = 2, in_chans: int = 1, img_size=224, **kwargs) -> ViT:
    """ViT-S/16 (width 384, 12 blocks, 6 heads), timm ``vit_small_patch16_224`` layout."""
    return _vit("small", spatial_dims, in_chans, img_size, **kwargs)


@register_encoder
def vit_base(spatial_dims: int = 2, in_chans: int = 1, img_size=224, **kwargs) -> ViT:
    """ViT-B/16 (width 768, 12 blocks, 12 heads), timm ``vit_base_patch16_224`` layout."""
    return _vit("base", spatial_dims, in_chans, img_size, **kwargs)


@register_encoder
def vit_large(spatial_dims: int = 2, in_chans: int = 1, img_size=224, **kwargs) -> ViT:
    """ViT-L/16 (width 1024, 24 blocks, 16 heads), timm ``vit_large_patch16_224`` layout: ~300M parameters,
    trained with ``trainer.strategy: fsdp`` and ``trainer.activation_checkpointing`` (docs/running.md)."""
    return _vit("large", spatial_dims, in_chans, img_size, **kwargs)
