"""The Slicer module finds CTNeRFReconLib the way Slicer loads it, in a checkout and in an installed extension.

Slicer puts on sys.path only the folder of each scripted module file it loads, so CTNeRFRecon.py
bootstraps the library's folder itself (``_addLibraryToPath``): the module's own folder in an
installed extension (the extension build copies CTNeRFReconLib beside CTNeRFRecon.py), the
repository root in a checkout. The module file imports Qt and Slicer, which are not here, so the
function is taken out of the file (ast) and run alone, in a fresh interpreter whose sys.path holds
only the standard library, the module's folder and the environment's site-packages (read without
its .pth files, so this checkout's editable install does not make the library importable anyway).
The engine's subprocess must get the same library: ``slicer_bridge.worker.LIB_ROOT`` on its
PYTHONPATH. The installed layout is made twice: by hand, and by CTNeRFRecon/CMakeLists.txt itself
(configured, built and installed with a stand-in for Slicer's CMake macros) when cmake is here.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CTNeRFRecon"
MODULE_FILE = MODULE_DIR / "CTNeRFRecon.py"
LIBRARY = REPO / "CTNeRFReconLib"
BOOTSTRAP = "_addLibraryToPath"


def _module_tree(path: Path = MODULE_FILE) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _bootstrap_source(path: Path = MODULE_FILE) -> str:
    text = path.read_text(encoding="utf-8")
    for node in _module_tree(path).body:
        if isinstance(node, ast.FunctionDef) and node.name == BOOTSTRAP:
            return ast.get_source_segment(text, node)
    raise AssertionError(f"{path.name} has no top-level function {BOOTSTRAP}")


def _imports_library(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import) and any(a.name.split(".")[0] == "CTNeRFReconLib" for a in sub.names):
            return True
        if isinstance(sub, ast.ImportFrom) and (sub.module or "").split(".")[0] == "CTNeRFReconLib":
            return True
    return False


def test_module_calls_the_bootstrap_before_any_library_import():
    """At import time the module runs the bootstrap on its own __file__ before it imports the library."""
    body = _module_tree().body
    calls = [i for i, node in enumerate(body)
             if isinstance(node, (ast.Assign, ast.Expr)) and isinstance(node.value, ast.Call)
             and getattr(node.value.func, "id", None) == BOOTSTRAP
             and [ast.unparse(a) for a in node.value.args] == ["__file__"]]
    assert calls, f"CTNeRFRecon.py never calls {BOOTSTRAP}(__file__) at top level"
    # top-level statements run in order; imports inside functions and classes run later, at use
    early = [ast.unparse(node).splitlines()[0] for node in body[:calls[0]]
             if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) and _imports_library(node)]
    assert not early, f"CTNeRFReconLib imported before the bootstrap runs: {early}"


def test_bootstrap_needs_only_the_standard_library():
    """It runs before anything is importable, so it imports only os and sys, inside itself."""
    function = ast.parse(_bootstrap_source()).body[0]
    imported = {a.name for n in ast.walk(function) if isinstance(n, ast.Import) for a in n.names}
    assert not [n for n in ast.walk(function) if isinstance(n, ast.ImportFrom)]
    assert imported <= {"os", "sys"}, imported


_CHILD = textwrap.dedent("""
    import importlib.util, json, os, subprocess, sys
    module_file, site_packages, bootstrap = sys.argv[1], sys.argv[2], sys.argv[3]
    # only the standard library (what -I -S leaves), the module's folder and site-packages, no .pth files
    sys.path[:] = [os.path.dirname(os.path.abspath(module_file))] + sys.path + [site_packages]
    out = {"importable_before": importlib.util.find_spec("CTNeRFReconLib") is not None}
    namespace = {}
    exec(compile(bootstrap, module_file, "exec"), namespace)
    out["root"] = namespace[%(name)r](module_file)
    try:
        import CTNeRFReconLib
        from CTNeRFReconLib.slicer_bridge import worker
    except ImportError as exc:
        out["error"] = str(exc)
        print(json.dumps(out))
        raise SystemExit(0)
    out["package"] = os.path.dirname(CTNeRFReconLib.__file__)
    out["lib_root"] = str(worker.LIB_ROOT)
    env = worker.worker_environment({"PATH": os.environ.get("PATH", "")})
    out["pythonpath_first"] = env["PYTHONPATH"].split(os.pathsep)[0]
    # what the engine's interpreter imports with that environment (-S: no site, no editable install)
    probe = "import importlib.util; print(importlib.util.find_spec('CTNeRFReconLib').origin)"
    done = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True, text=True)
    out["engine_origin"] = done.stdout.strip() or done.stderr.strip()
    print(json.dumps(out))
""") % {"name": BOOTSTRAP}


def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def _load_like_slicer(module_file: Path, cwd: Path) -> dict:
    """Run the module file's bootstrap in a fresh interpreter that knows only the module's folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _CHILD, str(module_file), _site_packages(), _bootstrap_source(module_file)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_found(result: dict, root: Path, installed: bool = False) -> None:
    # a checkout's library is not importable from the module's folder alone: the bootstrap is what
    # finds it; an installed one is (Slicer's own sys.path entry), and the bootstrap keeps it first
    assert result["importable_before"] == installed, result
    assert "error" not in result, result.get("error")
    assert Path(result["root"]).resolve() == root.resolve()
    assert Path(result["package"]).resolve() == (root / "CTNeRFReconLib").resolve()
    # the engine's subprocess gets this same library first on its PYTHONPATH, and imports it
    assert Path(result["lib_root"]) == root.resolve()
    assert Path(result["pythonpath_first"]) == root.resolve()
    assert Path(result["engine_origin"]).resolve() == (root / "CTNeRFReconLib" / "__init__.py").resolve(), \
        result["engine_origin"]


def _install_by_hand(folder: Path) -> Path:
    """The installed extension's scripted-modules folder: the module file with the library beside it."""
    folder.mkdir(parents=True)
    shutil.copy2(MODULE_FILE, folder / MODULE_FILE.name)
    shutil.copytree(LIBRARY, folder / "CTNeRFReconLib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return folder / MODULE_FILE.name


def test_checkout_layout(tmp_path):
    """Additional module path = the repository's CTNeRFRecon folder: the library is the root's."""
    _check_found(_load_like_slicer(MODULE_FILE, tmp_path), REPO)


def test_installed_layout(tmp_path):
    """The library copied beside the module file: that copy is used (not the checkout's)."""
    folder = tmp_path / "lib" / "Slicer-5.12" / "qt-scripted-modules"
    _check_found(_load_like_slicer(_install_by_hand(folder), tmp_path), folder, installed=True)


def test_linked_module_folder(tmp_path):
    """The checkout's CTNeRFRecon folder reached through a symbolic link still finds the root's library."""
    link = tmp_path / "modules" / "CTNeRFRecon"
    link.parent.mkdir()
    try:
        link.symlink_to(MODULE_DIR, target_is_directory=True)
    except OSError as exc:
        pytest.skip(f"cannot make a symbolic link here: {exc}")
    _check_found(_load_like_slicer(link / MODULE_FILE.name, tmp_path), REPO)


def test_no_library_anywhere(tmp_path):
    """A module file alone: the bootstrap says so (None) and adds nothing; the import then fails."""
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy2(MODULE_FILE, lonely / MODULE_FILE.name)
    result = _load_like_slicer(lonely / MODULE_FILE.name, tmp_path)
    assert result["root"] is None
    assert "CTNeRFReconLib" in result.get("error", ""), result


# ------------------------------------------------------------------- the extension build's layout

_STUB = """
cmake_minimum_required(VERSION 3.16)
project(CTNeRFReconLayoutCheck NONE)
# Stand-ins for what Slicer's UseSlicer.cmake provides, enough for CTNeRFRecon/CMakeLists.txt.
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.12/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
set(BUILD_TESTING OFF)

# ctkMacroCompilePythonScript as CTK defines it, reduced to its layout: each SCRIPTS/RESOURCES entry
# (".py" added to scripts without it) is SOURCE_DIR/entry (default: the calling folder) and lands in
# DESTINATION_DIR/entry; DESTINATION_DIR is installed into INSTALL_DIR, its contents with
# NO_INSTALL_SUBDIR. (CTK copies at build time and byte-compiles; copying at configure time is enough here.)
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(_C "NO_INSTALL_SUBDIR;GLOBAL_TARGET" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR"
                        "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT DEFINED _C_SOURCE_DIR)
    set(_C_SOURCE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
  endif()
  set(_entries)
  foreach(_f IN LISTS _C_SCRIPTS)
    if(NOT _f MATCHES "[.]py$")
      set(_f "${_f}.py")
    endif()
    list(APPEND _entries "${_f}")
  endforeach()
  list(APPEND _entries ${_C_RESOURCES})
  foreach(_f IN LISTS _entries)
    configure_file("${_C_SOURCE_DIR}/${_f}" "${_C_DESTINATION_DIR}/${_f}" COPYONLY)
    file(APPEND "${CMAKE_BINARY_DIR}/copied.txt" "${_C_TARGET_NAME}|${_f}\\n")
  endforeach()
  if(_C_NO_INSTALL_SUBDIR)
    install(DIRECTORY "${_C_DESTINATION_DIR}/" DESTINATION "${_C_INSTALL_DIR}")
  else()
    install(DIRECTORY "${_C_DESTINATION_DIR}" DESTINATION "${_C_INSTALL_DIR}")
  endif()
endmacro()

# slicerMacroBuildScriptedModule: the module's scripts and resources into the scripted-modules folder.
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(_M "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  ctkMacroCompilePythonScript(TARGET_NAME ${_M_NAME} SCRIPTS ${_M_SCRIPTS} RESOURCES ${_M_RESOURCES}
    DESTINATION_DIR "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}"
    INSTALL_DIR "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" NO_INSTALL_SUBDIR)
endmacro()

file(REMOVE "${CMAKE_BINARY_DIR}/copied.txt")
add_subdirectory("@MODULE_DIR@" "${CMAKE_BINARY_DIR}/CTNeRFRecon")
"""


@pytest.fixture(scope="module")
def cmake_install(tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed: the extension build's layout is checked where it is")
    work = tmp_path_factory.mktemp("cmake_layout")
    (work / "src").mkdir()
    (work / "src" / "CMakeLists.txt").write_text(_STUB.replace("@MODULE_DIR@", MODULE_DIR.as_posix()))
    build, prefix = work / "build", work / "install"
    for step in ([cmake, "-S", work / "src", "-B", build], [cmake, "--build", build],
                 [cmake, "--install", build, "--prefix", prefix]):
        done = subprocess.run([str(a) for a in step], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(map(str, step))}:\n{done.stdout}\n{done.stderr}"
    return build, prefix / "lib" / "Slicer-5.12" / "qt-scripted-modules"


def _library_files() -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in LIBRARY.rglob("*.py") if "__pycache__" not in p.parts}


def test_extension_build_copies_the_whole_library(cmake_install):
    build, installed = cmake_install
    copied = {line.split("|", 1)[1] for line in (build / "copied.txt").read_text().splitlines()
              if line.startswith("CTNeRFReconLib|")}
    assert copied == _library_files(), "CTNeRFRecon/CMakeLists.txt does not list exactly the library's .py files"
    installed_files = {p.relative_to(installed).as_posix() for p in (installed / "CTNeRFReconLib").rglob("*.py")
                       if "_kernels" not in p.parts}
    assert installed_files == _library_files()
    assert (installed / "CTNeRFRecon.py").is_file()
    assert (installed / "Resources" / "UI" / "CTNeRFRecon.ui").is_file()
    # the kernel sources, where CTNeRFReconLib.kernels.source_dir() looks in an installed copy
    assert (installed / "CTNeRFReconLib" / "_kernels" / "ops.cpp").is_file()
    assert (build / "lib" / "Slicer-5.12" / "qt-scripted-modules" / "CTNeRFReconLib" / "_kernels" / "ops.cpp").is_file()


def test_extension_build_layout_imports(cmake_install, tmp_path):
    """The installed tree that the extension's own CMake made: the module finds its own copy."""
    _, installed = cmake_install
    _check_found(_load_like_slicer(installed / MODULE_FILE.name, tmp_path), installed, installed=True)
