#!/usr/bin/env python3
"""A case whose photon noise is not white: counted, then spread over neighbouring pixels, as a panel does.

An indirect flat panel converts each X-ray photon to light in a scintillator (CsI), and the light spreads
over a few neighbouring photodiodes before it is counted: the signal and its photon noise are both
blurred, so the noise of neighbouring pixels is correlated, and an estimator that reads only the finest
scale (Immerkaer's) sees a fraction of it. This writes a copy of an RTK case made without noise
(`../shared/bench/make_rtk_case.py ... --i0 0`) with Poisson counts of `--i0` photons a pixel, each view's
counts convolved with the separable kernel `--kernel` (3 taps per axis, normalised), then log-transformed:

    python ../shared/bench/make_rtk_case.py ../shared/data/abdomen_ct.nii.gz /tmp/exact25 --views 25 \\
        --det 240 --pitch 3.2 --i0 0
    python benchmarks/make_blurred_noise.py /tmp/exact25 /tmp/blur25 --kernel 0.15 0.7 0.15
    python -m CTNeRFReconLib reconstruct /tmp/blur25 --out /tmp/blur25_run --time-limit 120
    python benchmarks/score_runs.py /tmp/exact25/reference.nrrd /tmp/blur25_run --out blur25.json --note "..."
"""
from __future__ import annotations

import json

import numpy as np
from scipy import ndimage

from case_edit import case_parser, read_case, write_case


def main(argv=None) -> int:
    ap = case_parser(__doc__)
    ap.add_argument("--i0", type=float, default=1e5, help="photons a pixel in air (default 1e5)")
    ap.add_argument("--kernel", type=float, nargs=3, default=[0.15, 0.7, 0.15],
                    help="the blur's three taps along each axis (normalised to sum 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    proj, stack = read_case(args.case, args.out)
    taps = np.asarray(args.kernel, dtype=np.float64)
    taps /= taps.sum()
    counts = np.random.default_rng(args.seed).poisson(args.i0 * np.exp(-proj.astype(np.float64)))
    blurred = ndimage.convolve1d(ndimage.convolve1d(counts.astype(np.float64), taps, axis=1, mode="nearest"),
                                 taps, axis=2, mode="nearest")
    noisy = (-np.log(np.clip(blurred, 1.0, None) / args.i0)).astype(np.float32)
    write_case(args.case, args.out, noisy, stack)
    said = {"case": str(args.case), "i0": args.i0, "kernel": taps.round(6).tolist(), "seed": args.seed,
            "pixel_variance_share": round(float((taps ** 2).sum() ** 2), 6)}
    (args.out.parent / f"{args.out.name}.noise.json").write_text(json.dumps(said, indent=1))
    print(json.dumps(said))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
