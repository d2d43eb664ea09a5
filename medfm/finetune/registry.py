"""The fine-tuning tasks: one registry; a task module adds its plug-in with ``@TASKS.register``."""

from __future__ import annotations

from medfm.run import Registry

TASKS = Registry("finetune")
register_task = TASKS.register
# how a task's finished runs adapt to a new site (`medfm adapt`): task name -> the site-adaptation plug-in class,
# set by medfm.finetune.site_adaptation; a task recipe with a site_adaptation section runs it
SITE_ADAPTERS: dict[str, type] = {}
