"""Collapse indicators of self-distillation (DINO) and a callback that says when a run has collapsed.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021, section 5.3 and
figure 7: the two ways DINO collapses are *uniform* (every prototype equally likely: the teacher's entropy
reaches log K) and *one dimension dominating* (the entropy reaches 0); in both the student matches the
teacher perfectly, so the KL divergence between them falls to 0. Centering alone pushes towards the
first, sharpening alone towards the second. A network whose output does not depend on its input (a
dead encoder) shows as a zero spread of the teacher's l2-normalised outputs across the batch
(lightly's ``std_of_l2_normalized``; about ``1/sqrt(dim)`` for spread-out outputs).

A loss that stays flat tells none of this apart from slow learning; these numbers do, and
:class:`CollapseMonitor` turns them into one warning naming the step and the kind of collapse.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightly.utils.debug import std_of_l2_normalized


@torch.no_grad()
def collapse_indicators(teacher_out: list[torch.Tensor], student_out: list[torch.Tensor], center: torch.Tensor,
                        teacher_temp: float, student_temp: float,
                        teacher_probs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The DINO paper's indicators for one step, as the loss sees it (centre before its update; with
    ``teacher_probs``, the targets the loss used instead, e.g. Sinkhorn-Knopp's):

    * ``teacher_entropy``: mean entropy of the centred, sharpened teacher distribution (nats; log K = uniform);
    * ``kl_teacher_student``: mean KL(teacher || student) over the global views (same view for both);
    * ``center_norm``: L2 norm of the teacher centre;
    * ``output_std``: batch std of the l2-normalised teacher outputs times sqrt(dim) (0 = the same output for
      every input, about 1 for spread-out outputs).
    """
    t = torch.stack(teacher_out).float()
    s = torch.stack(student_out[: len(teacher_out)]).float()
    if teacher_probs is None:
        p_t = F.softmax((t - center) / teacher_temp, dim=-1)
        log_t = F.log_softmax((t - center) / teacher_temp, dim=-1)
    else:
        p_t = teacher_probs.float()
        log_t = p_t.clamp_min(1e-30).log()
    log_s = F.log_softmax(s / student_temp, dim=-1)
    dim = t.shape[-1]
    return {
        "teacher_entropy": -(p_t * log_t).sum(-1).mean(),
        "kl_teacher_student": (p_t * (log_t - log_s)).sum(-1).mean(),
        "center_norm": center.float().norm(),
        "output_std": std_of_l2_normalized(t.flatten(0, 1)) * math.sqrt(dim),
    }


def collapse_reason(ind: dict[str, float], output_dim: int, kl_floor: float = 1e-3,
                    std_floor: float = 0.01, uniform_fraction: float = 0.998, uniform_kl: float = 0.02) -> str | None:
    """Why these indicators mean a collapsed run, or None for a healthy one.

    Besides a KL under ``kl_floor``, a teacher within ``1 - uniform_fraction`` of the uniform entropy that the
    student matches to ``uniform_kl`` nats is uniform collapse: the target carries no information. Measured on
    a 32 px DINO run at lr 5e-4 (BatchNorm head, 1024 prototypes), the KL of such a run hovered between
    0.001 and 0.01 for 150 steps, so the floor alone never fired three checks in a row. Healthy runs here keep
    the teacher at or below 0.996 log K with KL 0.04-0.4 (benchmarks/RESULTS.md, "Label efficiency").
    ``std_floor`` sits between a network whose output ignores its input (``output_std`` < 1e-3) and a 32 px
    ViT-Micro whose Sinkhorn-centred DINO loss is falling (0.02-0.05 at its lowest over its first 80 steps;
    a floor of 0.05 called such runs collapsed on some CPUs)."""
    log_k = math.log(output_dim)
    if ind["output_std"] < std_floor:
        return (f"the teacher gives every image the same output (batch std of its l2-normalised outputs "
                f"x sqrt(dim) = {ind['output_std']:.3g}, healthy ~1)")
    uniform = ind["teacher_entropy"] > uniform_fraction * log_k and ind["kl_teacher_student"] < uniform_kl
    if ind["kl_teacher_student"] < kl_floor or uniform:
        kind = ("uniform: every prototype equally likely" if ind["teacher_entropy"] > 0.5 * log_k
                else "one prototype dominates")
        return (f"{kind} (teacher entropy {ind['teacher_entropy']:.3f} of log K = {log_k:.3f}, "
                f"KL(teacher || student) {ind['kl_teacher_student']:.2g})")
    return None


class CollapseMonitor(L.Callback):
    """Warns once when a DINO run has collapsed for ``patience`` checks in a row (every ``every_n_steps``
    after ``grace_steps``, when a random network's nearly constant output is still normal), logs
    ``train/collapsed`` (0/1) at each check, and stops the run when ``stop`` is set. Reads the indicators the
    module keeps from its last step (``pl_module.indicators``): one host read per check, none per step."""

    def __init__(self, output_dim: int, every_n_steps: int = 10, grace_steps: int = 50, patience: int = 3,
                 stop: bool = False):
        self.output_dim, self.every, self.grace, self.patience, self.stop = (
            output_dim, max(1, every_n_steps), grace_steps, patience, stop)
        self.strikes = 0
        self.fired: str | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        ind = getattr(pl_module, "indicators", None)
        if ind is None or step < self.grace or step % self.every:
            return
        reason = collapse_reason({k: float(v) for k, v in ind.items()}, self.output_dim)
        self.strikes = self.strikes + 1 if reason else 0
        collapsed = self.strikes >= self.patience
        pl_module.log("train/collapsed", float(collapsed))
        if collapsed and self.fired is None:
            self.fired = f"DINO collapsed at step {step}: {reason}"
            if trainer.is_global_zero:
                warnings.warn(f"{self.fired}. Try a higher teacher_temp warm-up, a smaller output_dim, a lower lr "
                              "or a larger batch; see docs/running.md", stacklevel=1)
        if collapsed and self.stop:
            trainer.should_stop = trainer.strategy.reduce_boolean_decision(True, all=False)
