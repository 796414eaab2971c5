"""Fuzz every reader of the product: one target per file kind, seeded with valid files written here.

    python Testing/fuzz/fuzz_readers.py list
    python Testing/fuzz/fuzz_readers.py run TARGET --seconds 300      # one target (atheris, else mutation)
    python Testing/fuzz/fuzz_readers.py campaign --seconds 180        # every target in turn, one at a time
    python Testing/fuzz/fuzz_readers.py replay                        # the regression corpus (as CI does)

A target writes the fuzzed bytes as one file of an otherwise valid case and loads the case the way
the product does. The only acceptable outcomes are a clean load or a ScanFormatError that names a
file of the case. Anything else (another exception, a hang past --timeout, a memory blow-up past
--rss-mb) is a finding: the input is saved as Testing/fuzz/corpus/<target>/<kind>-<digest> (one per
distinct exception site) and Testing/test_fuzz_corpus.py replays it in CI.

Engine: atheris (libFuzzer, coverage-guided over the product's Python code) when it is installed,
else a mutation fuzzer of our own over the seeds (bit flips, byte/word replacement with interesting
values, chunk deletion/duplication/splicing, ASCII number tweaks). Run it under `nice -n 19`.
Statistics of each run go to Testing/fuzz/stats/<target>.json.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CORPUS = HERE / "corpus"
STATS = HERE / "stats"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


# -- valid files ------------------------------------------------------------------------------------
def _proj(n=4, rows=6, cols=8, seed=0):
    return np.random.default_rng(seed).uniform(0.1, 2.0, (n, rows, cols)).astype(np.float32)


def _angles(n=4):
    return [0.0, 90.0, 180.0, 270.0][:n]


def _rtk_xml_bytes(n=4) -> bytes:
    from CTNeRFReconLib.formats.rtk import geometry_to_rtk, write_rtk_geometry_xml
    from CTNeRFReconLib.geometry import circular_geometry

    g = circular_geometry(500.0, 800.0, np.radians(_angles(n)), (6, 8), (2.0, 2.0), axis="y")
    params, _ = geometry_to_rtk(g)
    with tempfile.TemporaryDirectory() as d:
        return write_rtk_geometry_xml(params, Path(d) / "g.xml").read_bytes()


def _image_bytes(suffix: str, arr=None, compress=False) -> bytes:
    import SimpleITK as sitk

    arr = _proj() if arr is None else arr
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 1.0))
    img.SetOrigin((-7.0, -5.0, 0.0))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"x{suffix}"
        sitk.WriteImage(img, str(p), compress)
        return p.read_bytes()


def _npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _naf_dict(proj=None):
    from CTNeRFReconLib.formats.tigre import scan_to_naf_dict

    proj = _proj() if proj is None else proj
    return scan_to_naf_dict(proj, np.radians(_angles()), 800.0, 500.0, [6, 8], [2.0, 2.0], [4, 4, 4],
                            [1.0, 1.0, 1.0])


def _tigre_dict():
    return {"DSD": 800.0, "DSO": 500.0, "nDetector": [6, 8], "dDetector": [2.0, 2.0], "nVoxel": [4, 4, 4],
            "dVoxel": [1.0, 1.0, 1.0], "angles": np.radians(_angles()), "projections": _proj()}


def _stack_desc(**extra) -> dict:
    d = {"projections": "p.npy", "geometry": {"type": "circular", "sid": 500, "sdd": 800,
                                              "angles_deg": _angles(), "pixel_pitch": [2.0, 2.0]}}
    d.update(extra)
    return d


def _r2_meta() -> dict:
    return {"scanner": {"DSD": 800.0, "DSO": 500.0, "nVoxel": [4, 4, 4], "dVoxel": [1.0, 1.0, 1.0],
                        "nDetector": [6, 8], "dDetector": [2.0, 2.0], "offOrigin": [0, 0, 0],
                        "offDetector": [0, 0], "mode": "cone"},
            "proj_train": [{"file_path": f"proj_train/proj_train_{i:04d}.npy", "angle": float(np.radians(a))}
                           for i, a in enumerate(_angles())]}


def _checkpoint_bytes() -> bytes:
    import torch

    from CTNeRFReconLib.nerf.checkpoint import FORMAT, VERSION

    ck = {"format": FORMAT, "version": VERSION, "iteration": 3, "history": [[1, 0.5, 20.0, 0.1]],
          "elapsed_s": 0.3, "rays_cap": 64, "phase": "generator", "factors": {"w": torch.ones(3)},
          "field": {"b": torch.zeros(2)}, "detail": None, "optimizer": {"state": {}, "param_groups": [{"params": [0]}]},
          "config": {"channels": 4}, "grid": {"shape_xyz": [4, 4, 4], "spacing_xyz": [1, 1, 1], "origin_xyz": [0, 0, 0]},
          "seed": 0, "data": "x"}
    buf = io.BytesIO()
    torch.save(ck, buf)
    return buf.getvalue()


# -- targets ------------------------------------------------------------------------------------------
class Target:
    """One reader: `setup(folder)` writes the valid rest of a case, `fuzzed` is the file the bytes
    become, `load(folder)` reads the case as the product does."""

    name = ""
    fuzzed = ""

    def seeds(self) -> list[bytes]:
        raise NotImplementedError

    def setup(self, folder: Path):
        pass

    def load(self, folder: Path):
        from CTNeRFReconLib.formats import load_scan

        return load_scan(folder / self.fuzzed)


def _write_rtk_rest(folder: Path, stack_name="projections.mha"):
    (folder / "geometry.xml").write_bytes(_rtk_xml_bytes())
    if stack_name:
        (folder / stack_name).write_bytes(_image_bytes(Path(stack_name).suffix if not stack_name.endswith(".nii.gz")
                                                       else ".nii.gz", np.ascontiguousarray(_proj())))


class RtkXml(Target):
    name, fuzzed = "rtk_xml", "geometry.xml"

    def seeds(self):
        x = _rtk_xml_bytes()
        short = x.replace(b'<?xml version="1.0"?>\n<!DOCTYPE RTKGEOMETRY>\n', b"")
        return [x, short, x.replace(b"<Matrix>", b"<!-- m --><Matrix>", 1)]

    def setup(self, folder):
        _write_rtk_rest(folder)
        (folder / "geometry.xml").unlink()


class ProjectionImage(Target):
    """An RTK case whose projection stack is the fuzzed image file."""

    def __init__(self, name, suffix):
        self.name, self.suffix, self.fuzzed = name, suffix, "projections" + suffix

    def seeds(self):
        out = [_image_bytes(self.suffix)]
        if self.suffix in (".nrrd", ".mha", ".nii.gz"):
            out.append(_image_bytes(self.suffix, compress=True))
        if self.suffix in (".nrrd", ".mha"):
            out.append(_image_bytes(self.suffix, _proj(4, 3, 2)))
        return out

    def setup(self, folder):
        _write_rtk_rest(folder, stack_name=None)

    def load(self, folder):
        from CTNeRFReconLib.formats import load_scan

        return load_scan(folder / "geometry.xml")


class NpyProjections(Target):
    name, fuzzed = "npy", "p.npy"

    def seeds(self):
        return [_npy_bytes(_proj()), _npy_bytes(_proj().astype(np.float64)), _npy_bytes(np.asfortranarray(_proj()))]

    def setup(self, folder):
        (folder / "scan.json").write_text(json.dumps(_stack_desc()))

    def load(self, folder):
        from CTNeRFReconLib.formats import load_scan

        return load_scan(folder / "scan.json")


class PickleScan(Target):
    name, fuzzed = "pickle", "scan.pickle"

    def seeds(self):
        return [pickle.dumps(_naf_dict(), protocol=p) for p in (2, 4, 5)] + [pickle.dumps(_tigre_dict(), protocol=4)]


class StackDescription(Target):
    def __init__(self, name, suffix):
        self.name, self.fuzzed, self.suffix = name, "scan" + suffix, suffix

    def _dump(self, d):
        if self.suffix == ".json":
            return json.dumps(d, indent=1).encode()
        import yaml

        return yaml.safe_dump(d).encode()

    def seeds(self):
        vec = _stack_desc(geometry={"type": "vectors", "sources": [[0, 0, 500], [500, 0, 0], [0, 0, -500], [-500, 0, 0]],
                                    "det_centers": [[0, 0, -300], [-300, 0, 0], [0, 0, 300], [300, 0, 0]],
                                    "det_u": [[1, 0, 0], [0, 0, -1], [-1, 0, 0], [0, 0, 1]],
                                    "det_v": [[0, 1, 0]] * 4, "pixel_pitch": 2.0})
        inten = _stack_desc(kind="intensity", i0=1000.0, projections="raw.npy")
        grid = _stack_desc(grid={"shape_xyz": [4, 4, 4], "spacing_xyz": [1, 1, 1], "origin_xyz": [-1.5, -1.5, -1.5]})
        return [self._dump(d) for d in (_stack_desc(), vec, inten, grid)]

    def setup(self, folder):
        np.save(folder / "p.npy", _proj())
        np.save(folder / "raw.npy", (1000 * np.exp(-_proj())).astype(np.float32))


class R2Meta(Target):
    name, fuzzed = "r2gaussian_json", "meta_data.json"

    def seeds(self):
        m = _r2_meta()
        m2 = dict(m, vol="vol_gt.npy")
        return [json.dumps(m, indent=2).encode(), json.dumps(m2).encode()]

    def setup(self, folder):
        (folder / "proj_train").mkdir(exist_ok=True)
        for i, p in enumerate(_proj()[:, ::-1]):
            np.save(folder / f"proj_train/proj_train_{i:04d}.npy", np.ascontiguousarray(p))
        np.save(folder / "vol_gt.npy", np.ones((4, 4, 4), np.float32))

    def load(self, folder):
        from CTNeRFReconLib.formats import load_scan

        return load_scan(folder)


class R2Npy(R2Meta):
    name, fuzzed = "r2gaussian_npy", "proj_train/proj_train_0001.npy"

    def seeds(self):
        return [_npy_bytes(np.ascontiguousarray(_proj()[1, ::-1])), _npy_bytes(np.ones((6, 8), np.float64))]

    def setup(self, folder):
        super().setup(folder)
        (folder / "meta_data.json").write_text(json.dumps(_r2_meta()))


class ReferenceVolume(Target):
    name, fuzzed = "reference", "ref.nrrd"

    def seeds(self):
        vol = np.random.default_rng(1).uniform(0, 0.03, (5, 6, 7)).astype(np.float32)
        return [_image_bytes(".nrrd", vol), _image_bytes(".nrrd", vol, compress=True)]

    def load(self, folder):
        from CTNeRFReconLib.reference import load_reference

        return load_reference(folder / self.fuzzed)


class Checkpoint(Target):
    name, fuzzed = "checkpoint", "checkpoint.pt"

    def seeds(self):
        return [_checkpoint_bytes()]

    def load(self, folder):
        from CTNeRFReconLib.nerf.checkpoint import read_checkpoint

        return read_checkpoint(folder / self.fuzzed)


class EventsLog(Target):
    """events.jsonl is read back by --resume and by clients: it must never raise at all."""

    name, fuzzed = "events", "events.jsonl"

    def seeds(self):
        lines = [{"protocol": 1, "event": "started", "time": 1.0, "pid": 1},
                 {"protocol": 1, "event": "snapshot", "time": 2.0, "iteration": 5, "sequence": 1},
                 {"protocol": 1, "event": "finished", "time": 3.0}]
        return ["\n".join(json.dumps(x) for x in lines).encode() + b"\n"]

    def load(self, folder):
        from CTNeRFReconLib.rundir import RunFolder

        run = RunFolder(folder)
        run.is_finished()
        run.last_snapshot_sequence()
        run.running_pid()


TARGETS = {t.name: t for t in [
    RtkXml(), ProjectionImage("mha", ".mha"), ProjectionImage("nrrd", ".nrrd"), ProjectionImage("nifti", ".nii"),
    ProjectionImage("nifti_gz", ".nii.gz"), ProjectionImage("tiff", ".tif"), NpyProjections(), PickleScan(),
    R2Meta(), R2Npy(), StackDescription("stack_json", ".json"), StackDescription("stack_yaml", ".yaml"),
    ReferenceVolume(), Checkpoint(), EventsLog()]}


# -- one execution ---------------------------------------------------------------------------------
class Outcome:
    OK, REFUSED, FINDING = "ok", "refused", "finding"


def _names_case_file(err, folder: Path) -> bool:
    """The refusal names a file: one of the case, or a path the fuzzed file itself names (e.g. an
    absolute `projections: /p.npy`)."""
    name = str(getattr(err, "file", ""))
    return bool(name) and (name.startswith(str(folder)) or name.startswith("/") or name.startswith("--"))


def execute(target: Target, data: bytes, folder: Path):
    """(outcome, detail) of loading a case whose fuzzed file holds `data`."""
    from CTNeRFReconLib.formats.validate import ScanFormatError

    path = folder / target.fuzzed
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    try:
        target.load(folder)
    except ScanFormatError as err:
        if not _names_case_file(err, folder):
            return Outcome.FINDING, ("ScanFormatError-unnamed", f"the error names {err.file!r}, not a file of the case")
        return Outcome.REFUSED, None
    except BaseException as exc:  # noqa: BLE001 - any other exception is a finding
        if isinstance(exc, KeyboardInterrupt):
            raise
        tb = traceback.extract_tb(exc.__traceback__)
        site = next((f for f in reversed(tb) if "CTNeRFReconLib" in f.filename), tb[-1] if tb else None)
        where = f"{Path(site.filename).name}:{site.lineno}" if site else "?"
        return Outcome.FINDING, (f"{type(exc).__name__}@{where}", "".join(traceback.format_exception(exc))[-3000:])
    return Outcome.OK, None


def save_finding(target: Target, data: bytes, kind: str, detail: str, per_kind: int = 1) -> Path | None:
    """Store a finding once per distinct kind (exception type and site): corpus/<target>/<kind>-<digest>.

    Native crashes, hangs and memory blow-ups carry no exception site: up to `per_kind` of them are kept."""
    folder = CORPUS / target.name
    folder.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in kind)[:60]
    if sum(p.name.startswith(tag + "-") and not p.name.endswith(".txt") for p in folder.iterdir()) >= per_kind:
        return None
    out = folder / f"{tag}-{hashlib.sha1(data).hexdigest()[:12]}"
    out.write_bytes(data)
    (folder / (out.name + ".txt")).write_text(f"{kind}\n\n{detail}\n")
    return out


# -- our mutation engine -----------------------------------------------------------------------------
_INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                b"9999999999", b"-1", b"0", b"nan", b"inf", b"1e308", b"100000 100000 100000", b"&x;", b"\n", b"'",
                b'"', b"{", b"[", b"!!python/object:os.system", b"*a", b"&a", b"<!ENTITY", b"LOCAL", b"gzip"]


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 6))):
        op = rng.randrange(9)
        n = len(b)
        if op == 0 and n:  # flip bits
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # random byte
            b[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:  # insert an interesting token
            i = rng.randrange(n + 1)
            b[i:i] = rng.choice(_INTERESTING)
        elif op == 3 and n > 1:  # delete a chunk
            i = rng.randrange(n)
            del b[i:i + rng.randrange(1, min(64, n - i) + 1)]
        elif op == 4 and n > 1:  # duplicate a chunk
            i = rng.randrange(n)
            j = min(n, i + rng.randrange(1, 128))
            b[i:i] = b[i:j] * rng.randrange(1, 4)
        elif op == 5 and n:  # tweak an ASCII number
            digits = [i for i in range(n) if 48 <= b[i] <= 57]
            if digits:
                i = rng.choice(digits)
                b[i:i + 1] = rng.choice([b"0", b"9", b"99999", b"-", b"."])
        elif op == 6 and n:  # truncate
            del b[rng.randrange(n):]
        elif op == 7 and pool:  # splice with another input
            other = rng.choice(pool)
            i, j = rng.randrange(n + 1), rng.randrange(len(other) + 1)
            b = b[:i] + other[j:]
        elif op == 8 and n >= 4:  # overwrite a 32-bit word with an extreme value
            i = rng.randrange(n - 3)
            b[i:i + 4] = rng.choice(_INTERESTING[4:7])
    return bytes(b)


def _hang_guard(seconds: float):
    def on_alarm(signum, frame):
        raise TimeoutError(f"the reader ran past {seconds} s")
    signal.signal(signal.SIGALRM, on_alarm)


def count_finding(counts: dict, target: Target, data: bytes | None, kind: str, detail: str,
                  per_kind: int = 1) -> None:
    """Count one finding into a campaign's stats and save its input (once per kind, save_finding)."""
    counts["findings"] += 1
    counts["kinds"][kind] = counts["kinds"].get(kind, 0) + 1
    saved = None if data is None else save_finding(target, data, kind, detail, per_kind=per_kind)
    if saved:
        counts["new_findings"].append(saved.name)


def tally(counts: dict, target: Target, data: bytes, outcome, info) -> None:
    """Count one execution's outcome into a campaign's stats; a finding is saved as it comes."""
    counts["executions"] += 1
    if outcome == Outcome.FINDING:
        count_finding(counts, target, data, *info)
    else:
        counts[outcome] += 1


def run_mutation(target: Target, seconds: float, timeout: float, seed: int = 0, current: Path | None = None) -> dict:
    rng = random.Random(seed)
    pool = list(target.seeds())
    stats = {"target": target.name, "engine": "mutation", "seconds": seconds, "executions": 0, "ok": 0,
             "refused": 0, "findings": 0, "new_findings": [], "kinds": {}}
    _hang_guard(timeout)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target.name}-") as d:
        folder = Path(d)
        target.setup(folder)
        t_end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < t_end:
            data = pool[i % len(pool)] if i < len(pool) else mutate(rng.choice(pool), rng, pool)
            i += 1
            if current is not None:
                current.write_bytes(data)
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                outcome, info = execute(target, data, folder)
            except TimeoutError as exc:
                outcome, info = Outcome.FINDING, ("hang", str(exc))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            tally(stats, target, data, outcome, info)
            if outcome == Outcome.OK and len(pool) < 400 and rng.random() < 0.05:
                pool.append(data)  # keep some valid variants as mutation bases
            if not (folder / target.fuzzed).parent.exists():
                target.setup(folder)
    stats["seconds_run"] = seconds
    return stats


# -- atheris -----------------------------------------------------------------------------------------
def atheris_child(target_name: str, seconds: float, timeout: float, rss_mb: int, workdir: Path):
    """Run in a child process: libFuzzer over one target; findings are saved, never raised."""
    import atheris

    with atheris.instrument_imports(include=["CTNeRFReconLib"]):
        import CTNeRFReconLib.events  # noqa: F401
        import CTNeRFReconLib.formats  # noqa: F401
        import CTNeRFReconLib.nerf.checkpoint  # noqa: F401
        import CTNeRFReconLib.reference  # noqa: F401
        import CTNeRFReconLib.rundir  # noqa: F401
        import CTNeRFReconLib.volume_io  # noqa: F401,I001
    target = TARGETS[target_name]
    folder = Path(tempfile.mkdtemp(prefix=f"fuzz-{target.name}-"))
    target.setup(folder)
    (workdir / "case_dir").write_text(str(folder))  # the input being read lies there if this child dies
    counts = {"executions": 0, "ok": 0, "refused": 0, "findings": 0, "new_findings": [], "kinds": {}}
    stat_path = workdir / "child_stats.json"

    def one(data: bytes):
        outcome, info = execute(target, data, folder)
        tally(counts, target, data, outcome, info)
        if counts["executions"] % 200 == 0:
            stat_path.write_text(json.dumps(counts))

    corpus_dir = workdir / "coverage_corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    if not any(corpus_dir.iterdir()):
        for k, s in enumerate(target.seeds()):
            (corpus_dir / f"seed{k}").write_bytes(s)
    import atexit

    atexit.register(lambda: stat_path.write_text(json.dumps(counts)))
    args = [sys.argv[0], str(corpus_dir), f"-max_total_time={int(seconds)}", f"-timeout={int(timeout)}",
            f"-rss_limit_mb={rss_mb}", "-print_final_stats=1", f"-artifact_prefix={workdir}/", "-max_len=65536"]
    atheris.Setup(args, one)
    atheris.Fuzz()


def run_atheris(target: Target, seconds: float, timeout: float, rss_mb: int) -> dict:
    """libFuzzer in child processes until `seconds` are used: a hang or memory blow-up kills the child
    (its input becomes a finding) and the next child continues from the coverage corpus."""
    work = HERE / "work" / target.name
    work.mkdir(parents=True, exist_ok=True)
    stats = {"target": target.name, "engine": "atheris", "seconds": seconds, "executions": 0, "ok": 0,
             "refused": 0, "findings": 0, "new_findings": [], "kinds": {}, "children": 0}
    t0 = time.monotonic()
    while (left := seconds - (time.monotonic() - t0)) > 5:
        for p in work.glob("child_stats.json"):
            p.unlink()
        cmd = [sys.executable, __file__, "_child", target.name, "--seconds", str(int(left)), "--timeout", str(timeout),
               "--rss-mb", str(rss_mb), "--workdir", str(work)]
        (work / "case_dir").unlink(missing_ok=True)
        with tempfile.TemporaryFile() as err:  # a file, not a pipe: libFuzzer writes a lot, nobody drains a pipe
            child_proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                          preexec_fn=_child_limits(rss_mb), env=_child_env())
            stuck = _wait_unless_stuck(child_proc, target, work, stall=max(60.0, 6 * timeout), deadline=left + 60)
            err.seek(0)
            proc = subprocess.CompletedProcess(cmd, child_proc.returncode, "", err.read().decode("utf-8", "replace"))
        if stuck:
            _save_last_input(target, work, "native_crash", "the fuzz child stopped making progress (after a native "
                             "crash libFuzzer's crash handler can deadlock in malloc) and was killed\n\n"
                             + proc.stderr[-3000:], stats)
        stats["children"] += 1
        child = work / "child_stats.json"
        if child.exists():
            c = json.loads(child.read_text())
            for k in ("executions", "ok", "refused", "findings"):
                stats[k] += c[k]
            stats["new_findings"] += c["new_findings"]
            for k, v in c["kinds"].items():
                stats["kinds"][k] = stats["kinds"].get(k, 0) + v
        tail = proc.stderr[-4000:]
        units = [int(line.split(":")[-1]) for line in tail.splitlines()
                 if line.startswith("stat::number_of_executed_units:")]
        if units:  # libFuzzer prints its final stats twice when it crashes on the way out: count them once
            stats["libfuzzer_executions"] = stats.get("libfuzzer_executions", 0) + max(units)
        artifacts = 0
        for art in sorted(work.glob("*-*")):
            if art.name.split("-")[0] in ("crash", "timeout", "oom", "slow_unit", "leak"):
                artifacts += 1
                kind = art.name.split("-")[0]
                data = art.read_bytes()
                saved = save_finding(target, data, {"crash": "crash", "timeout": "hang", "oom": "memory"}.get(kind, kind),
                                     tail, per_kind=10)
                stats["findings"] += 1
                stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
                if saved:
                    stats["new_findings"].append(saved.name)
                art.unlink()
        if proc.returncode < 0 and not stuck and not artifacts:
            # killed by a signal before libFuzzer could write its artifact
            _save_last_input(target, work, "native_crash", proc.stderr[-3000:], stats)
        if proc.returncode == 0:
            break
    stats["seconds_run"] = round(time.monotonic() - t0, 1)
    return stats


def _wait_unless_stuck(proc: subprocess.Popen, target: Target, work: Path, stall: float, deadline: float) -> bool:
    """Wait for an atheris child; kill it (and return True) when it is stuck: its case file (rewritten
    for every input) unchanged for `stall` seconds, or the run past `deadline`. libFuzzer stops slow
    inputs itself, but after a heap corruption its crash handler can deadlock, and then nothing ends."""
    t0 = time.monotonic()
    while True:
        try:
            proc.wait(timeout=5)
            return False
        except subprocess.TimeoutExpired:
            pass
        case_dir = work / "case_dir"
        try:
            idle = time.time() - (Path(case_dir.read_text()) / target.fuzzed).stat().st_mtime
        except OSError:
            idle = time.monotonic() - t0  # not started yet (imports, seeds)
        if idle > stall or time.monotonic() - t0 > deadline:
            proc.kill()
            proc.wait()
            return True


def _save_last_input(target: Target, work: Path, kind: str, detail: str, stats: dict):
    """Save as a finding the input a dead atheris child was reading (its case folder is in case_dir)."""
    case_dir = work / "case_dir"
    last = Path(case_dir.read_text()) / target.fuzzed if case_dir.exists() else None
    data = last.read_bytes() if last is not None and last.exists() else None
    count_finding(stats, target, data, kind, detail, per_kind=10)


def _child_env() -> dict:
    """Fuzz the native image readers in-process (fast, and their crashes become findings); the product
    reads input images in a child process (volume_io.read_input_image), where such a crash is a refusal."""
    from CTNeRFReconLib.volume_io import IN_PROCESS_ENV

    return dict(os.environ, **{IN_PROCESS_ENV: "1"})


def run_mutation_isolated(target: Target, seconds: float, timeout: float, seed: int, rss_mb: int) -> dict:
    """run_mutation in child processes: a native crash kills the child, the input it was reading (kept
    in work/<target>/current) becomes a finding, and a new child continues with the next seed."""
    work = HERE / "work" / target.name
    work.mkdir(parents=True, exist_ok=True)
    total = {"target": target.name, "engine": "mutation", "seconds": seconds, "executions": 0, "ok": 0,
             "refused": 0, "findings": 0, "new_findings": [], "kinds": {}, "children": 0}
    t0 = time.monotonic()
    while (left := seconds - (time.monotonic() - t0)) > 2:
        out = work / "child_stats.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "_mchild", target.name, "--seconds", str(left), "--timeout", str(timeout),
               "--seed", str(seed), "--workdir", str(work)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, preexec_fn=_child_limits(rss_mb),
                              env=_child_env())
        total["children"] += 1
        seed += 1
        if out.exists():
            c = json.loads(out.read_text())
            for k in ("executions", "ok", "refused", "findings"):
                total[k] += c[k]
            total["new_findings"] += c["new_findings"]
            for k, v in c["kinds"].items():
                total["kinds"][k] = total["kinds"].get(k, 0) + v
        if proc.returncode != 0 and (work / "current").exists():
            kind = "native_crash" if proc.returncode < 0 else f"exit_{proc.returncode}"
            saved = save_finding(target, (work / "current").read_bytes(), kind, proc.stderr[-3000:], per_kind=10)
            total["findings"] += 1
            total["kinds"][kind] = total["kinds"].get(kind, 0) + 1
            if saved:
                total["new_findings"].append(saved.name)
    total["seconds_run"] = round(time.monotonic() - t0, 1)
    return total


def _child_limits(rss_mb: int):
    def limits():
        os.nice(19)
        soft = (rss_mb + 2048) << 20  # address space: a huge allocation fails instead of swapping the machine
        resource.setrlimit(resource.RLIMIT_AS, (soft, soft))
    return limits


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


# -- replay ------------------------------------------------------------------------------------------
def corpus_entries(target_name: str | None = None):
    for folder in sorted(CORPUS.iterdir()) if CORPUS.exists() else []:
        if folder.is_dir() and folder.name in TARGETS and (target_name is None or folder.name == target_name):
            for p in sorted(folder.iterdir()):
                if p.is_file() and not p.name.endswith(".txt") and not p.name.startswith("."):
                    yield TARGETS[folder.name], p


def replay_one(target: Target, data: bytes, timeout: float = 20.0):
    """(outcome, info) of one corpus input, with the hang guard."""
    _hang_guard(timeout)
    with tempfile.TemporaryDirectory(prefix=f"replay-{target.name}-") as d:
        folder = Path(d)
        target.setup(folder)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return execute(target, data, folder)
        except TimeoutError as exc:
            return Outcome.FINDING, ("hang", str(exc))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["list", "run", "campaign", "replay", "_child", "_mchild"])
    ap.add_argument("target", nargs="?")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds one input may take (a hang past it is a finding)")
    ap.add_argument("--rss-mb", type=int, default=3072)
    ap.add_argument("--engine", choices=["auto", "atheris", "mutation"], default="auto")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.command == "list":
        print("\n".join(TARGETS))
        return 0
    if args.command == "_child":
        atheris_child(args.target, args.seconds, args.timeout, args.rss_mb, args.workdir)
        return 0
    if args.command == "_mchild":
        st = run_mutation(TARGETS[args.target], args.seconds, args.timeout, args.seed, current=args.workdir / "current")
        (args.workdir / "current").unlink(missing_ok=True)
        (args.workdir / "child_stats.json").write_text(json.dumps(st))
        return 0
    if args.command == "replay":
        bad = 0
        for target, p in corpus_entries(args.target):
            outcome, info = replay_one(target, p.read_bytes())
            print(f"{target.name:16s} {p.name:60s} {outcome}" + (f"  {info[0]}" if info else ""))
            bad += outcome == Outcome.FINDING
        return 1 if bad else 0
    names = [args.target] if args.command == "run" else [n for n in TARGETS if args.target in (None, n)]
    if not names or any(n not in TARGETS for n in names):
        ap.error(f"target must be one of {', '.join(TARGETS)}")
    engine = args.engine if args.engine != "auto" else ("atheris" if have_atheris() else "mutation")
    STATS.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = TARGETS[name]
        if engine == "atheris":
            st = run_atheris(target, args.seconds, args.timeout, args.rss_mb)
        else:
            st = run_mutation_isolated(target, args.seconds, args.timeout, args.seed, args.rss_mb)
        st["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        prev = STATS / f"{name}.json"
        runs = json.loads(prev.read_text()).get("runs", []) if prev.exists() else []
        runs.append(st)
        prev.write_text(json.dumps({"target": name, "runs": runs}, indent=1))
        print(json.dumps({k: st[k] for k in ("target", "engine", "seconds_run", "executions", "refused", "ok",
                                             "findings", "new_findings", "kinds")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
