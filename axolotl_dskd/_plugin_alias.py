"""Lets ``plugins: [axolotl_dskd]`` work as well as ``plugins: [axolotl_dskd.DSKDPlugin]``.

Axolotl splits every ``plugins:`` entry at its last dot into module and class (0.21 also reads
``module:Class``), so the bare package name fails inside Axolotl before any of our code runs.
The wheel installs ``axolotl_dskd_alias.pth``, which runs :func:`install` at interpreter start-up. That adds one
import hook, which waits for ``axolotl.integrations.base`` to be imported and then wraps its
``load_plugin`` to read exactly the name ``axolotl_dskd`` as ``axolotl_dskd.DSKDPlugin``, and
to stop with the name to write where a name that resembles it fails to load (Axolotl would skip
a module it cannot import, silently dropping the ``dskd_*`` keys, or fail with a bare
``AttributeError``); every other name passes through untouched. Nothing else is imported at
start-up.
Set ``AXOLOTL_DSKD_NO_ALIAS=1`` to turn it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

BARE_NAME = "axolotl_dskd"
CANONICAL_NAME = "axolotl_dskd.DSKDPlugin"
LOADER_MODULE = "axolotl.integrations.base"
OPT_OUT = "AXOLOTL_DSKD_NO_ALIAS"


def patch_loader(module: ModuleType) -> None:
    load_plugin = module.load_plugin
    if getattr(load_plugin, "dskd_alias", False):
        return

    def load_plugin_with_alias(plugin_name: str):  # type: ignore[no-untyped-def]
        if plugin_name in (BARE_NAME, CANONICAL_NAME):
            return load_plugin(CANONICAL_NAME)
        try:
            return load_plugin(plugin_name)
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            if not resembles_this_plugin(plugin_name):
                raise
            raise ValueError(
                f"plugins: {plugin_name!r} cannot be loaded ({type(exc).__name__}: {exc}). "
                f"Write {CANONICAL_NAME} (or {BARE_NAME})."
            ) from exc

    load_plugin_with_alias.dskd_alias = True  # type: ignore[attr-defined]
    load_plugin_with_alias.__doc__ = load_plugin.__doc__
    module.load_plugin = load_plugin_with_alias


def resembles_this_plugin(plugin_name: str) -> bool:
    """A misspelling of this plugin's name (Axolotl would skip it, or fail without saying what to
    write): it mentions DSKD, or its module part is close to ``axolotl_dskd``."""
    import difflib  # here, not at interpreter start-up

    name = plugin_name.lower().replace("-", "_")
    module = name.replace(":", ".").split(".")[0]
    return "dskd" in name or bool(difflib.get_close_matches(module, [BARE_NAME], cutoff=0.8))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds ``axolotl.integrations.base`` as usual and patches it once it has executed."""

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != LOADER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            patch_loader(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def install() -> None:
    if os.environ.get(OPT_OUT, "").lower() in ("1", "true", "yes"):
        return
    if LOADER_MODULE in sys.modules:
        patch_loader(sys.modules[LOADER_MODULE])
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
