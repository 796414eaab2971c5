#!/usr/bin/env python3
"""A scan of clinical size, end to end as a user runs it: `simulate` it, then `reconstruct` it for a few
iterations, and measure what the set-up costs before the first iteration (seconds, peak memory) and the
seconds an iteration then takes.

Why: every other benchmark uses 25-100 views of at most 256^2 pixels (under 7 M rays). A CBCT or
micro-CT scan has hundreds of views of 512^2 to 1536^2 pixels; 360 views of 768^2 (212 M rays, 850 MB of
line integrals) were killed for memory on a 24 GB machine before the training rays were built a few
million at a time (nerf/ray_table.py), and `simulate` took 26 s a view before it used the fused kernel of
Joseph's rule.

    python benchmarks/bench_large_scan.py --views 360 --det 768 --pitch 0.8 --work /tmp/large \
        --out benchmarks/results/large_scan/v360_d768.json

Each command runs in its own process; its peak resident memory is sampled every 0.2 s (psutil).
Prints a table and writes the JSON (refuses to overwrite it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT.parent / "shared" / "data" / "abdomen_ct.nii.gz"


def run_measured(cmd: list[str]) -> dict:
    """Run a command; its wall seconds, peak RSS (MB) and the times (since start) of its event lines."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(proc.pid)
    peak = 0
    lines: list[tuple[float, str]] = []
    import threading

    def read():
        for line in proc.stdout:
            lines.append((time.time() - t0, line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    reader.join()
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return {"seconds": round(time.time() - t0, 1), "peak_rss_mb": round(peak / 2 ** 20), "lines": lines}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", type=int, default=360)
    ap.add_argument("--det", type=int, default=768)
    ap.add_argument("--pitch", type=float, default=0.8)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--ct", type=Path, default=CT)
    ap.add_argument("--work", type=Path, required=True, help="folder for the case and the run (reused case)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; give another --out")
    py = sys.executable
    case = args.work / f"v{args.views}_d{args.det}"
    result = {"views": args.views, "det": args.det, "pitch": args.pitch, "ct": args.ct.name,
              "iterations": args.iterations, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "note": args.note}
    if not (case / "projections.mha").exists():
        sim = run_measured([py, "-m", "CTNeRFReconLib", "simulate", str(args.ct), "--views", str(args.views),
                            "--det", str(args.det), "--pitch", str(args.pitch), "--out", str(case), "--quiet"])
        result["simulate"] = {k: sim[k] for k in ("seconds", "peak_rss_mb")}
    run_dir = args.work / f"run_{int(time.time())}"
    rec = run_measured([py, "-m", "CTNeRFReconLib", "reconstruct", str(case), "--out", str(run_dir),
                        "--iterations", str(args.iterations), "--device", "cpu", "--progress-every", "5"])
    events = [(t, json.loads(line)) for t, line in rec["lines"] if line.startswith("{")]
    progress = [(t, e) for t, e in events if e["event"] == "progress"]
    started = next(t for t, e in events if e["event"] == "started")
    first_t, first = progress[0]
    last_t, last = progress[-1]
    finished = next(e for _, e in events if e["event"] == "finished")
    run = json.loads((run_dir / "run.json").read_text())
    result["reconstruct"] = {
        "seconds": rec["seconds"], "peak_rss_mb": rec["peak_rss_mb"],
        # from the command's start to the first iteration: loading and checking the data (until `started`),
        # then carving, the noise law, the rays and the first field
        "started_s": round(started, 1), "setup_s": round(first_t - first["elapsed_s"], 1),
        "seconds_per_iteration": round((last["elapsed_s"] - first["elapsed_s"]) / max(1, last["iteration"]
                                                                                   - first["iteration"]), 3),
        "training_grid": (run.get("method_report", {}).get("support") or {}).get("training_grid_shape_xyz"),
        "output_grid": run["grid"]["shape_xyz"], "rays_per_batch": last.get("rays_per_batch"),
        "psnr_after": (finished.get("metrics") or {}).get("psnr"), "run_dir": str(run_dir)}
    sim = result.get("simulate")
    r = result["reconstruct"]
    print(f"{'step':<12} {'seconds':>8} {'peak RSS MB':>12}  notes")
    if sim:
        print(f"{'simulate':<12} {sim['seconds']:>8} {sim['peak_rss_mb']:>12}  {args.views} views of {args.det}^2")
    print(f"{'reconstruct':<12} {r['seconds']:>8} {r['peak_rss_mb']:>12}  set-up {r['setup_s']} s before the first "
          f"iteration, then {r['seconds_per_iteration']} s an iteration on grid {r['output_grid']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
