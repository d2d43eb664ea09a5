"""The base of every pretraining LightningModule (MAE, DINO, the dense synthetic methods).

Subclasses hold their networks, expose the encoder being pretrained as
``encoder`` (what the run exports), and implement ``compute_loss(batch) ->
(loss, logs)`` and ``make_view(...)`` (their augmentation). Optimizer, schedule
and NaN guard come from :class:`medfm.training.TrainingModule`.
"""

from __future__ import annotations

from medfm.training import TrainingModule


class PretrainModule(TrainingModule):
    """Base LightningModule for self-supervised pretraining of ``self.encoder``."""
