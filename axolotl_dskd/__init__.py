"""Dual-Space Knowledge Distillation for Axolotl.

Three tiers, imports one way: :mod:`axolotl_dskd.core` (the loss, the token alignment, the
teacher: framework-free) <- :mod:`axolotl_dskd.integration` (the Axolotl plugin) <- the commands
here (``cache_teacher``, ``evaluate``, ``dolly``). The plugin is imported only when asked for, so
the core can be used without Axolotl installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["DSKDPlugin", "__version__"]

if TYPE_CHECKING:
    from axolotl_dskd.integration.plugin import DSKDPlugin


def __getattr__(name: str) -> Any:
    if name == "DSKDPlugin":
        from axolotl_dskd.integration.plugin import DSKDPlugin

        return DSKDPlugin
    raise AttributeError(f"module 'axolotl_dskd' has no attribute {name!r}")
