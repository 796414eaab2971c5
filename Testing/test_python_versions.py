"""The library and the module use nothing newer than the oldest Python the project supports.

Supported: Slicer 5.10 and later, whose Python is 3.12 (Slicer's CMakeLists.txt sets
Slicer_REQUIRED_PYTHON_VERSION 3.12.10 from v5.10.0 on; v5.6 and v5.8 set 3.9.10, for which
PyTorch stopped at 2.8), and, outside Slicer, Python 3.10 and later (pyproject.toml). The engine runs
in either: Slicer's own Python (PythonSlicer) or an external environment, so the floor for every file
of CTNeRFReconLib and of the module is Python 3.10. Checked three ways:

* the grammar: each file parses with ``ast`` at feature_version 3.10, and compiles with a real
  Python 3.10 and 3.12 interpreter when one is installed (pyenv's, or on PATH);
* syntax and standard library: vermin (the [test] extra) finds the minimum version each file needs
  (language features and standard-library modules, functions and arguments) and must find 3.10;
* nothing that a supported Python no longer has: no import of a standard-library module removed in
  3.12 or 3.13 (imp, distutils, asyncore, ...).
"""
from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MINIMUM = (3, 10)
SLICER_PYTHON = (3, 12)
SOURCES = sorted([p for p in (REPO / "CTNeRFReconLib").rglob("*.py") if "__pycache__" not in p.parts]
                 + sorted((REPO / "CTNeRFRecon").glob("*.py")))

REMOVED = {
    # removed in 3.12
    "imp", "distutils", "asynchat", "asyncore", "smtpd",
    # removed in 3.13 (PEP 594 and lib2to3)
    "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "mailcap", "msilib", "nis", "nntplib",
    "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib", "lib2to3",
}


def test_sources_found():
    names = {p.relative_to(REPO).as_posix() for p in SOURCES}
    assert "CTNeRFRecon/CTNeRFRecon.py" in names and "CTNeRFReconLib/__init__.py" in names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_grammar_of_the_oldest_python(path):
    ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=MINIMUM)


def test_no_removed_standard_library_module():
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in REMOVED]
    assert not found, f"modules a supported Python no longer has: {found}"


def test_vermin_minimum_version():
    """vermin's verdict over the library and the module: nothing beyond 3.10."""
    pytest.importorskip("vermin", reason="vermin is not installed (pip install -e '.[test]')")
    target = "%d.%d" % MINIMUM
    done = subprocess.run(
        [sys.executable, "-c", "import sys, vermin; sys.argv[0] = 'vermin'; sys.exit(vermin.main())",
         f"--target={target}-", "--violations", "--no-tips", "--no-parse-comments", "--eval-annotations",
         "--feature", "union-types", "--processes=1",
         str(REPO / "CTNeRFReconLib"), str(REPO / "CTNeRFRecon")],
        capture_output=True, text=True, timeout=300)
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"vermin: files need a Python newer than {target}:\n{report}"
    assert f"Minimum required versions: {target}" in report or "Minimum required versions: ~" in report, report


def _interpreter(version: tuple[int, int]) -> str | None:
    """A Python of that version: pyenv's own build, else one on PATH (not a pyenv shim, which may refuse)."""
    name = "python%d.%d" % version
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(os.path.join(pyenv, "versions", "%d.%d.*" % version, "bin", name)))
    if candidates:
        return candidates[-1]
    found = shutil.which(name)
    return found if found and os.sep + "shims" + os.sep not in found else None


@pytest.mark.parametrize("version", [MINIMUM, SLICER_PYTHON], ids=lambda v: "%d.%d" % v)
def test_compiles_with_a_real_interpreter(version, tmp_path):
    """A real interpreter of that version compiles every file (into a scratch folder, nothing is written here)."""
    python = _interpreter(version)
    if python is None:
        pytest.skip("no Python %d.%d interpreter here" % version)
    code = ("import py_compile, sys, os\n"
            "out = sys.argv[1]\n"
            "for i, path in enumerate(sys.argv[2:]):\n"
            "    py_compile.compile(path, cfile=os.path.join(out, f'{i}.pyc'), doraise=True)\n")
    done = subprocess.run([python, "-I", "-c", code, str(tmp_path), *map(str, SOURCES)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
