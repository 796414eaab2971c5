#!/usr/bin/env python3
"""Quality against time on the abdomen sparse-view cases: our FDK and nerf vs RTK's peers.

Builds the cases of the team's referee (abdomen CT, 25 and 50 views, 240 x 240 detector at
3.2 mm, I0 = 1e5) with RTK's Joseph projector (benchmarks/rtk_reference.py, independent of our
projector), runs our methods through the real command line (a subprocess each, as a user would)
and RTK's OS-SART and ADMM-TV with the referee's settings, scores every volume in world
coordinates against the ground truth (CTNeRFReconLib.metrics, which matches the referee's
score.py), and writes a table, JSON and a PNG of PSNR3D against time.

    python benchmarks/bench_nerf.py --ct ../shared/data/abdomen_ct.nii.gz --views 25 50 \
        --out bench_results/nerf

Needs the bench extra (itk-rtk). Peak memory is the peak resident set of the method's process
(ours) or of this process while RTK runs (peers).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from CTNeRFReconLib.metrics import score_volumes  # noqa: E402
from CTNeRFReconLib.volume_io import read_volume  # noqa: E402
from rtk_reference import add_case_options, case_for, require_ct, run_peer  # noqa: E402


class PeakRSS:
    """Samples the resident memory of a process tree every 0.1 s."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self._stop.wait(0.1)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2 ** 20


def prebuild_kernels() -> None:
    """Build the fused kernels (CTNeRFReconLib.kernels) before any timed run: a first use, or sources
    changed since the last build, would otherwise put a compile (about 17 s on 2 cores) into the first
    run's seconds and cost it iterations under a time limit."""
    subprocess.run([sys.executable, "-m", "CTNeRFReconLib.kernels", "build"], cwd=Path(__file__).resolve().parents[1],
                   capture_output=True, check=False)


def run_ours(case: Path, method: str, out: Path, extra: list[str], time_limit: float | None = None) -> dict:
    """Run the CLI; copy each snapshot as it is announced, to score the PSNR-against-time curve.

    `nerf-torch` is the nerf method with the fused kernels off (the PyTorch renderer).
    """
    run_dir = out / f"run_{method}"
    cli_method = method
    if method == "nerf-torch":
        cli_method, extra = "nerf", [*extra, "--no-kernels"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "CTNeRFReconLib", "reconstruct", str(case), "--out", str(run_dir),
           "--reference", str(case / "reference.nrrd"), "--method", cli_method, "--device", "cpu", "--quiet",
           *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    mem = PeakRSS(proc.pid)
    if time_limit:
        # the worker's own cancel: it stops at its next step and keeps its volume
        threading.Timer(time_limit, lambda: (run_dir / "cancel").touch()).start()
    curve, progress = [], []
    for line in proc.stdout:
        ev = json.loads(line)
        if ev["event"] == "snapshot":
            keep = out / f"{method}_snap_{ev['sequence']:04d}.nrrd"
            shutil.copyfile(ev["path"], keep)
            curve.append((time.perf_counter() - t0, ev["iteration"], keep))
        elif ev["event"] == "progress" and ev.get("iteration") is not None:
            progress.append((ev["iteration"], ev.get("elapsed_s")))
        elif ev["event"] == "failed":
            raise RuntimeError(f"{method} failed: {ev['message']}")
    proc.wait()
    seconds = time.perf_counter() - t0
    peak = mem.stop()
    ref = read_volume(case / "reference.nrrd")
    final = score_volumes(ref, read_volume(run_dir / "volume.nrrd"))
    points = [dict(seconds=round(t, 2), iteration=it, **_psnr_ssim(score_volumes(ref, read_volume(p))))
              for t, it, p in curve]
    points.append(dict(seconds=round(seconds, 2), iteration=progress[-1][0] if progress else None,
                       **_psnr_ssim(final)))
    rate = None
    if len(progress) >= 2 and progress[-1][1]:
        rate = progress[-1][0] / progress[-1][1]
    return dict(method=method, seconds=round(seconds, 2), peak_memory_mb=round(peak, 1),
                iterations_per_s=None if rate is None else round(rate, 3), curve=points,
                **_psnr_ssim(final))


def _psnr_ssim(s: dict) -> dict:
    return dict(psnr=round(float(s["psnr"]), 3), ssim=round(float(s["ssim"]), 4))


def run_rtk(case: Path, method: str, out: Path) -> dict:
    path = out / f"{method}.nrrd"
    mem = PeakRSS(os.getpid())
    seconds = run_peer(case, method, path)
    peak = mem.stop()
    s = score_volumes(read_volume(case / "reference.nrrd"), read_volume(path))
    return dict(method=method, seconds=round(seconds, 2), peak_memory_mb=round(peak, 1),
                iterations_per_s=None, curve=[dict(seconds=round(seconds, 2), **_psnr_ssim(s))], **_psnr_ssim(s))


def plot(results: dict, path: Path, ct_name: str = "abdomen_ct"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (views, rows) in zip(axes[0], results.items()):
        for r in rows:
            xs = [p["seconds"] for p in r["curve"]]
            ys = [p["psnr"] for p in r["curve"]]
            ax.plot(xs, ys, "o-" if len(xs) > 1 else "s", label=f"{r['method']} ({r['psnr']:.2f} dB)")
        ax.set_xscale("log")
        ax.set_xlabel("wall time on this machine [s]")
        ax.set_ylabel("PSNR3D [dB]")
        ax.set_title(f"{ct_name}, {views} views")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Quality against time (CT data: TotalSegmentator, CC BY 4.0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _time_limit(method: str, a) -> float | None:
    if method == "nerf-torch" and a.no_kernels_time_limit:
        return a.no_kernels_time_limit
    return a.time_limit if method.startswith("nerf") else None


def time_to_peer(results: dict) -> dict:
    """Per view count: the best RTK peer's PSNR3D and the wall time at which each of our iterative runs
    first reached it (from the scored snapshots; None when it never did within the run)."""
    out = {}
    for views, rows in results.items():
        peers = [r for r in rows if r["method"].startswith("rtk-")]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["psnr"])
        reached = {}
        for r in rows:
            if r["method"].startswith("nerf"):
                reached[r["method"]] = next((p["seconds"] for p in r["curve"] if p["psnr"] >= best["psnr"]), None)
        out[views] = dict(peer=best["method"], peer_psnr=best["psnr"], seconds_to_peer_psnr=reached)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    add_case_options(ap)
    ap.add_argument("--views", type=int, nargs="+", default=[25, 50])
    ap.add_argument("--out", type=Path, default=here / "bench_results" / "nerf")
    ap.add_argument("--methods", nargs="+", default=["fdk", "nerf", "rtk-os-sart", "rtk-admm-tv"],
                    help="ours: fdk, nerf, nerf-torch (kernels off); RTK: rtk-fdk, rtk-os-sart, rtk-admm-tv")
    ap.add_argument("--nerf-args", default="", help="extra CLI arguments for our nerf runs")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="cancel our iterative runs after this many seconds (curves compared at equal time)")
    ap.add_argument("--no-kernels-views", type=int, nargs="*", default=None,
                    help="view counts on which nerf-torch runs, when it is among --methods (default: the first "
                         "of --views; it is slow)")
    ap.add_argument("--no-kernels-time-limit", type=float, default=600.0,
                    help="cancel nerf-torch (kernels off) after this many seconds: its curve is the fused "
                         "run's, slower, so a part of it shows the time ratio (0 = no limit)")
    a = ap.parse_args(argv)
    require_ct(a)
    prebuild_kernels()
    a.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for views in a.views:
        case = case_for(a, views)
        out = a.out / f"{views}v"
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for method in a.methods:
            torch_views = a.views[:1] if a.no_kernels_views is None else a.no_kernels_views
            if method == "nerf-torch" and views not in torch_views:
                continue
            if method.startswith("rtk-"):
                row = run_rtk(case, method, out)
            else:
                row = run_ours(case, method, out, a.nerf_args.split() if method.startswith("nerf") else [],
                               time_limit=_time_limit(method, a))
            row["views"] = views
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
            rows.append(row)
        results[views] = rows
    print(f"\n{'views':>5s} {'method':12s} {'PSNR3D':>8s} {'SSIM3D':>7s} {'seconds':>8s} {'it/s':>6s} {'peak MB':>8s}")
    for views, rows in results.items():
        for r in rows:
            ips = "" if r["iterations_per_s"] is None else f"{r['iterations_per_s']:.2f}"
            print(f"{views:5d} {r['method']:12s} {r['psnr']:8.2f} {r['ssim']:7.3f} {r['seconds']:8.1f} "
                  f"{ips:>6s} {r['peak_memory_mb']:8.0f}")
    reach = time_to_peer(results)
    for views, row in reach.items():
        print(f"{views} views: best classical peer {row['peer']} {row['peer_psnr']:.2f} dB; reached by "
              + ", ".join(f"{m} after {t:.0f} s" if t is not None else f"{m} not within its run"
                          for m, t in row["seconds_to_peer_psnr"].items()))
    (a.out / "results.json").write_text(json.dumps(dict(cpu_count=os.cpu_count(), time_limit_s=a.time_limit,
                                                        ct=a.ct.name, det=a.det, pitch=a.pitch, i0=a.i0,
                                                        time_to_peer=reach, results=results), indent=1))
    plot(results, a.out / "psnr_vs_time.png", a.ct.name.split(".")[0])
    print(f"\nwrote {a.out / 'results.json'} and {a.out / 'psnr_vs_time.png'}")


if __name__ == "__main__":
    main()
