"""Shared by the CLI and worker-protocol tests: a tiny simulated case and real `python -m` runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def cli_env() -> dict:
    """The environment of a worker subprocess: this checkout first on the path, no colour, no GPU noise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("CTNERF_DEBUG", None)
    return env


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "CTNeRFReconLib", *[str(a) for a in args]]


def run_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the command line to completion with stdout/stderr captured (stdout is a pipe: JSON events)."""
    return subprocess.run(cli_command(*args), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_cli_here(*args) -> subprocess.CompletedProcess:
    """The command line's own `main` in this process, stdout and stderr captured: what `run_cli` gives
    for a run refused before any work, without a new interpreter importing torch (2-3 s each).

    For refusals only: they exercise the same parsing, checks and events as a subprocess and leave no
    state behind (the signal handlers are restored, the folder's lock released). Whatever is about the
    process itself (exit on a signal, a kill, stdout holding only JSON lines with warnings on) runs
    through `run_cli`.
    """
    import contextlib
    import io

    from CTNeRFReconLib.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(cli_command(*argv), int(code), out.getvalue(), err.getvalue())


def popen_cli(*args) -> subprocess.Popen:
    return subprocess.Popen(cli_command(*args), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)


def parse_events(text: str) -> list[dict]:
    """Every non-empty line must be one JSON object (the protocol allows nothing else on stdout)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_small_case(folder: Path) -> Path:
    """The demo's small phantom scan (24 views, 48 x 48 detector) as an RTK case with reference.nrrd."""
    from CTNeRFReconLib.demo import SMALL, write_demo_case

    return write_demo_case(folder, SMALL)


def write_edited_image(source: Path, target: Path, edit) -> Path:
    """Copy an image file with its voxel array (z, y, x) changed in place by `edit(array)`, placed as before."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(source))
    arr = sitk.GetArrayFromImage(img)
    edit(arr)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(target))
    return Path(target)


def write_with_bad_voxel(source: Path, target: Path, index_zyx, value: float) -> Path:
    """Copy an image file with one voxel (array index z, y, x; slices for more) set to `value` (NaN, inf, ...)."""
    return write_edited_image(source, target, lambda arr: arr.__setitem__(tuple(index_zyx), value))


def write_edited_case(case: Path, folder: Path, edit, files=("geometry.xml",)) -> Path:
    """A new RTK case folder: `files` of `case` copied, its projections.mha (views, rows, cols) changed by
    `edit(stack)` in place."""
    folder.mkdir()
    for name in files:
        (folder / name).write_bytes((case / name).read_bytes())
    write_edited_image(case / "projections.mha", folder / "projections.mha", edit)
    return folder
