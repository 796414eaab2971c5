"""The RTK peers tuned as well as they can be: an oracle upper bound to report ours against.

The benchmark's RTK peers run at one setting each (ADMM-TV alpha 1, beta 100, 10 AL iterations, 3 CG
iterations; OS-SART 10 iterations, 5 views a subset, lambda 0.3). A user could tune them, so this
script runs the referee's sweep (``../shared/bench/rtk_sweep.py``, beside the project, run as a
subprocess, not copied) on one of the benchmark's RTK-made cases (benchmarks/rtk_reference.py:
made on first use and cached under ~/.cache/ctnerf_bench): ADMM-TV over (alpha, beta) at 30 AL
iterations, the best two then run to 120 AL iterations (it keeps improving past 60), and OS-SART
over (iterations, lambda). The best setting is chosen WITH the ground truth, by PSNR3D and by SSIM3D:
an upper bound on what a user could tune the peers to, not a setting a user could find.

    nice -n 19 python benchmarks/bench_peers_tuned.py --views 25
    nice -n 19 python benchmarks/bench_peers_tuned.py --ct ../shared/data/abdomen_small_ct.nii.gz \
        --views 40 --det 160 --pitch 3.2

It prints each setting as it finishes, then a table (method, settings, PSNR3D, SSIM3D, both again
with the margin, seconds; the best marked), and writes benchmarks/results/peers_tuned/<case name>.json
with every setting's row, the best by PSNR3D and by SSIM3D (overall and per method), the untuned
default settings' rows, the machine (cpu_count, load average at start and end, the niceness) and
the command. `--quick` is passed through to rtk_sweep.py (a smaller sweep).

Scorer margin (the decision). The referee's sweep scores each volume on the case's own grid with
score.py's default margin 0, while our default-grid runs (bench_default_grid.py) are scored with
`score.py --margin 2`. The margin does change the peers' figures: score.py crops `margin` voxels
off every face before the MSE and the SSIM, and a peer on the reference grid is worst exactly at
the cropped CT's hard box faces: PSNR3D rises with --margin 2 (ADMM-TV's default setting on the
25-view abdomen: 33.83 -> 34.05 dB) while SSIM3D can move either way (0.862 -> 0.858). To compare ours and
theirs the same way, every setting's volume is rescored with --margin 2 as well: rtk_sweep.py
writes each volume to a fresh tempfile.mkdtemp() folder and does not print the path, so the sweep
runs with TMPDIR set to a private folder and each JSON row is matched to the one new v.nrrd that
appeared before it (the sweep is sequential); the rescoring runs after the sweep has finished (so
it never shares the cores with a timed setting) with the referee's own score() imported from
score.py, and the volumes are then deleted. Both figures are kept in every row (`psnr`, `ssim`:
margin 0, the referee's; `psnr_m`, `ssim_m`: with the margin), and the best is given under both.
When a volume cannot be found, its row keeps only the margin-0 figures (`psnr_m` is null).

Seconds are the referee's: the time of the RTK filter's Update() alone (no loading, no scoring).
The machine has few cores and this is meant to run under `nice -n 19` beside other jobs, so the
seconds are upper bounds; the JSON records the niceness and the load averages.

`--ours LABEL=VOLUME` scores one of our volumes with the same two scorers for the table (its
seconds are unknown here; give them in the label if wanted).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rtk_reference import add_case_options, case_for, require_ct, run_peer  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
BENCH = HERE.parent / "shared" / "bench"


def load_score(score_py: Path):
    """The referee's score(ref, vol, scale, margin) from score.py."""
    spec = importlib.util.spec_from_file_location("referee_score", score_py)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.score


def settings(row: dict) -> str:
    if row["method"] == "admm-tv":
        s = f"alpha {row['alpha']:g}, beta {row['beta']:g}, {row['al']} AL"
        return s + (f", {row['cg']} CG" if "cg" in row else "")
    if row["method"] == "os-sart":
        return f"{row['iters']} it, lambda {row['lam']:g}" + (f", {row['subset']}/subset" if "subset" in row else "")
    return row.get("settings", "")


def new_volume(tmp: Path, seen: set) -> Path | None:
    """The one v.nrrd under `tmp` that was not there before (rtk_sweep writes one per setting)."""
    fresh = sorted((p for p in tmp.glob("*/v.nrrd") if p not in seen), key=lambda p: p.stat().st_mtime)
    if not fresh:
        return None
    seen.update(fresh)
    return fresh[-1] if len(fresh) == 1 else None  # more than one: ambiguous, do not guess


def run_sweep(sweep_py: Path, case: Path, quick: bool, tmp: Path, log) -> tuple[list, dict, list, float, str | None]:
    """Run rtk_sweep.py, reading its JSON lines as they come; returns (rows, referee best, command, seconds,
    error: None, or the end of its stderr when it failed; the rows that came before are kept)."""
    cmd = [sys.executable, "-u", str(sweep_py), str(case)] + (["--quick"] if quick else [])
    env = dict(os.environ, TMPDIR=str(tmp))
    rows, best, seen = [], {}, set()
    t0 = time.perf_counter()
    errf = tmp / "sweep.stderr"
    with open(errf, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=HERE)
        for line in proc.stdout:
            line = line.strip()
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                print(f"  [rtk_sweep] {line}", flush=True)
                continue
            if "method" in ev:
                vol = new_volume(tmp, seen)
                ev["volume"] = None if vol is None else str(vol)
                rows.append(ev)
                print(f"  {time.perf_counter() - t0:7.0f} s  [{len(rows):2d}] {ev['method']:8s} {settings(ev):32s} "
                      f"PSNR3D {ev['psnr']:6.2f}  SSIM3D {ev['ssim']:.4f}  {ev['seconds']:7.1f} s   "
                      f"load {os.getloadavg()[0]:.2f}", file=log, flush=True)
            elif "best_psnr" in ev:
                best = ev
    proc.wait()
    error = None
    if proc.returncode:
        error = f"rtk_sweep.py failed ({proc.returncode}) after {len(rows)} settings:\n{errf.read_text()[-3000:]}"
        print(error, file=sys.stderr, flush=True)
    return rows, best, cmd, time.perf_counter() - t0, error


def run_defaults(case: Path, tmp: Path, log) -> list:
    """The benchmark's untuned peers (rtk_reference.run_peer: ADMM-TV alpha 1 / beta 100 / 10 AL / 3 CG,
    OS-SART 10 iterations / 5 a subset / lambda 0.3), for comparison."""
    rows = []
    for method, row in (("rtk-admm-tv", dict(method="admm-tv", alpha=1.0, beta=100.0, al=10, cg=3)),
                        ("rtk-os-sart", dict(method="os-sart", iters=10, lam=0.3, subset=5))):
        path = tmp / f"default_{method}.nrrd"
        try:
            secs = run_peer(case, method, path)
        except RuntimeError as exc:  # e.g. RTK's ADMM-TV on a grid wider than the detector's field of view
            row.update(default=True, seconds=None, volume=None, error=str(exc).strip().splitlines()[-6:])
            rows.append(row)
            print(f"  default  {row['method']:8s} {settings(row):32s} FAILED: {' '.join(row['error'])}", file=log,
                  flush=True)
            continue
        row.update(default=True, seconds=round(secs, 2), volume=str(path))
        rows.append(row)
        print(f"  default  {row['method']:8s} {settings(row):32s} {row['seconds']:7.1f} s", file=log, flush=True)
    return rows


def rescore(rows: list, score, reference: Path, margin: int) -> None:
    """Add the referee's scores (margin 0 where missing, and `margin`) from each row's volume."""
    for r in rows:
        vol = r.get("volume")
        if vol and Path(vol).exists():
            if "psnr" not in r:
                r.update(score(str(reference), vol))
            s = score(str(reference), vol, 1.0, margin) if margin else dict(psnr=r["psnr"], ssim=r["ssim"])
            r["psnr_m"], r["ssim_m"] = s["psnr"], s["ssim"]
        else:
            r.setdefault("psnr", None); r.setdefault("ssim", None)
            r["psnr_m"] = r["ssim_m"] = None


def itk_version() -> str | None:
    try:
        from importlib.metadata import version
        return f"itk {version('itk')}, itk-rtk {version('itk-rtk')}"
    except Exception:  # noqa: BLE001 - only a note in the JSON
        return None


def best_of(rows: list, key: str):
    rows = [r for r in rows if r.get(key) is not None]
    return max(rows, key=lambda r: r[key]) if rows else None


def summary(r: dict | None) -> dict | None:
    if r is None:
        return None
    return {k: v for k, v in r.items() if k != "volume"} | {"settings": settings(r)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_options(ap)
    ap.add_argument("--views", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="rtk_sweep.py --quick (a smaller sweep)")
    ap.add_argument("--sweep-py", type=Path, default=BENCH / "rtk_sweep.py",
                    help="the referee's sweep (default ../shared/bench/rtk_sweep.py beside the project)")
    ap.add_argument("--score-py", type=Path, default=BENCH / "score.py", help="the referee's scorer")
    ap.add_argument("--scorer-margin", type=int, default=2,
                    help="also score every volume with score.py --margin N, as our default-grid runs are "
                         "(the sweep itself scores with margin 0; 0 here: no rescoring)")
    ap.add_argument("--no-defaults", action="store_true",
                    help="skip the untuned default-setting peers (run for comparison otherwise)")
    ap.add_argument("--ours", action="append", default=[], metavar="LABEL=VOLUME",
                    help="score one of our volumes with the same scorers, for the table")
    ap.add_argument("--out", type=Path, default=HERE / "benchmarks" / "results" / "peers_tuned")
    a = ap.parse_args(argv)
    for what, path in (("rtk_sweep.py", a.sweep_py), ("score.py", a.score_py)):
        if not path.exists():
            raise SystemExit(f"{path}: the referee's {what} is not there. It lives beside the project "
                             f"(../shared/bench, not part of the repository); pass --sweep-py / --score-py.")
    require_ct(a)
    ours = []
    for spec in a.ours:
        label, sep, vol = spec.partition("=")
        if not sep or not Path(vol).exists():
            raise SystemExit(f"--ours {spec}: write LABEL=VOLUME with an existing volume")
        ours.append(dict(method="ours", settings=label, volume=vol, seconds=None))
    score = load_score(a.score_py)
    load_start = os.getloadavg()
    t_start = time.time()
    case = case_for(a, a.views)
    name = case.name
    reference = case / "reference.nrrd"
    tmp = Path(tempfile.mkdtemp(prefix="peers_tuned_"))
    log = sys.stdout
    try:
        print(f"{name}: rtk_sweep.py{' --quick' if a.quick else ''} (niceness {os.nice(0)}, "
              f"{os.cpu_count()} CPUs, load {load_start[0]:.2f})", flush=True)
        rows, referee_best, sweep_cmd, sweep_s, sweep_error = run_sweep(a.sweep_py, case, a.quick, tmp, log)
        load_after_sweep = os.getloadavg()
        defaults = [] if a.no_defaults else run_defaults(case, tmp, log)
        print(f"  scoring {len(rows) + len(defaults) + len(ours)} volumes"
              f"{f' with --margin {a.scorer_margin}' if a.scorer_margin else ''}", flush=True)
        rescore(rows + defaults + ours, score, reference, a.scorer_margin)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_end = os.getloadavg()
    m = a.scorer_margin
    best = {}
    for label, pool in (("all", rows), *((meth, [r for r in rows if r["method"] == meth]) for meth in ("admm-tv", "os-sart"))):
        best[label] = dict(psnr=summary(best_of(pool, "psnr")), ssim=summary(best_of(pool, "ssim")),
                           psnr_margin=summary(best_of(pool, "psnr_m")), ssim_margin=summary(best_of(pool, "ssim_m")))
    marks = {}
    for meth in ("admm-tv", "os-sart"):
        for key, tag in (("psnr", "P"), ("ssim", "S"), ("psnr_margin", "p"), ("ssim_margin", "s")):
            b = best[meth][key]
            if b is not None:
                i = next(i for i, r in enumerate(rows) if summary(r) == b)
                marks[i] = marks.get(i, "") + tag

    def fmt(v, spec):
        return f"{v:{spec}}" if v is not None else "-"

    print(f"\n{name}: oracle-tuned RTK peers ({len(rows)} settings{', quick' if a.quick else ''}); "
          f"scored by score.py on the case's grid, margin 0 and margin {m}")
    print(f"{'method':8s} {'settings':40s} {'PSNR3D':>7s} {'SSIM3D':>7s} {f'P m{m}':>7s} {f'S m{m}':>7s} "
          f"{'seconds':>8s}  best")
    for i, r in enumerate(rows):
        print(f"{r['method']:8s} {settings(r):40s} {r['psnr']:7.2f} {r['ssim']:7.4f} {fmt(r['psnr_m'], '7.2f'):>7s} "
              f"{fmt(r['ssim_m'], '7.4f'):>7s} {r['seconds']:8.1f}  {marks.get(i, '')}")
    for r in defaults:
        print(f"{r['method']:8s} {'default: ' + settings(r):40s} {fmt(r['psnr'], '7.2f'):>7s} "
              f"{fmt(r['ssim'], '7.4f'):>7s} {fmt(r['psnr_m'], '7.2f'):>7s} {fmt(r['ssim_m'], '7.4f'):>7s} "
              f"{fmt(r['seconds'], '8.1f'):>8s}  {'untuned' if 'error' not in r else 'untuned, FAILED'}")
    for r in ours:
        print(f"{'ours':8s} {r['settings'][:40]:40s} {r['psnr']:7.2f} {r['ssim']:7.4f} {fmt(r['psnr_m'], '7.2f'):>7s} "
              f"{fmt(r['ssim_m'], '7.4f'):>7s} {'':>8s}")
    print(f"best of each method: P/S by PSNR3D/SSIM3D (margin 0), p/s with --margin {m}. Seconds: RTK Update() "
          f"only, niceness {os.nice(0)}, load {load_start[0]:.2f} -> {load_end[0]:.2f} on {os.cpu_count()} CPUs "
          f"(upper bounds)")
    result = dict(
        case=name, case_dir=str(case), case_json=json.loads((case / "case.json").read_text()),
        ct=a.ct.name, views=a.views, det=a.det, pitch=a.pitch, i0=a.i0, quick=a.quick,
        command=" ".join(shlex.quote(c) for c in [sys.executable, *sys.argv]),
        sweep_command=" ".join(shlex.quote(c) for c in sweep_cmd),
        scorer=dict(psnr_ssim="score.py on the case's reference grid, margin 0 (the referee's sweep)",
                    psnr_m_ssim_m=f"score.py --margin {m} (as bench_default_grid.py scores ours)" if m else None,
                    margin_changes_figures=any(r["psnr_m"] is not None and r["psnr_m"] != r["psnr"] for r in rows)),
        seconds_note="RTK filter Update() only (the referee's timing); run under nice beside other jobs: upper bounds",
        machine=dict(cpu_count=os.cpu_count(), niceness=os.nice(0), itk_version=itk_version(), load_average_start=load_start,
                     load_average_after_sweep=load_after_sweep, load_average_end=load_end,
                     started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
                     sweep_wall_s=round(sweep_s, 1), wall_s=round(time.time() - t_start, 1)),
        best=best, referee_best=referee_best, sweep_error=sweep_error,
        rows=[summary(r) for r in rows], defaults=[summary(r) for r in defaults],
        ours=[summary(r) | {"volume": r["volume"]} for r in ours])
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{name}{'_quick' if a.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    if sweep_error:
        raise SystemExit("the sweep did not finish (sweep_error in the JSON); the table holds the settings before it")


if __name__ == "__main__":
    main()
