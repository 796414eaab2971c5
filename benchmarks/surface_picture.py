#!/usr/bin/env python3
"""Surfaces side by side, seen from the front: the ground truth's and one or more reconstructions'.

    python benchmarks/surface_picture.py REFERENCE.nrrd --threshold bone \
        --surface "ours, 25 views=RUN/surface.vtp" --surface "ADMM-TV=OTHER/surface.vtp" --out FILE.png

The truth's surface is extracted at the threshold with the product's own code (surface.py); each
other panel is a surface file as `surface` writes it (or `bench_surface.py --out DIR` leaves as
DIR/surface.vtp). All panels share one camera (anterior, the scanner's +y towards the viewer, as a
coronal slice is seen), so what one lacks against the truth shows at a glance. Rendered offscreen with
VTK (EGL with Mesa's software OpenGL where there is no display: Debian packages libegl1 libegl-mesa0
libgl1-mesa-dri), read back and saved by the tests' offscreen tooling (Testing/slicer_render.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))

import slicer_render  # noqa: E402  (sets VTK's offscreen window to EGL before VTK renders)


def render_panels(panels: list[tuple[str, object]], panel_px: tuple[int, int] = (400, 460)) -> np.ndarray:
    """An RGB image (rows, columns, 3) of the surfaces in a row, one camera for all, titled."""
    import vtkmodules.vtkRenderingFreeType  # noqa: F401  (titles)
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401
    from vtkmodules.vtkRenderingCore import (vtkActor, vtkCamera, vtkPolyDataMapper, vtkRenderer, vtkRenderWindow,
                                             vtkTextActor)

    window = vtkRenderWindow()
    window.SetOffScreenRendering(1)
    width, height = panel_px
    window.SetSize(width * len(panels), height)
    bounds = np.array([p.GetBounds() for _, p in panels])
    lo, hi = bounds[:, 0::2].min(axis=0), bounds[:, 1::2].max(axis=0)
    centre, extent = (lo + hi) / 2, float(np.max(hi - lo))
    camera = vtkCamera()
    camera.SetFocalPoint(*centre)
    camera.SetPosition(centre[0], centre[1] + 3.2 * extent, centre[2])  # in front: +y (anterior in RTK's frame)
    camera.SetViewUp(0.0, 0.0, 1.0)
    camera.SetViewAngle(20.0)
    for k, (title, poly) in enumerate(panels):
        renderer = vtkRenderer()
        renderer.SetViewport(k / len(panels), 0.0, (k + 1) / len(panels), 1.0)
        renderer.SetBackground(1.0, 1.0, 1.0)
        mapper = vtkPolyDataMapper()
        mapper.SetInputData(poly)
        mapper.ScalarVisibilityOff()
        actor = vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*((0.85, 0.82, 0.72) if k == 0 else (0.55, 0.7, 0.9)))
        renderer.AddActor(actor)
        text = vtkTextActor()
        text.SetInput(title)
        text.GetTextProperty().SetFontSize(16)
        text.GetTextProperty().SetColor(0.1, 0.1, 0.1)
        text.SetPosition(8, height - 26)
        renderer.AddViewProp(text)
        renderer.SetActiveCamera(camera)
        renderer.ResetCameraClippingRange()
        window.AddRenderer(renderer)
    window.Render()
    return slicer_render.grab(window)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("--threshold", default="bone")
    parser.add_argument("--surface", action="append", default=[], metavar="TITLE=FILE",
                        help="a surface file to show beside the truth's (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from CTNeRFReconLib.reference import load_reference
    from CTNeRFReconLib.surface import extract_surface, parse_threshold, read_surface

    reference, _ = load_reference(args.reference)
    threshold = parse_threshold(args.threshold)
    panels = [(f"ground truth, {args.threshold} ({threshold:.4g} /mm)", extract_surface(reference, threshold))]
    for item in args.surface:
        title, _, path = item.rpartition("=")
        panels.append((title or Path(path).parent.name, read_surface(path)))
    print(f"wrote {slicer_render.save_png(render_panels(panels), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
