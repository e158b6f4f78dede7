"""Importing an application directory's ``app/`` package under a private name.

`lamsonfilter.settings.load_handlers` imports ``app/handlers/*.py`` and
`lamsonfilter.models.load_models` imports ``app/models.py`` from the same
package, so a handler's ``from ..models import Ticket`` and the framework
see one and the same module (one `Base`, one `MetaData`).  The name is
``lamsonfilter_app_`` plus a hash of the directory, so that two
applications can live in one process (tests do).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
from pathlib import Path

__all__ = ["AppPackageError", "import_app_package", "package_name", "unload"]


class AppPackageError(Exception):
    """The ``app/`` package of an application directory cannot be imported."""


def package_name(root: Path) -> str:
    """The private module name of ``root/app``."""
    return "lamsonfilter_app_" + hashlib.sha1(str(root).encode()).hexdigest()[:10]


def import_app_package(root: Path) -> str:
    """Import ``root/app`` under its private name (once); return that name."""
    pkg_dir = root / "app"
    if not (pkg_dir / "handlers").is_dir():
        raise AppPackageError(f"{root}: missing app/handlers/ directory")
    name = package_name(root)
    if name in sys.modules:
        return name
    init = pkg_dir / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(pkg_dir)])
        if spec is None or spec.loader is None:
            raise AppPackageError(f"{init}: cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        module = types.ModuleType(name)
        module.__path__ = [str(pkg_dir)]
        sys.modules[name] = module
    return name


def unload(prefix: str) -> None:
    """Forget module `prefix` and its submodules (a reload imports them afresh)."""
    for mod in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[mod]
