"""Context parallelism: one pattern's attention over many processes, moving only the
key blocks its schedule visits (see README, "Context parallelism")."""

from .context import ContextParallel
from .plan import Plan, make_plan

__all__ = ["ContextParallel", "Plan", "make_plan"]
