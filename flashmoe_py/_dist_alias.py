"""`flashmoe_py.dist` (and `flashmoe_py.dist.<module>`): deprecated names of `flashmoe_py.parallel`.

The expert-parallel package was `flashmoe_py/dist/` before issue 14; a folder named `dist` is what build tools write
and .gitignore templates and tools skip, so it moved to `flashmoe_py/parallel/`. For one release the old import
paths keep working: a meta-path finder (installed by `flashmoe_py/__init__.py`, ahead of the path finders) answers
`flashmoe_py.dist` and `flashmoe_py.dist.X` with the already-imported `flashmoe_py.parallel` and
`flashmoe_py.parallel.X` modules themselves (one module object per file, so classes and errors are identical
under both names) and emits a DeprecationWarning naming the new path once per old name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

OLD = "flashmoe_py.dist"
NEW = "flashmoe_py.parallel"


def _new_name(name: str) -> str | None:
    if name == OLD or name.startswith(OLD + "."):
        return NEW + name[len(OLD):]
    return None


def warn(name: str, stacklevel: int = 2) -> None:
    warnings.warn(f"{name} is deprecated and will be removed in the next release: import {_new_name(name)} "
                  "instead (the package moved from flashmoe_py/dist/ to flashmoe_py/parallel/)",
                  DeprecationWarning, stacklevel=stacklevel + 1)


class DistAliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if _new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(_new_name(spec.name))
        # The import machinery's frames are skipped by warnings, so stacklevel 2 names the importing line.
        warn(spec.name, stacklevel=2)
        return module

    def exec_module(self, module) -> None:
        # The module is the new one, already executed; the machinery binds it under the old name in sys.modules and
        # as an attribute of the (old-named) parent. Its __name__ and __spec__ stay the new ones.
        pass


def install() -> None:
    if not any(isinstance(f, DistAliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, DistAliasFinder())
