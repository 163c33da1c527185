"""Compatibility name for :mod:`fedprune.registry` (the method registry lives there).

Built-in methods are declared in ``fedprune.registry.BUILTIN`` by ``"module:Class"``
references to their halves; edit that table, not this module.
"""

from __future__ import annotations

from fedprune.registry import MethodInfo, get_method, list_methods, register, unregister

__all__ = ["MethodInfo", "get_method", "list_methods", "register", "unregister"]
