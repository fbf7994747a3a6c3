"""Dual-Space Knowledge Distillation for Axolotl.

``axolotl_dskd.loss`` is framework-free; the Axolotl plugin is imported only when asked for,
so the loss can be used without Axolotl installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["DSKDPlugin", "__version__"]

if TYPE_CHECKING:
    from axolotl_dskd.plugin import DSKDPlugin


def __getattr__(name: str) -> Any:
    if name == "DSKDPlugin":
        from axolotl_dskd.plugin import DSKDPlugin

        return DSKDPlugin
    raise AttributeError(f"module 'axolotl_dskd' has no attribute {name!r}")
