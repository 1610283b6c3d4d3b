"""Install lava-nc 0.10.0 and lava-dl 0.6.0 on Python 3.11, idempotently.

Both wheels declare ``Requires-Python <3.11`` and stale pins (torch<2.4, numpy<2), so pip cannot
install them as an extra. This step installs them with ``--no-deps --ignore-requires-python``
(their real run-time needs come with the ``lava`` extra) and applies two small source patches:

1. ``lava/magma/compiler/var_model.py``: dataclass fields default to a ``ByteEncoder()`` instance,
   which Python 3.11 rejects at import (mutable default). They become ``field(default_factory=...)``.
2. ``lava/lib/dl/slayer/__init__.py`` imports ``object_detection`` unconditionally, which needs
   cv2 and torchvision. The import becomes optional.

Run as ``python -m stdeploy.install_lava``; a second run changes nothing.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

LAVA_PINS = ("lava-nc==0.10.0", "lava-dl==0.6.0")
_PATCH_MARK = "# patched by stdeploy.install_lava"


def _installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _site_file(relative: str) -> Path:
    spec = importlib.util.find_spec("lava")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("lava is not importable after installation")
    for root in spec.submodule_search_locations:
        candidate = Path(root).parent / relative
        if candidate.exists():
            return candidate
    raise RuntimeError(f"cannot find {relative} in the installed lava packages")


def patch_var_model(path: Path) -> bool:
    """Replace mutable ``ByteEncoder()`` dataclass defaults by default factories."""
    text = path.read_text()
    if _PATCH_MARK in text:
        return False
    new, count = re.subn(r"(:\s*ByteEncoder\s*=\s*)ByteEncoder\(\)", r"\1field(default_factory=ByteEncoder)", text)
    if count == 0:
        raise RuntimeError(f"{path}: no ByteEncoder() default found; lava version changed?")
    if not re.search(r"^from dataclasses import .*\bfield\b", new, flags=re.M):
        new, n = re.subn(r"^(from dataclasses import [^\n]*)$", r"\1, field", new, count=1, flags=re.M)
        if n == 0:
            raise RuntimeError(f"{path}: no 'from dataclasses import' line to extend")
    new = new + "\n" + _PATCH_MARK + "\n"
    _atomic_write(path, new)
    return True


def patch_slayer_init(path: Path) -> bool:
    """Make slayer's ``object_detection`` import optional (it needs cv2 and torchvision)."""
    text = path.read_text()
    if _PATCH_MARK in text:
        return False
    lines = text.splitlines()
    out = []
    hit = False
    for line in lines:
        if "object_detection" in line and line.lstrip().startswith(("from ", "import ")) and not line.startswith(" "):
            out += ["try:  " + _PATCH_MARK, "    " + line, "except Exception:  # cv2/torchvision missing", "    pass"]
            hit = True
        else:
            out.append(line)
    if not hit:
        raise RuntimeError(f"{path}: no object_detection import found; lava-dl version changed?")
    _atomic_write(path, "\n".join(out) + "\n")
    return True


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".stdeploy-tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> int:
    wanted = {"lava-nc": "0.10.0", "lava-dl": "0.6.0"}
    if any(_installed_version(d) != v for d, v in wanted.items()):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-requires-python", *LAVA_PINS],
            check=True,
        )
        importlib.invalidate_caches()
    changed = patch_var_model(_site_file("lava/magma/compiler/var_model.py"))
    changed |= patch_slayer_init(_site_file("lava/lib/dl/slayer/__init__.py"))
    print("lava: patched" if changed else "lava: already installed and patched")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
