"""Data files shipped with stdeploy, found the same way from a wheel, an editable install and a
source checkout: device profiles (the repository's top-level ``targets/*.toml``), model presets
(``models/*.toml``) and training recipes (``models/recipes/*.toml``).

The folders stay at the repository's top level. A wheel carries them as the data-only packages
``stdeploy.shipped.profiles``, ``stdeploy.shipped.presets`` and ``stdeploy.shipped.recipes``:
``[tool.setuptools.package-dir]`` in pyproject.toml maps each to its folder and
``[tool.setuptools.package-data]`` takes the ``*.toml`` files. :func:`shipped_dir` finds an
installed one through the import system; where none is installed (a source checkout on
``PYTHONPATH``, or an editable install, which maps no data-only package) it reads the same
mapping from the ``pyproject.toml`` of the checkout that holds the imported ``stdeploy``
package, so the mapping is written once.
"""

from __future__ import annotations

import functools
import importlib.util
import tomllib
from importlib import resources
from pathlib import Path

from ..errors import ConfigError

__all__ = ["KINDS", "shipped_dir"]

KINDS = ("profiles", "presets", "recipes")


def shipped_dir(kind: str) -> Path:
    """The folder holding the shipped ``*.toml`` files of ``kind`` (one of :data:`KINDS`):
    inside the installed package where a wheel put them, else in the source checkout.
    :class:`~stdeploy.errors.ConfigError` when neither has them."""
    if kind not in KINDS:
        raise ValueError(f"shipped data kind must be one of {KINDS}, got {kind!r}")
    name = f"{__name__}.{kind}"
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    root, mapping = _checkout()
    if root is None or name not in mapping or not (root / mapping[name]).is_dir():
        where = f"the source checkout at {root}" if root is not None else "no source checkout (no pyproject.toml beside the package)"
        raise ConfigError(f"stdeploy's shipped {kind} are missing: the installed package has no {name} and {where} "
                          "does not map it; reinstall stdeploy from a wheel built from the repository")
    return root / mapping[name]


@functools.cache
def _checkout() -> tuple[Path | None, dict[str, str]]:
    """``(checkout root, [tool.setuptools.package-dir] mapping)`` when the imported ``stdeploy``
    package sits in a source checkout of this project (``pyproject.toml`` naming the project
    ``stdeploy`` beside the package folder), else ``(None, {})``."""
    package = Path(str(resources.files("stdeploy")))
    root = package.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return None, {}
    try:
        config = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None, {}
    if config.get("project", {}).get("name") != "stdeploy":
        return None, {}
    return root, dict(config.get("tool", {}).get("setuptools", {}).get("package-dir", {}))
