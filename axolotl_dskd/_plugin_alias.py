"""Lets ``plugins: [axolotl_dskd]`` work as well as ``plugins: [axolotl_dskd.DSKDPlugin]``.

Axolotl splits every ``plugins:`` entry at its last dot into module and class (0.21 also reads
``module:Class``), so the bare package name fails inside Axolotl before any of our code runs.
The wheel installs ``axolotl_dskd_alias.pth``, which runs :func:`install` at interpreter start-up. That adds one
import hook, which waits for ``axolotl.integrations.base`` to be imported and then wraps its
``load_plugin`` to read exactly the name ``axolotl_dskd`` as ``axolotl_dskd.DSKDPlugin``;
every other name passes through untouched. Nothing else is imported at start-up.
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
        return load_plugin(CANONICAL_NAME if plugin_name == BARE_NAME else plugin_name)

    load_plugin_with_alias.dskd_alias = True  # type: ignore[attr-defined]
    load_plugin_with_alias.__doc__ = load_plugin.__doc__
    module.load_plugin = load_plugin_with_alias


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
