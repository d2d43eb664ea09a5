"""DINO self-distillation pretraining for 2D images and 3D volumes.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021 (https://arxiv.org/abs/2104.14294). A student (encoder + projection
head) is trained to match a teacher on different crops of the same image; the
teacher is an exponential moving average (EMA) of the student, its outputs are
centred (a running mean, all-reduced across ranks) and sharpened (low
temperature). Global crops go through both networks, local crops through the
student only.

The teacher is centred as in the paper (``centering: mean``, a running mean) or, as in DINOv2 (Oquab et al.
2023, https://arxiv.org/abs/2304.07193), by Sinkhorn-Knopp (``centering: sinkhorn``, lightly's SwAV
``sinkhorn`` on the batch of teacher outputs): every prototype gets an equal share of each batch, so one
prototype cannot take over, and the targets are uniform only when the teacher's outputs do not differ between
images (the ``output_std`` indicator). At a small batch and step budget its loss falls from the first steps
where the running mean's does not (benchmarks/RESULTS.md, "Label efficiency").

The loss, the projection head and the cosine momentum schedule are lightly's (``DINOLoss``,
``DINOProjectionHead``, ``cosine_schedule``; the EMA update is lightly's ``update_momentum`` done as one
multi-tensor lerp, tested against it); the crops are MONAI transforms (:class:`~medfm.pretrain.views.MultiCrop`),
so 2D and 3D share every line here. Every step logs the collapse indicators of the paper's section 5.3
(:mod:`medfm.pretrain.collapse`), and :class:`~medfm.pretrain.collapse.CollapseMonitor` warns when a
run has collapsed (``dino.collapse_check``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from lightly.loss import DINOLoss
from lightly.loss.swav_loss import sinkhorn
from lightly.models.modules import DINOProjectionHead
from lightly.utils.scheduler import cosine_schedule

from medfm.run import TrainingModule
from medfm.run.recipe import split_kwargs

from .collapse import CollapseMonitor, collapse_indicators
from .method import PretrainMethod
from .registry import register_method
from .views import MultiCrop


CENTERINGS = ("mean", "sinkhorn")


def cross_view_cross_entropy(teacher_probs: torch.Tensor, student_out: list[torch.Tensor],
                             student_temp: float) -> torch.Tensor:
    """DINO's loss for given teacher targets ``(n_teacher_views, B, K)``: the mean cross-entropy between each
    teacher view's targets and the student's tempered softmax on every *other* view (lightly's ``DINOLoss``
    with the teacher's softmax replaced by the targets; tested equal to it)."""
    log_s = F.log_softmax(torch.stack(student_out) / student_temp, dim=-1)
    pairs = -torch.einsum("tbk,sbk->ts", teacher_probs, log_s)
    pairs.fill_diagonal_(0)
    n_terms = pairs.numel() - pairs.diagonal().numel()
    return pairs.sum() / (n_terms * teacher_probs.shape[1])


class DINO(nn.Module):
    """Student and EMA teacher (each encoder + DINO head) and the DINO loss."""

    def __init__(self, encoder: nn.Module, hidden_dim: int, bottleneck_dim: int, output_dim: int,
                 student_temp: float, teacher_temp: float, center_momentum: float, norm_last_layer: bool,
                 batch_norm: bool = False, centering: str = "sinkhorn", sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"dino.centering must be one of {', '.join(CENTERINGS)}, got {centering!r}")
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        def head() -> nn.Module:
            return DINOProjectionHead(encoder.embed_dim, hidden_dim, bottleneck_dim, output_dim,
                                      batch_norm=batch_norm, norm_last_layer=norm_last_layer)

        self.student = nn.Sequential()
        self.student.add_module("backbone", encoder)
        self.student.add_module("head", head())
        # the weight-normed head cannot be deep-copied: build the teacher's anew and copy the weights
        self.teacher = nn.Sequential()
        self.teacher.add_module("backbone", copy.deepcopy(encoder))
        self.teacher.add_module("head", head())
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.criterion = DINOLoss(output_dim=output_dim, teacher_temp=teacher_temp, student_temp=student_temp,
                                  center_momentum=center_momentum)

    @staticmethod
    def _run(net: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """One forward per crop size (crops of equal size are batched together)."""
        if not views:
            return []
        out = net(torch.cat(views))
        return list(out.chunk(len(views)))

    def forward(self, global_views: list[torch.Tensor], local_views: list[torch.Tensor],
                teacher_temp: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and the collapse indicators of this step (:func:`~medfm.pretrain.collapse.collapse_indicators`)."""
        with torch.no_grad():
            self.teacher.eval()
            teacher_out = self._run(self.teacher, global_views)
        student_out = self._run(self.student, global_views) + self._run(self.student, local_views)
        temp = self.criterion.teacher_temp if teacher_temp is None else teacher_temp
        targets = self.sinkhorn_targets(teacher_out, temp) if self.centering == "sinkhorn" else None
        # before the loss moves the centre; on the Sinkhorn targets when those are what the loss uses
        indicators = collapse_indicators(teacher_out, student_out, self.criterion.center, temp,
                                         self.criterion.student_temp, teacher_probs=targets)
        if targets is None:
            return self.criterion(teacher_out, student_out, teacher_temp=teacher_temp), indicators
        return cross_view_cross_entropy(targets, student_out, self.criterion.student_temp), indicators

    @torch.no_grad()
    def sinkhorn_targets(self, teacher_out: list[torch.Tensor], temp: float) -> torch.Tensor:
        """DINOv2's teacher targets: Sinkhorn-Knopp over all global views of the batch (gathered across
        ranks), so each prototype receives 1/K of the batch; ``(n_views, B, K)``."""
        t = torch.cat(teacher_out).float()
        top = t.max()  # exp(t / temp) overflows beyond ~88 temp; one shift for all ranks cancels out
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
        q = sinkhorn(t - top, iterations=self.sinkhorn_iterations, epsilon=temp, gather_distributed=True)
        return q.view(len(teacher_out), -1, q.shape[-1])

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student: lightly's ``update_momentum`` as one
        multi-tensor lerp (one kernel launch for all parameters instead of two per parameter)."""
        teacher = [p.data for p in self.teacher.parameters()]
        student = [p.data for p in self.student.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)


@dataclass
class DINOConfig:
    """``dino`` recipe section: the DINO head and loss, and the per-step schedules (DINO's defaults)."""

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    output_dim: int = 65536
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    center_momentum: float = 0.9
    momentum: float = 0.996
    freeze_last_layer_steps: int = 0
    norm_last_layer: bool = True
    batch_norm: bool = False  # BatchNorm in the projection head's MLP (DINO's ResNet setting)
    centering: str = "sinkhorn"  # sinkhorn (DINOv2's Sinkhorn-Knopp teacher) | mean (DINO's running centre)
    sinkhorn_iterations: int = 3
    collapse_check: str = "warn"  # warn | stop | off: CollapseMonitor on the logged collapse indicators


COLLAPSE_CHECKS = ("warn", "stop", "off")


class DINOModule(TrainingModule):
    """Lightning wrapper of :class:`DINO` (batches hold ``global`` and ``local`` lists of crops); keyword
    arguments are :class:`DINOConfig`'s and the optimizer's.

    Schedules, all per step: the teacher momentum rises from ``momentum`` to 1
    along a cosine; the teacher temperature warms up linearly from
    ``warmup_teacher_temp`` over ``warmup_teacher_temp_steps``; the last layer of
    the student head is frozen for ``freeze_last_layer_steps`` (DINO's first epoch).
    """

    def __init__(self, encoder: nn.Module, **kwargs):
        c, optim = split_kwargs(DINOConfig, kwargs)
        super().__init__(**optim)
        self.model = DINO(encoder, hidden_dim=c.hidden_dim, bottleneck_dim=c.bottleneck_dim, output_dim=c.output_dim,
                          student_temp=c.student_temp, teacher_temp=c.teacher_temp,
                          center_momentum=c.center_momentum, norm_last_layer=c.norm_last_layer,
                          batch_norm=c.batch_norm, centering=c.centering,
                          sinkhorn_iterations=c.sinkhorn_iterations)
        self.momentum = c.momentum
        self.teacher_temp, self.warmup_teacher_temp = c.teacher_temp, c.warmup_teacher_temp
        self.warmup_teacher_temp_steps = c.warmup_teacher_temp_steps
        self.freeze_last_layer_steps = c.freeze_last_layer_steps
        self.indicators: dict[str, torch.Tensor] | None = None

    @property
    def encoder(self) -> nn.Module:
        return self.model.student.backbone

    def current_teacher_temp(self) -> float:
        s, n = self.global_step, self.warmup_teacher_temp_steps
        if s >= n:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * s / n

    def current_momentum(self) -> float:
        return cosine_schedule(min(self.global_step, self.max_steps), self.max_steps, self.momentum, 1.0)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        temp = self.current_teacher_temp()
        loss, self.indicators = self.model(batch["global"], batch.get("local", []), teacher_temp=temp)
        return loss, {"teacher_temp": temp, "momentum": self.current_momentum(), **self.indicators}

    def on_after_backward(self) -> None:
        if self.global_step < self.freeze_last_layer_steps:
            for p in self.model.student.head.last_layer.parameters():
                p.grad = None

    def optimizer_step(self, *args, **kwargs) -> None:
        # the teacher follows the updated student right after each optimizer step, inside the
        # training step, so a checkpoint written at the end of the step already holds it
        super().optimizer_step(*args, **kwargs)
        self.model.update_teacher(self.current_momentum())


@register_method
class DINOMethod(PretrainMethod):
    """``method: dino``: multi-crop views (``view`` section: :meth:`make_view`'s arguments)."""

    device_synthesis = False  # multi-crop views: the CPU engine

    name = "dino"
    Config = DINOConfig
    module_class = DINOModule

    def module_args(self, cfg: dict) -> dict:
        args = super().module_args(cfg)
        if args.pop("collapse_check") not in COLLAPSE_CHECKS:
            raise ValueError(f"dino.collapse_check must be one of {', '.join(COLLAPSE_CHECKS)}, "
                             f"got {cfg['dino']['collapse_check']!r}")
        return args

    def build(self, cfg: dict, folder):
        """The run of the base class plus the :class:`~medfm.pretrain.collapse.CollapseMonitor` (checked at
        the logging cadence, after the teacher-temperature warm-up or 10 % of the steps)."""
        built = super().build(cfg, folder)
        d, t = self.config(cfg), cfg["trainer"]
        if d.collapse_check != "off":
            grace = max(d.warmup_teacher_temp_steps, t["max_steps"] // 10)
            built.callbacks.append(CollapseMonitor(d.output_dim, t["log_every_n_steps"], grace,
                                                   stop=d.collapse_check == "stop"))
        return built

    def make_view(self, cfg: dict) -> MultiCrop:
        """Multi-crop views; ``local_size`` defaults to 3/7 of ``size`` (DINO's 96 for 224), rounded to a
        multiple of the patch size."""
        enc = cfg["encoder"]
        kw = dict(cfg["view"])
        patch = enc.get("patch_size") or 16
        multiple = kw.pop("multiple", patch if isinstance(patch, int) else max(patch))
        size = enc["img_size"]
        if kw.get("local_size") is None:
            side = size if isinstance(size, int) else min(size)
            kw["local_size"] = max(multiple, round(side * 3 / 7 / multiple) * multiple)
        kw.update({k: tuple(kw[k]) for k in ("global_scale", "local_scale") if k in kw})
        return MultiCrop(enc["spatial_dims"], size, **kw)
