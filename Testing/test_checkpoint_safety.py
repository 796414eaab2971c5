"""A run folder's checkpoint can never run code, and a checkpoint that cannot be resumed is refused
before any work: through the real command line, the folder left as it was. The runs are subprocesses;
the refusals call the command line's `main` in this process (worker_case.run_cli_here), which is the
same code without a new interpreter's torch import.

Every refusal is a lone `failed` event of kind bad_input (exit code 2) whose message names the
checkpoint, the field and the fix; a good checkpoint still resumes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from CTNeRFReconLib.events import ExitCode
from worker_case import parse_events, run_cli, run_cli_here, write_small_case

FAST = ("--method", "nerf", "--preset", "preview", "--snapshot-every", "10", "--device", "cpu")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small case and a finished 20-iteration run of it (with its checkpoint)."""
    root = tmp_path_factory.mktemp("ckpt")
    case = write_small_case(root / "case")
    run = root / "run"
    res = run_cli("reconstruct", case, "--out", run, "--iterations", "20", *FAST)
    assert res.returncode == 0, res.stderr
    assert (run / "checkpoint.pt").is_file()
    return case, run


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _state(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _refused(case, run: Path, field: str, *extra, words: str = "") -> dict:
    """--resume is refused naming checkpoint.pt and `field`; nothing but one events line changes."""
    before = _state(run)
    res = run_cli_here("reconstruct", case, "--out", run, "--resume", "--iterations", "30", *FAST, *extra)
    assert res.returncode == ExitCode.BAD_INPUT, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "internal" not in res.stderr
    events = parse_events(res.stdout)
    assert [e["event"] for e in events] == ["failed"], events
    msg = events[0]["message"]
    assert events[0]["kind"] == "bad_input"
    assert msg.startswith(f"{run / 'checkpoint.pt'}: field '{field}': "), msg
    assert "Fix:" in msg and words in msg, msg
    after = _state(run)
    assert set(after) == set(before)
    for name, data in before.items():
        if name == "events.jsonl":  # a finished run's log is kept as it is; an unfinished one gets the refusal
            assert after[name].startswith(data) and after[name][len(data):].count(b"\n") <= 1
        else:
            assert after[name] == data, f"{name} changed"
    return events[0]


class _Payload:
    """Pickles as a call to os.system that would create the marker file."""

    def __init__(self, marker: Path):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.command,))


def test_code_in_a_checkpoint_never_runs(base, tmp_path):
    case, good = base
    marker = tmp_path / "pwned"
    for variant in ("whole", "nested"):
        run = _copy(good, tmp_path / variant)
        if variant == "whole":
            content = {"grid": _Payload(marker)}
        else:  # a real checkpoint with the payload hidden in its history
            content = torch.load(run / "checkpoint.pt", weights_only=True)
            content["history"].append(_Payload(marker))
        torch.save(content, run / "checkpoint.pt")
        ev = _refused(case, run, "checkpoint", words="nothing in it was run")
        assert "system" in ev["message"]  # it names what it asked for
        assert not marker.exists(), "the checkpoint's code ran"


def test_truncated_and_garbage_checkpoints_are_refused(base, tmp_path):
    case, good = base
    for name, cut in (("half", 0.5), ("head", 0.02), ("empty", 0.0)):
        run = _copy(good, tmp_path / name)
        data = (run / "checkpoint.pt").read_bytes()
        (run / "checkpoint.pt").write_bytes(data[:int(len(data) * cut)])
        _refused(case, run, "checkpoint", words="empty" if cut == 0 else "truncated or corrupt")
    run = _copy(good, tmp_path / "text")
    (run / "checkpoint.pt").write_text("not a checkpoint at all\n")
    _refused(case, run, "checkpoint")


def test_checkpoints_of_another_version_are_refused(base, tmp_path):
    case, good = base
    ck = torch.load(good / "checkpoint.pt", weights_only=True)
    old = {k: v for k, v in ck.items() if k not in ("format", "version", "data")}  # the unversioned v1 layout
    for name, content, words in (("v1", old, "older version"), ("v99", {**ck, "version": 99}, "version 99"),
                                 ("nogrid", {k: v for k, v in ck.items() if k != "grid"}, "missing"),
                                 ("badtype", {**ck, "iteration": "many"}, "not an iteration")):
        run = _copy(good, tmp_path / name)
        torch.save(content, run / "checkpoint.pt")
        field = {"v1": "version", "v99": "version", "nogrid": "grid", "badtype": "iteration"}[name]
        _refused(case, run, field, words=words)


def test_checkpoints_for_other_data_grid_or_settings_are_refused(base, tmp_path):
    case, good = base
    # other data: the same case with one projection changed
    import SimpleITK as sitk

    other = tmp_path / "other_case"
    shutil.copytree(case, other)
    img = sitk.ReadImage(str(other / "projections.mha"))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 10, 10] += 0.5
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(other / "projections.mha"))
    _refused(other, _copy(good, tmp_path / "data"), "data", words="other data")
    _refused(case, _copy(good, tmp_path / "grid"), "grid", "--grid-size", "24", "24", "24", words="training grid")
    run = _copy(good, tmp_path / "cfg")
    before = _state(run)
    res = run_cli_here("reconstruct", case, "--out", run, "--resume", "--iterations", "30", "--method", "nerf",
                       "--preset", "standard", "--device", "cpu")
    ev = parse_events(res.stdout)[-1]
    assert res.returncode == ExitCode.BAD_INPUT and ev["kind"] == "bad_input"
    assert f"{run / 'checkpoint.pt'}: field 'config': " in ev["message"] and "channels" in ev["message"]
    assert _state(run)["checkpoint.pt"] == before["checkpoint.pt"]
    _refused(case, _copy(good, tmp_path / "seed"), "seed", "--seed", "5", words="--seed 0")


def test_a_good_resume_continues(base, tmp_path):
    case, good = base
    run = _copy(good, tmp_path / "good")
    # a log torn by a crash, and foreign lines, do not stop a resume
    with open(run / "events.jsonl", "ab") as fh:
        fh.write(b'5\n\xff\xfe not json\n{"protocol":1,"event":"progr')
    res = run_cli("reconstruct", case, "--out", run, "--resume", "--iterations", "30", *FAST)
    assert res.returncode == 0, res.stderr
    events = parse_events(res.stdout)
    assert events[0]["resumed"] is True and events[-1]["event"] == "finished" and events[-1]["iteration"] == 30
    first = next(e for e in events if e["event"] == "progress")
    assert first["iteration"] > 20
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 30 and ck["format"] == "ctnerf-nerf-checkpoint"
    lines = (run / "events.jsonl").read_bytes().splitlines()
    assert json.loads(lines[-1])["event"] == "finished"  # the torn line did not swallow the new events


def test_archive_bombs_are_refused_before_reading(tmp_path):
    import struct
    import zipfile

    from CTNeRFReconLib.formats.validate import ScanFormatError
    from CTNeRFReconLib.nerf.checkpoint import read_checkpoint

    path = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\0" * 1000)
    data = bytearray(path.read_bytes())
    cd = data.index(b"PK\x01\x02")
    data[cd + 24:cd + 28] = struct.pack("<I", 0xFFFFFFF0)  # the entry now announces 4 GiB
    path.write_bytes(bytes(data))
    with pytest.raises(ScanFormatError, match="field 'checkpoint'.*refused before reading"):
        read_checkpoint(path)
