"""Independent reference cases and classical peers, built with RTK (itk-rtk, CPU).

Benchmarks must not grade our reconstruction with our own projector, so the sparse-view cases
are projected here with RTK's Joseph projector, following the recipe of the team's referee
(a CT resampled to an isotropic grid centred on the isocentre, HU -> mu with mu_water, a circular
orbit, Poisson noise). itk-rtk is a benchmark extra (`pip install .[bench]`), never a dependency
of the product.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

MU_WATER = 0.02


def _rtk():
    try:
        import itk
        from itk import RTK as rtk
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise SystemExit("the benchmarks need itk-rtk: pip install '.[bench]'") from exc
    return itk, rtk


def add_case_options(parser) -> None:
    """--ct, --det, --pitch, --i0, --cases: which RTK-made case a benchmark script runs on (see case_for)."""
    parser.add_argument("--ct", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                        / "abdomen_ct.nii.gz", help="the CT (HU) the case is projected from")
    parser.add_argument("--det", type=int, default=240, help="detector pixels per side (the referee's 240)")
    parser.add_argument("--pitch", type=float, default=3.2, help="detector pixel pitch in mm (the referee's 3.2)")
    parser.add_argument("--i0", type=float, default=1e5,
                        help="photons per detector pixel (Poisson noise; the referee's 1e5)")
    parser.add_argument("--voxel", type=float, default=3.0,
                        help="voxel (mm) of the ground truth the projections are made from (the referee's 3; "
                             "finer than the reconstruction's grid avoids the 'inverse crime')")
    parser.add_argument("--cases", type=Path, default=Path.home() / ".cache" / "ctnerf_bench",
                        help="where the RTK-made cases are kept between runs")


def require_ct(args) -> None:
    """Before any work: the CT that --ct names must be there (SystemExit naming it)."""
    if not args.ct.exists():
        raise SystemExit(f"{args.ct}: CT not found; pass --ct")


def case_for(args, views: int) -> Path:
    """The case that add_case_options' arguments name, at `views` views: made on first use, then reused."""
    return make_case(args.ct, args.cases / case_name(args.ct, views, args.det, args.pitch, args.i0, args.voxel),
                     views=views, det=args.det, pitch=args.pitch, i0=args.i0, voxel=args.voxel)


def case_name(ct_path, views: int, det: int = 240, pitch: float = 3.2, i0: float = 1e5, voxel: float = 3.0) -> str:
    """Cache folder name of a case: the CT's stem, the view count, the detector (pitch when not 3.2 mm),
    the photons per pixel when not 1e5, the ground truth's voxel when not 3 mm."""
    stem = Path(ct_path).name.split(".")[0].removesuffix("_ct")
    tag = "" if (det, pitch) == (240, 3.2) else f"_p{pitch:g}"
    tag += "" if i0 == 1e5 else f"_i0{i0:g}"
    tag += "" if voxel == 3.0 else f"_v{voxel:g}"
    return f"{stem}_{views}v_det{det}{tag}"


def make_case(ct_path, out_dir, views: int, det: int = 240, pitch: float = 3.2, voxel: float = 3.0,
              i0: float = 1e5, sid: float = 1000.0, sdd: float = 1500.0, seed: int = 0,
              arc: float = 360.0) -> Path:
    """Write geometry.xml, projections.mha, reference.nrrd and case.json; reuse a finished case.

    `arc` (degrees) below 360 makes a short scan: angles k * arc / views, as the referee's --arc.
    """
    out = Path(out_dir)
    if (out / "case.json").exists():
        return out
    itk, rtk = _rtk()
    out.mkdir(parents=True, exist_ok=True)
    ct = sitk.ReadImage(str(ct_path), sitk.sitkFloat32)
    size_mm = np.array(ct.GetSize()) * np.array(ct.GetSpacing())
    n = np.ceil(size_mm / voxel).astype(int)
    grid = sitk.Image([int(k) for k in n], sitk.sitkFloat32)
    grid.SetSpacing([voxel] * 3)
    grid.SetOrigin([float(-(k - 1) * voxel / 2) for k in n])
    centre = ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()])
    hu = sitk.Resample(ct, grid, sitk.TranslationTransform(3, [float(c) for c in centre]),
                       sitk.sitkLinear, -1000.0)
    mu = np.clip(MU_WATER * (1.0 + sitk.GetArrayFromImage(hu) / 1000.0), 0.0, None).astype(np.float32)
    ref = sitk.GetImageFromArray(mu)
    ref.CopyInformation(grid)

    geometry = rtk.ThreeDCircularProjectionGeometry.New()
    for angle in np.arange(views) * arc / views:
        geometry.AddProjection(sid, sdd, float(angle))
    F3 = itk.Image[itk.F, 3]
    vol = itk.image_from_array(mu)
    vol.SetSpacing([voxel] * 3)
    vol.SetOrigin(list(grid.GetOrigin()))
    half = (det - 1) * pitch / 2
    src = rtk.ConstantImageSource[F3].New()
    src.SetOrigin([-half, -half, 0.0])
    src.SetSpacing([pitch, pitch, 1.0])
    src.SetSize([det, det, views])
    src.SetConstant(0.0)
    fp = rtk.JosephForwardProjectionImageFilter[F3, F3].New()
    fp.SetInput(0, src.GetOutput())
    fp.SetInput(1, vol)
    fp.SetGeometry(geometry)
    fp.Update()
    proj = itk.array_from_image(fp.GetOutput()).astype(np.float64)
    if i0 > 0:
        counts = np.random.default_rng(seed).poisson(i0 * np.exp(-proj)).clip(1, None)
        proj = -np.log(counts / i0)
    image = itk.image_from_array(proj.astype(np.float32))
    image.SetSpacing([pitch, pitch, 1.0])
    image.SetOrigin([-half, -half, 0.0])
    itk.imwrite(image, str(out / "projections.mha"))
    writer = rtk.ThreeDCircularProjectionGeometryXMLFileWriter.New()
    writer.SetFilename(str(out / "geometry.xml"))
    writer.SetObject(geometry)
    writer.WriteFile()
    sitk.WriteImage(ref, str(out / "reference.nrrd"))
    (out / "case.json").write_text(json.dumps(dict(ct=str(ct_path), views=views, det=det, pitch=pitch,
                                                   voxel=voxel, i0=i0, sid=sid, sdd=sdd, seed=seed,
                                                   arc=arc), indent=1))
    return out


def read_rtk_scan(folder):
    """(itk, RTK, geometry, projections) of a folder holding geometry.xml and projections.mha, read by RTK."""
    itk, rtk = _rtk()
    reader = rtk.ThreeDCircularProjectionGeometryXMLFileReader.New()
    reader.SetFilename(str(Path(folder) / "geometry.xml"))
    reader.GenerateOutputInformation()
    return itk, rtk, reader.GetOutputObject(), itk.imread(str(Path(folder) / "projections.mha"), itk.F)


def run_peer(case_dir, method: str, out_path) -> float:
    """Run one RTK peer with the referee's settings on the case's reference grid; returns seconds."""
    case = Path(case_dir)
    itk, rtk, geometry, proj = read_rtk_scan(case)
    F3 = itk.Image[itk.F, 3]
    ref = itk.imread(str(case / "reference.nrrd"), itk.F)
    init = rtk.ConstantImageSource[F3].New()
    init.SetInformationFromImage(ref)
    init.SetConstant(0.0)
    init.Update()
    if method == "rtk-fdk":
        f = rtk.FDKConeBeamReconstructionFilter[F3].New()
    elif method == "rtk-fdk-parker":  # as RTK's rtkfdk application: Parker weights on a short scan
        parker = rtk.ParkerShortScanImageFilter[F3].New()
        parker.SetInput(proj)
        parker.SetGeometry(geometry)
        parker.InPlaceOff()
        proj = parker.GetOutput()
        f = rtk.FDKConeBeamReconstructionFilter[F3].New()
    elif method == "rtk-os-sart":
        f = rtk.SARTConeBeamReconstructionFilter[F3, F3].New()
        f.SetNumberOfIterations(10)
        f.SetNumberOfProjectionsPerSubset(5)
        f.SetLambda(0.3)
        f.SetEnforcePositivity(True)
    elif method == "rtk-admm-tv":
        f = rtk.ADMMTotalVariationConeBeamReconstructionFilter[F3].New()
        f.SetAlpha(1.0)
        f.SetBeta(100.0)
        f.SetAL_iterations(10)
        f.SetCG_iterations(3)
    else:
        raise ValueError(f"unknown peer {method}")
    f.SetInput(0, init.GetOutput())
    f.SetInput(1, proj)
    f.SetGeometry(geometry)
    t = time.perf_counter()
    f.Update()
    seconds = time.perf_counter() - t
    itk.imwrite(f.GetOutput(), str(out_path))
    return seconds
