"""The pretraining methods: one registry; a method file adds itself with ``@register_method``."""

from __future__ import annotations

from medfm.run import Registry

METHODS = Registry("pretrain")
register_method = METHODS.register
