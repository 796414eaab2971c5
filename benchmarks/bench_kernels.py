"""Fused renderer kernels vs the PyTorch path: training iterations per second and peak memory.

One iteration = forward + backward of a batch of line integrals, as in training (jittered
samples, gradient to the field). Each (case, path) runs in its own subprocess so its peak memory
(CPU: growth of the peak resident set over the process's baseline; CUDA: max allocated) is its own.

Cases (the sizes of the issue):
  grid: 122 x 101 x 112 voxel grid (x, y, z), 65536 rays x 256 samples
  joseph: the same grid and rays by Joseph's rule (one bilinear lookup per plane crossed; "samples"
          is the largest dimension, an upper bound on the planes a ray crosses)
  vm:   TensoRF-VM C = 16, R = 128, 16384 rays x 192 samples

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--iters 3] [--scale 1.0] [--out DIR]

Writes DIR/bench_kernels.json and DIR/bench_kernels.png (default DIR: benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {
    "grid": dict(shape_xyz=(122, 101, 112), spacing=3.0, rays=65536, samples=256),
    "joseph": dict(shape_xyz=(122, 101, 112), spacing=3.0, rays=65536, samples=122),
    "vm": dict(channels=16, resolution=128, rays=16384, samples=192, box=150.0),
}


def _rays(n, lo, hi, device, seed=0):
    """Cone-beam-like rays from a source 1000 mm away through random points of the box."""
    import torch

    from CTNeRFReconLib.rays import clip_to_box

    g = torch.Generator().manual_seed(seed)
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 2 * torch.pi
    src = torch.stack([1000 * torch.cos(angle), 1000 * torch.sin(angle), torch.zeros(n, dtype=torch.float64)], 1)
    target = lo_t + torch.rand(n, 3, generator=g, dtype=torch.float64) * (hi_t - lo_t)
    d = torch.nn.functional.normalize(target - src, dim=1)
    tn, tf = clip_to_box(src, d, lo, hi)
    return [t.to(device=device, dtype=torch.float32) for t in (src, d, tn, tf)]


def _setup(case: str, scale: float, device: str):
    """Inputs and the two callables (fused, reference) of one case."""
    import torch

    from CTNeRFReconLib import fused

    cfg = CASES[case]
    n = max(1, int(cfg["rays"] * scale))
    s = cfg["samples"]
    g = torch.Generator().manual_seed(1)
    if case in ("grid", "joseph"):
        nx, ny, nz = cfg["shape_xyz"]
        sp = cfg["spacing"]
        vol = torch.rand((nz, ny, nx), generator=g).to(device).requires_grad_(True)
        origin = [-(nx - 1) * sp / 2, -(ny - 1) * sp / 2, -(nz - 1) * sp / 2]
        lo = [o - sp / 2 for o in origin]
        hi = [o + (k - 0.5) * sp for o, k in zip(origin, (nx, ny, nz))]
        o, d, tn, tf = _rays(n, lo, hi, device)
        org = torch.tensor(origin, device=device)
        spc = torch.full((3,), sp, device=device)
        params = [vol]

        def fused_fn(seed):
            if case == "joseph":
                return fused.JosephLineIntegrals.apply(vol, org, spc, o, d, tn, tf)
            return fused.GridLineIntegrals.apply(vol, org, spc, o, d, tn, tf, s, seed)

        def ref_fn(seed):
            if case == "joseph":
                return fused.joseph_line_integrals_reference(vol, org, spc, o, d, tn, tf)
            return fused.grid_line_integrals_reference(vol, org, spc, o, d, tn, tf, s, seed)
    else:
        c, r, b = cfg["channels"], cfg["resolution"], cfg["box"]
        planes = (torch.randn(3, c, r, r, generator=g) * 0.3).to(device).requires_grad_(True)
        lines = (torch.randn(3, c, r, generator=g) * 0.3).to(device).requires_grad_(True)
        basis = (torch.randn(3 * c, generator=g) / c ** 0.5).to(device).requires_grad_(True)
        bias = torch.tensor([-1.0], device=device, requires_grad=True)
        lo_t = torch.full((3,), -b, device=device)
        hi_t = torch.full((3,), b, device=device)
        o, d, tn, tf = _rays(n, [-b] * 3, [b] * 3, device)
        params = [planes, lines, basis, bias]

        def fused_fn(seed):
            return fused.VMLineIntegrals.apply(planes, lines, basis, bias, lo_t, hi_t, o, d, tn, tf, s, seed)

        def ref_fn(seed):
            return fused.vm_line_integrals_reference(planes, lines, basis, bias, lo_t, hi_t, o, d, tn, tf, s, seed)

    return fused_fn, ref_fn, params, n, s


def run_single(case: str, path: str, device: str, iters: int, scale: float) -> dict:
    """Time `iters` training iterations of one path after one warm-up; report its peak memory."""
    import torch

    from CTNeRFReconLib import kernels

    if path == "fused" and not kernels.kernels_available(device):
        return dict(case=case, path=path, error=f"kernels not available on {device}: {kernels.last_error()}")
    fused_fn, ref_fn, params, n, s = _setup(case, scale, device)
    fn = fused_fn if path == "fused" else ref_fn
    target = torch.zeros(n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def iteration(i):
        loss = ((fn(1000 + i) - target) ** 2).mean()
        torch.autograd.grad(loss, params)

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    iteration(0)  # warm-up (and for the fused path, the first-use load)
    sync()
    times = []
    for i in range(iters):
        start = time.perf_counter()
        iteration(i + 1)
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024  # KiB -> MiB
    best = min(times)
    return dict(case=case, path=path, device=device, rays=n, samples=s, iters=iters,
                seconds_per_iter=best, median_seconds=sorted(times)[len(times) // 2],
                iters_per_s=1.0 / best, samples_per_s=n * s / best, peak_mb=round(peak_mb, 1),
                threads=torch.get_num_threads())


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "iters_per_s", "iterations / s (fwd + bwd)"), (axes[1], "peak_mb", "peak MiB")):
        for j, p in enumerate(("reference", "fused")):
            vals = [next((r.get(key, 0) for r in rows if r["case"] == c and r["path"] == p), 0) for c in cases]
            ax.bar([i + (j - 0.5) * 0.38 for i in range(len(cases))], vals, width=0.38, label=p)
        ax.set_xticks(range(len(cases)), cases)
        ax.set_title(label)
        ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"fused renderer kernels vs PyTorch path ({rows[0].get('device', '')}, "
                 f"{rows[0].get('threads', '?')} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per path (after one warm-up)")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the rays of each case (quick runs)")
    ap.add_argument("--cases", default="grid,joseph,vm")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--single", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.single:
        print(json.dumps(run_single(args.single[0], args.single[1], args.device, args.iters, args.scale)))
        return 0
    rows = []
    for case in args.cases.split(","):
        for path in ("fused", "reference"):
            cmd = [sys.executable, __file__, "--single", case, path, "--device", args.device,
                   "--iters", str(args.iters), "--scale", str(args.scale)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if proc.returncode != 0:
                rows.append(dict(case=case, path=path, error=proc.stderr.strip().splitlines()[-1:]))
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {case:5s} {path:9s} done", file=sys.stderr)
    print(f"{'case':5s} {'path':9s} {'rays x samples':>15s} {'s/iter':>8s} {'iter/s':>8s} {'peak MiB':>9s} {'speed-up':>8s}")
    for case in args.cases.split(","):
        by = {r["path"]: r for r in rows if r["case"] == case}
        for path in ("reference", "fused"):
            r = by.get(path, {})
            if "error" in r or not r:
                print(f"{case:5s} {path:9s} error: {r.get('error')}")
                continue
            up = (by["reference"]["seconds_per_iter"] / r["seconds_per_iter"]
                  if "seconds_per_iter" in by.get("reference", {}) else float("nan"))
            print(f"{case:5s} {path:9s} {r['rays']:>7d} x {r['samples']:<5d} {r['seconds_per_iter']:8.3f} "
                  f"{r['iters_per_s']:8.2f} {r['peak_mb']:9.1f} {up:7.1f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=platform.processor() or platform.machine(), python=platform.python_version(),
                cpu_count=os.cpu_count(), scale=args.scale)
    (args.out / "bench_kernels.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    ok = [r for r in rows if "error" not in r]
    if ok:
        chart(ok, args.out / "bench_kernels.png")
    print(f"wrote {args.out / 'bench_kernels.json'} and bench_kernels.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
