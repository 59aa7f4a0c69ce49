"""Method registry: registry name = file name = recipe ``method.name`` = CLI name."""
from __future__ import annotations

import importlib

# Module names under distillctl.methods; each defines one Distiller subclass with the same name.
_MODULES = ["ce", "kd", "dkd", "dist", "fitnet", "ofa", "hcd", "tas", "mldr"]
_REGISTRY: dict = {}


def register(cls):
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"distillctl.methods.{mod}")
        except ModuleNotFoundError as err:
            if err.name != f"distillctl.methods.{mod}":
                raise


def names() -> list[str]:
    _load_all()
    return [n for n in _MODULES if n in _REGISTRY]


def get(name: str):
    _load_all()
    return _REGISTRY[name]
