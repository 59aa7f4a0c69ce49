"""Distillation methods: one file per method, registered by name."""
from . import registry  # noqa: F401


def build_method(name: str, student, teacher, cfg, pair):
    """Create the method ``name`` after checking it can serve the pair."""
    cls = registry.get(name)
    cls.check_pair(pair)
    return cls(student, teacher, cfg, pair)
