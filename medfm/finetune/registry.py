"""The fine-tuning tasks: one registry; a task module adds its plug-in with ``@TASKS.register``."""

from __future__ import annotations

from medfm.run import Registry

TASKS = Registry("finetune")
register_task = TASKS.register
