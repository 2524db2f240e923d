"""kvcl.paging is host-only: it must not import pyopencl, directly or through kvcl.

The package ``kvcl/__init__.py`` imports the OpenCL runtime, so the subprocess check below
installs a bare ``kvcl`` package object (no ``__init__`` executed) and blocks ``pyopencl``
before importing every paging module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kvcl.paging

PAGING_DIR = Path(kvcl.paging.__file__).parent
KVCL_DIR = PAGING_DIR.parent
PAGING_MODULES = sorted(p.stem for p in PAGING_DIR.glob("*.py") if p.stem != "__init__")
# What kvcl.paging may import: stdlib, numpy, its own modules, and these two kvcl modules.
ALLOWED_KVCL = {"kvcl.errors", "kvcl.validate"}


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = "kvcl.paging"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module)
    return names


def test_sources_import_only_stdlib_numpy_errors_validate():
    assert {"allocator", "page_table", "prefix", "sequences"} <= set(PAGING_MODULES)
    for path in sorted(PAGING_DIR.glob("*.py")):
        text = path.read_text()
        assert "import pyopencl" not in text and "from pyopencl" not in text, path
        for name in _imports(path):
            top = name.split(".")[0]
            ok = (name in ALLOWED_KVCL or name.startswith("kvcl.paging")
                  or top == "numpy" or top == "__future__" or top in sys.stdlib_module_names)
            assert ok, f"{path.name} imports {name}"


def test_import_with_pyopencl_blocked():
    code = f"""
import sys, types
sys.modules["pyopencl"] = None           # any import of pyopencl now raises ImportError
pkg = types.ModuleType("kvcl")
pkg.__path__ = [{str(KVCL_DIR)!r}]         # bare package: kvcl/__init__.py is not executed
sys.modules["kvcl"] = pkg
import kvcl.paging
for name in {PAGING_MODULES!r}:
    __import__("kvcl.paging." + name)
book = kvcl.paging.PagedBookkeeping(8, 4)
seq = book.add_sequence()
assert book.plan([seq], [5]).slot_mapping.tolist() == [0, 1, 2, 3, 4]
loaded = sorted(m for m in sys.modules if m.startswith("kvcl") and sys.modules[m] is not None)
assert "kvcl.runtime" not in loaded, loaded
print("ok", loaded)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
