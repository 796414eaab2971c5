#!/usr/bin/env python3
"""Our FDK (every filter) against RTK's FDK on the abdomen sparse-view cases: quality and time.

The cases are the team referee's (abdomen CT, 25 and 50 views, 240 x 240 detector at 3.2 mm,
I0 = 1e5), made with RTK's Joseph projector: by the referee's own make_rtk_case.py when it is
found (../shared/bench, or --maker), else by benchmarks/rtk_reference.py (the same recipe). They
are kept in a cache folder outside the repository. Both reconstructions land on the ground
truth's grid and are scored in world coordinates as the referee's score.py does
(CTNeRFReconLib.metrics.score_volumes). Prints a table and writes JSON.

    python benchmarks/bench_fdk.py --views 25 50 --out bench_results/fdk

Needs the bench extra (itk-rtk). Times are wall seconds of the reconstruction call alone (data
already in memory), median of --repeats runs, with torch's and ITK's default threads. The
`ours-cli` rows time the whole command a user runs, from a fresh interpreter to a complete run
folder (volume, metrics, previews): `python -m CTNeRFReconLib reconstruct CASE --method fdk
--reference CASE/reference.nrrd --quiet`, median of --repeats runs; its volume is scored by the
referee's score.py when it is found (../shared/bench).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# as `reconstruct --method fdk` does (cli.py): OpenMP threads sleep rather than spin between loops,
# which keeps FDK fast when anything else shares the cores; it must be set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from CTNeRFReconLib.fdk import FILTERS, FDKConfig, fdk  # noqa: E402
from CTNeRFReconLib.formats import load_scan  # noqa: E402
from CTNeRFReconLib.metrics import score_volumes  # noqa: E402
from CTNeRFReconLib.volume_io import read_volume  # noqa: E402
from rtk_reference import case_name, make_case, require_ct, run_peer  # noqa: E402

HERE = Path(__file__).resolve().parents[1]


def build_case(ct: Path, cases: Path, views: int, maker: Path | None) -> Path:
    """The referee's case for `views`, made once and cached."""
    if maker is not None and maker.exists():
        out = cases / f"referee_abdomen_{views}v_det240"
        if not (out / "case.json").exists():
            subprocess.run([sys.executable, str(maker), str(ct), str(out), "--views", str(views), "--det", "240",
                            "--pitch", "3.2", "--i0", "1e5"], check=True, capture_output=True, text=True)
        return out
    return make_case(ct, cases / case_name(ct, views), views=views)


def time_ours(scan, grid, config: FDKConfig, device: str, repeats: int):
    fdk(scan, grid, config, device=device)  # warm-up (allocator, FFT plans)
    times, vol = [], None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        vol = fdk(scan, grid, config, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return vol, statistics.median(times)


def time_cli(case: Path, out: Path, repeats: int) -> tuple[float, Path]:
    """Median wall seconds of the whole FDK command line (default filter) on a case, and its run folder."""
    import shutil

    times = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "CTNeRFReconLib", "reconstruct", str(case), "--out", str(out),
                        "--method", "fdk", "--reference", str(case / "reference.nrrd"), "--quiet"],
                       check=True, cwd=HERE, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def referee_score(reference: Path, volume: Path, script: Path) -> dict | None:
    if not script.exists():
        return None
    res = subprocess.run([sys.executable, str(script), str(reference), str(volume)], capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", type=Path, default=HERE.parent / "shared" / "data" / "abdomen_ct.nii.gz")
    ap.add_argument("--maker", type=Path, default=HERE.parent / "shared" / "bench" / "make_rtk_case.py",
                    help="the referee's case maker; benchmarks/rtk_reference.py is used when it is absent")
    ap.add_argument("--cases", type=Path, default=Path.home() / ".cache" / "ctnerf_bench",
                    help="where the RTK-made cases are kept between runs")
    ap.add_argument("--views", type=int, nargs="+", default=[25, 50])
    ap.add_argument("--filters", nargs="+", default=list(FILTERS), choices=FILTERS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "bench_results" / "fdk")
    ap.add_argument("--no-cli", action="store_true", help="skip timing the whole command line")
    a = ap.parse_args(argv)
    require_ct(a)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for views in a.views:
        case = build_case(a.ct, a.cases, views, a.maker)
        ref = read_volume(case / "reference.nrrd")
        scan = load_scan(case)
        rtk_path = a.out / f"rtk_fdk_{views}v.nrrd"
        rtk_s = statistics.median(run_peer(case, "rtk-fdk", rtk_path) for _ in range(a.repeats))
        rtk = score_volumes(ref, read_volume(rtk_path))
        rows.append(dict(views=views, method="rtk-fdk", filter="ram-lak", seconds=round(rtk_s, 3),
                         psnr=round(rtk["psnr"], 3), ssim=round(rtk["ssim"], 4), nrmse=round(rtk["nrmse"], 5)))
        print(json.dumps(rows[-1]), flush=True)
        for name in a.filters:
            vol, sec = time_ours(scan, ref.grid, FDKConfig(filter=name), a.device, a.repeats)
            s = score_volumes(ref, vol)
            rows.append(dict(views=views, method="ours", filter=name, device=a.device, seconds=round(sec, 3),
                             psnr=round(s["psnr"], 3), ssim=round(s["ssim"], 4), nrmse=round(s["nrmse"], 5),
                             psnr_minus_rtk=round(s["psnr"] - rtk["psnr"], 3)))
            print(json.dumps(rows[-1]), flush=True)
        if not a.no_cli:
            sec, run = time_cli(case, a.out / f"cli_run_{views}v", a.repeats)
            s = json.loads((run / "metrics.json").read_text())
            row = dict(views=views, method="ours-cli", filter="hann", device="auto", seconds=round(sec, 3),
                       psnr=round(s["psnr"], 3), ssim=round(s["ssim"], 4), nrmse=round(s["nrmse"], 5),
                       psnr_minus_rtk=round(s["psnr"] - rtk["psnr"], 3))
            referee = referee_score(case / "reference.nrrd", run / "volume.nrrd",
                                    HERE.parent / "shared" / "bench" / "score.py")
            if referee is not None:
                row["referee_psnr"], row["referee_ssim"] = referee["psnr"], referee["ssim"]
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'views':>5s} {'method':8s} {'filter':12s} {'PSNR3D':>8s} {'SSIM3D':>7s} {'NRMSE':>8s} "
          f"{'vs RTK':>7s} {'seconds':>8s}")
    for r in rows:
        gap = "" if "psnr_minus_rtk" not in r else f"{r['psnr_minus_rtk']:+.2f}"
        print(f"{r['views']:5d} {r['method']:8s} {r['filter']:12s} {r['psnr']:8.2f} {r['ssim']:7.3f} "
              f"{r['nrmse']:8.4f} {gap:>7s} {r['seconds']:8.2f}")
    info = dict(cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=a.device,
                torch=torch.__version__, cases=str(a.cases), repeats=a.repeats, results=rows)
    (a.out / "results.json").write_text(json.dumps(info, indent=1))
    print(f"\nwrote {a.out / 'results.json'}")


if __name__ == "__main__":
    main()
