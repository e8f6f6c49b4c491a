"""Config instantiation, as in the original ldm code, plus the checkpoint loader."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from ldm.checkpoint import load_state_dict

__all__ = ["default", "exists", "get_obj_from_str", "instantiate_from_config", "load_state_dict"]


def exists(x: Any) -> bool:
    """Whether ``x`` is not None (the original's helper, which its demos import)."""
    return x is not None


def default(value: Any, fallback: Any) -> Any:
    """``value``, or ``fallback`` (called if it is a function) when ``value`` is None."""
    if value is not None:
        return value
    return fallback() if callable(fallback) else fallback


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``package.module.Name`` and return ``Name``."""
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config: Mapping[str, Any], **extra: Any) -> Any:
    """Build ``config.target(**config.params)``; the special strings of the original are kept."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    params = dict(config.get("params", None) or {})
    params.update(extra)
    return get_obj_from_str(config["target"])(**params)
