"""The Extensions Index entry (CTNeRFRecon.json) against what the Index checks, and against CMakeLists.txt.

Slicer's Extensions Index validates a submitted description file with its own script
(scripts/check_description_files.py) and JSON schema (Slicer's Schemas/
slicer-extension-catalog-entry-schema-v1.0.2.json). Checked here offline, in this test's own terms:

* the file: named after the extension (the top-level CMake project), valid JSON, LF line endings;
* the schema: only the schema's keys, the required ones present, each of the type it allows;
* the category: one the Index accepts ("Tomographic Reconstruction" is in its accepted list, and
  SPECTRecon uses it);
* the names: the extension name does not start with "Slicer", the repository name does (the Index
  accepts "Slicer", "Slicer-", "Slicer_", "SlicerExtension-" and "SlicerExtension_" prefixes);
  scm_url is https or git;
* the repository: a CMakeLists.txt at the root whose project() is the extension name and that sets
  EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS (the Index downloads them and wants images: here
  each must be a file of this repository with an image extension and content), a license file at the
  root, under 100 MB checked out.

The Index also asks GitHub for the repository's topics ("3d-slicer-extension"); that needs the
published repository and is not checked here. Consistency with CMakeLists.txt: category, dependencies
(EXTENSION_DEPENDS = build_dependencies, PyTorch among them), build subdirectory, the module's
category, one repository and branch behind every URL, the supported Python (README, pyproject,
CMake) and the torch requirement the module asks PyTorchUtils for (pyproject's).
"""
from __future__ import annotations

import ast
import json
import re
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CMAKE = REPO / "CMakeLists.txt"
MODULE_FILE = REPO / "CTNeRFRecon" / "CTNeRFRecon.py"

PLACEHOLDER_OWNER = "TO-BE-PUBLISHED"
"""The GitHub owner named in every URL until the repository is published (see CMakeLists.txt)."""

SCHEMA_URL = re.compile(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                        r"slicer-extension-catalog-entry-schema-v1\.0\.[0-2]\.json#?")
"""The catalog entry schemas Slicer publishes (v1.0.0 to v1.0.2); the Index downloads the one named."""

SCHEMA_KEYS = {
    # key: (required, allowed Python types)
    "$schema": (True, (str,)),
    "category": (True, (str,)),
    "scm_url": (True, (str,)),
    "scm_revision": (False, (str,)),
    "scm_type": (False, (str,)),
    "build_dependencies": (False, (list,)),
    "dicom_support_rule": (False, (str,)),
    "build_subdirectory": (False, (str,)),
    "enabled": (False, (bool,)),
    "tier": (False, (int,)),
}
"""The keys of schema v1.0.2 (it admits no others), whether each is required, and its JSON type."""

CATEGORY = "Tomographic Reconstruction"
"""Checked against the accepted categories in the Index's check_description_files.py (main, August 2026)."""

REPOSITORY_PREFIXES = ("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif")
SIZE_LIMIT_MB = 100


def _cmake_text() -> str:
    return CMAKE.read_text(encoding="utf-8")


def _cmake_sets() -> dict[str, str]:
    """EXTENSION_* values: quoted or bare, as set() gives them."""
    return {name: (quoted if quoted or not bare else bare)
            for name, quoted, bare in re.findall(r'set\s*\(\s*(EXTENSION_\w+)\s+(?:"([^"]*)"|([^\s)]+))\s*\)',
                                                 _cmake_text())}


def _project_name() -> str:
    """The first project( anywhere in the file, comments included, as the Index reads it."""
    match = re.search(r"project\s*\(\s*([^\s)]+)", _cmake_text(), re.IGNORECASE)
    assert match, "no project() in CMakeLists.txt"
    return match.group(1).strip("\"'")


@pytest.fixture(scope="module")
def description_path() -> Path:
    path = REPO / f"{_project_name()}.json"
    assert path.is_file(), f"no extension description file {path.name} at the repository root"
    return path


@pytest.fixture(scope="module")
def description(description_path) -> dict:
    return json.loads(description_path.read_text(encoding="utf-8"))


def test_description_file_format(description_path):
    raw = description_path.read_bytes()
    json.loads(raw.decode("utf-8"))
    assert b"\r" not in raw, "the Index accepts LF line endings only"
    assert raw.endswith(b"\n")


def test_description_matches_the_schema(description):
    unknown = sorted(set(description) - set(SCHEMA_KEYS))
    assert not unknown, f"keys the schema does not allow (it admits no others): {unknown}"
    for key, (required, types) in SCHEMA_KEYS.items():
        if key not in description:
            assert not required, f"required key {key} is missing"
            continue
        value = description[key]
        assert isinstance(value, types) and not (int in types and isinstance(value, bool)), \
            f"{key}: {value!r} is not of the schema's type"
    assert SCHEMA_URL.fullmatch(description["$schema"]), description["$schema"]
    assert description.get("scm_type", "git") in ("git", "local")
    assert all(isinstance(d, str) and d for d in description.get("build_dependencies", []))
    assert 1 <= description.get("tier", 1) <= 5


def test_category_is_accepted(description):
    assert description["category"] == CATEGORY


def test_names(description):
    extension = _project_name()
    assert not extension.lower().startswith("slicer"), "the Index refuses extension names that start with Slicer"
    url = description["scm_url"]
    parts = urllib.parse.urlsplit(url)
    assert "://" in url and parts.scheme in ("https", "git"), url
    repository = parts.path.strip("/").split("/")[-1]
    repository = repository[:-4] if repository.endswith(".git") else repository
    assert repository.startswith(REPOSITORY_PREFIXES), f"the Index wants the repository name to start with Slicer: {url}"


def _github_repository(url: str) -> tuple[str, str, str | None]:
    """(owner, repository, branch or None) of a github.com or raw.githubusercontent.com URL."""
    parts = urllib.parse.urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    if parts.netloc == "raw.githubusercontent.com":
        return path[0], path[1], path[2]
    assert parts.netloc == "github.com", f"{url}: not a GitHub URL"
    return path[0], path[1].removesuffix(".git"), None


def test_urls_name_one_repository_and_branch(description):
    fields = _cmake_sets()
    urls = ([fields["EXTENSION_HOMEPAGE"], fields["EXTENSION_ICONURL"], description["scm_url"]]
            + fields["EXTENSION_SCREENSHOTURLS"].split())
    found = {_github_repository(url)[:2] for url in urls}
    assert len(found) == 1, f"the URLs name different repositories: {sorted(found)}"
    owner, _ = found.pop()
    if owner == PLACEHOLDER_OWNER:
        # not published yet: CMakeLists.txt must say so plainly where the URLs are set
        assert "NOT PUBLISHED YET" in _cmake_text()
    branches = {_github_repository(url)[2] for url in urls} - {None}
    assert branches == {description.get("scm_revision", "main")}, branches


def test_cmakelists_content(description):
    """What the Index reads from the repository's top-level CMakeLists.txt."""
    fields = _cmake_sets()
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert fields.get(key, "").strip(), f"{key} is not set in CMakeLists.txt"
    # the Index finds them only in this spelling: one quoted string, the screenshots' closed at once
    assert re.search(r'set\s*\(EXTENSION_ICONURL\s*"[^"]+"[ ]*\)', _cmake_text(), re.IGNORECASE)
    assert re.search(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"[^"]+"\)', _cmake_text(), re.IGNORECASE)
    for url in [fields["EXTENSION_ICONURL"]] + fields["EXTENSION_SCREENSHOTURLS"].split():
        assert url.startswith("http"), url
        assert url.lower().endswith(IMAGE_SUFFIXES), f"{url}: not an image URL"
        branch = _github_repository(url)[2]
        path = url.split(f"/{branch}/", 1)[1]
        image = REPO / path
        assert image.is_file(), f"{url}: {path} is not in this repository"
        head = image.read_bytes()[:8]
        assert head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8")), f"{path} is not an image"


def test_consistent_with_cmakelists(description):
    fields = _cmake_sets()
    assert fields["EXTENSION_CATEGORY"] == description["category"]
    depends = [] if fields["EXTENSION_DEPENDS"].strip() == "NA" else fields["EXTENSION_DEPENDS"].split()
    assert sorted(depends) == sorted(description.get("build_dependencies", []))
    assert "PyTorch" in depends, "the PyTorch extension (PyTorchUtils) installs the engine's torch"
    assert fields.get("EXTENSION_BUILD_SUBDIRECTORY", ".") == description.get("build_subdirectory", ".")
    module = MODULE_FILE.read_text(encoding="utf-8")
    assert f'self.parent.categories = ["{description["category"]}"]' in module


def test_license_file():
    assert any((REPO / name).is_file() for name in LICENSE_NAMES)


_NOT_CHECKED_OUT = {".git", ".venv", "build", "runs", ".pytest_cache", ".ctnerf_cache", "bench_results",
                    "__pycache__"}


def test_repository_size():
    total = 0
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO).parts
        if (any(p in _NOT_CHECKED_OUT or p.endswith(".egg-info") for p in rel) or rel[0].startswith("demo_run")
                or not path.is_file() or path.suffix == ".pyc"):
            continue
        total += path.stat().st_size
    assert total < SIZE_LIMIT_MB * 2**20, f"{total / 2**20:.1f} MB: the Index refuses more than {SIZE_LIMIT_MB} MB"


# ------------------------------------------------------------------- versions: Python and torch

def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_supported_python_is_stated_consistently():
    """Slicer 5.10+ (Python 3.12) in Slicer; Python 3.10+ outside it; the same floor everywhere."""
    assert _pyproject()["project"]["requires-python"] == ">=3.10"
    cmake = _cmake_text()
    assert re.search(r'Slicer_REQUIRED_PYTHON_VERSION VERSION_LESS "3\.10"', cmake), \
        "CMakeLists.txt should refuse a Slicer whose Python is older than 3.10"
    assert "Slicer 5.10" in _cmake_sets()["EXTENSION_DESCRIPTION"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "Supported Slicer versions" in readme and "5.10" in readme


def test_torch_requirement_matches_pyproject():
    """What the module asks PyTorchUtils for is what the library declares."""
    torch = [d for d in _pyproject()["project"]["dependencies"] if re.match(r"torch\b", d)]
    assert len(torch) == 1
    declared = torch[0][len("torch"):].strip()
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    asked = [node.value.value for node in ast.walk(tree)
             if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["torchRequirement"]
             and isinstance(node.value, ast.Constant)]
    assert asked == [declared], (asked, declared)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "attr", None) == "installTorch"]
    assert calls, "the module does not install torch through PyTorchUtils"
    for call in calls:
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert keywords.get("askConfirmation") == "False", "the module has asked already: no second confirmation"
        assert keywords.get("torchVersionRequirement") == "torchRequirement"
