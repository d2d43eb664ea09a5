"""The registry of generator plug-ins (``method:`` of a generator recipe)."""

from medfm.run import Registry

GENERATORS = Registry("generate")
