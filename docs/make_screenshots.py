"""Make the README's Slicer screenshots from Slicer's own views, rendered offscreen without the application.

    . .venv/bin/activate && python docs/make_screenshots.py            # nerf, preview preset (minutes on a CPU)
    python docs/make_screenshots.py --method fdk                      # seconds

What it does, as a user of the module would:

1. writes the demo case (the engine's 3D Shepp-Logan scan, CTNeRFReconLib/demo.py: 30 views, 128 x 128
   detector) and loads its phantom as the "demo reference" volume (the module's *Load demo data*);
2. runs the reconstruction through the module's bridge: a ``ReconstructionSession`` on slicer-core's real
   ``vtkMRMLScene`` runs the engine's command line in a worker process and streams the volume, the loss
   table and, at the end, the comparison (metrics, difference volume) into the scene (*Start*);
3. shows the reconstruction in the slice views with the bridge's window/level and volume renders it in the
   3D view (*Show in 3D*), then puts the reference, and the difference, over it at the compare step's
   opacity (*Show in views*, ``slicer_bridge.views.show_layers``).

Every view image is drawn by Slicer's code: the slice views by ``vtkMRMLSliceLogic`` and the slice
displayable managers, the 3D view by ``vtkMRMLViewLogic``, the 3D displayable managers and the Volume
Rendering module's GPU ray cast (Mesa's llvmpipe without a GPU), set up as Slicer's view widgets set them up
(Testing/slicer_render.py). The loss chart is drawn with VTK's ``vtkChartXY`` in a ``vtkContextView``,
which is what Slicer's plot view draws the loss chart node with; the plot view's Qt frame is not there,
so the chart's title, axis titles and log scale come from the chart node the bridge made. The thin
coloured bars above the slice views (view letter and volume name) stand in for Slicer's Qt slice
controllers and are drawn by this script, as are the captions.

The volume rendering uses ``slicer_bridge.rendering.show_attenuation_rendering`` (transfer functions for
attenuation values); ``--vr follow`` shows the transfer functions that follow the slice window/level
instead. The 3D camera is Slicer's default (looking from anterior), centred on the volume, zoomed in and turned
30 degrees about the vertical axis and 20 up, as a user would turn it.

Writes docs/images/slicer-reconstruction.png (3D view, loss chart, three slice views),
docs/images/slicer-compare.png (the reference and the difference over the reconstruction) and a copy of
the first as CTNeRFRecon/Screenshots/slicer-reconstruction.png, the extension's screenshot.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))

import slicer_render as sr  # noqa: E402

SLICE_PX = 340
VIEW_PX = (SLICE_PX * 3 // 2, SLICE_PX)
BAR_PX = 22
CAPTION_PX = 26
GAP = 4
BACKGROUND = (38, 38, 38)
SLICE_ORDER = ("Red", "Yellow", "Green")


def _font(size: int):
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _with_bar(rgb: np.ndarray, color, text: str):
    """A view with a controller-like bar above it (view colour, letter and the volume shown)."""
    from PIL import Image, ImageDraw

    view = Image.fromarray(rgb)
    out = Image.new("RGB", (view.width, view.height + BAR_PX), tuple(int(255 * c) for c in color))
    out.paste(view, (0, BAR_PX))
    ImageDraw.Draw(out).text((6, 3), text, fill=(0, 0, 0), font=_font(13))
    return out


def _caption(width: int, text: str):
    from PIL import Image, ImageDraw

    out = Image.new("RGB", (width, CAPTION_PX), BACKGROUND)
    ImageDraw.Draw(out).text((8, 5), text, fill=(230, 230, 230), font=_font(14))
    return out


def _stack(rows, gap: int = GAP):
    """Paste rows of PIL images: each row left to right, rows top to bottom."""
    from PIL import Image

    widths = [sum(im.width for im in row) + gap * (len(row) - 1) for row in rows]
    heights = [max(im.height for im in row) for row in rows]
    out = Image.new("RGB", (max(widths), sum(heights) + gap * (len(rows) - 1)), BACKGROUND)
    y = 0
    for row, height in zip(rows, heights):
        x = 0
        for im in row:
            out.paste(im, (x, y))
            x += im.width + gap
        y += height + gap
    return out


def render_loss_chart(scene, chart_node, size) -> np.ndarray:
    """The loss chart node drawn as Slicer's plot view draws it: vtkChartXY in a vtkContextView (offscreen)."""
    import vtkmodules.vtkRenderingContextOpenGL2  # noqa: F401
    import vtkmodules.vtkRenderingFreeType  # noqa: F401
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401
    from vtkmodules.vtkChartsCore import vtkAxis, vtkChart, vtkChartXY
    from vtkmodules.vtkViewsContext2D import vtkContextView

    series = scene.GetNodeByID(chart_node.GetNthPlotSeriesNodeID(0))
    table = scene.GetNodeByID(series.GetTableNodeID()).GetTable()
    view = vtkContextView()
    window = view.GetRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(0)
    window.SetSize(*size)
    view.GetRenderer().SetBackground(1.0, 1.0, 1.0)
    chart = vtkChartXY()
    view.GetScene().AddItem(chart)
    chart.SetTitle(chart_node.GetTitle())
    chart.GetTitleProperties().SetFontSize(15)
    chart.SetShowLegend(bool(chart_node.GetLegendVisibility()))
    line = chart.AddPlot(vtkChart.LINE)
    line.SetInputData(table, series.GetXColumnName(), series.GetYColumnName())
    r, g, b = series.GetColor()
    line.SetColor(int(255 * r), int(255 * g), int(255 * b), 255)
    line.SetWidth(float(series.GetLineWidth()))
    x_axis, y_axis = chart.GetAxis(vtkAxis.BOTTOM), chart.GetAxis(vtkAxis.LEFT)
    x_axis.SetTitle(chart_node.GetXAxisTitle())
    y_axis.SetTitle(chart_node.GetYAxisTitle())
    y_axis.SetLogScale(bool(chart_node.GetYAxisLogScale()))
    for axis in (x_axis, y_axis):
        axis.GetTitleProperties().SetFontSize(13)
        axis.GetLabelProperties().SetFontSize(12)
    view.Render()
    rgb = sr._grab(window)
    window.Finalize()
    return rgb


def _slice_row(views, labels: dict[str, str]):
    images = views.render_slices()
    return [_with_bar(images[name], sr.SLICE_VIEWS[name][1], f"{name[0]}   {labels[name]}") for name in SLICE_ORDER]


def _turn_camera(three_d, azimuth: float, elevation: float):
    camera = three_d.renderer.GetActiveCamera()
    camera.Azimuth(azimuth)
    camera.Elevation(elevation)
    camera.OrthogonalizeViewUp()
    three_d.renderer.ResetCameraClippingRange()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="nerf", choices=["nerf", "fdk"])
    parser.add_argument("--preset", default="preview", choices=["preview", "standard", "high"])
    parser.add_argument("--iterations", type=int, default=None, help="override the preset's iterations")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--vr", default="attenuation", choices=["attenuation", "follow"],
                        help="volume rendering transfer functions: for attenuation values, or following the slice "
                             "window/level")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "CTNeRFRecon" / "Screenshots",
                        help="folder of the extension's screenshot")
    parser.add_argument("--work", type=Path, default=None, help="folder for the demo case and run (default: temporary)")
    args = parser.parse_args(argv)

    problem = sr.offscreen_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    import slicer

    from CTNeRFReconLib.demo import FULL, write_demo_case
    from CTNeRFReconLib.slicer_bridge import rendering, views
    from CTNeRFReconLib.slicer_bridge import volume_nodes as vn
    from CTNeRFReconLib.slicer_bridge.session import ReconstructionSession, SessionOptions, SessionState
    from CTNeRFReconLib.slicer_bridge.worker import ReconstructRequest, WorkerConfig

    work = args.work or Path(tempfile.mkdtemp(prefix="ctnerf_screenshots_"))
    started = time.monotonic()
    data = write_demo_case(work / "data", FULL)
    print(f"demo case in {data} ({time.monotonic() - started:.0f} s)", flush=True)

    scene = slicer.vtkMRMLScene()
    slicer_views = sr.SlicerViews(scene, slice_size=(SLICE_PX, SLICE_PX), view_size=VIEW_PX)
    reference = vn.create_volume_node(scene, vn.load_volume_file(data / "reference.nrrd"), "demo reference")
    request = ReconstructRequest(data=data, out=work / "run", method=args.method, preset=args.preset,
                                 device=args.device, iterations=args.iterations, overwrite=True)
    session = ReconstructionSession(scene, request, WorkerConfig(), SessionOptions(name="CTNeRFRecon"),
                                    reference_node=reference).start()
    last = 0.0
    while not session.state.done:
        session.poll()
        if time.monotonic() - last > 15:
            print(f"  {session.progress.summary() or session.message}", flush=True)
            last = time.monotonic()
        time.sleep(0.1)
    if session.state is not SessionState.FINISHED:
        print(f"the run did not finish: {session.state.value}: {session.message}", file=sys.stderr)
        return 1
    recon, difference = session.output_node, session.difference_node
    scores = session.metrics.get("comparison", {})
    method = f"{args.method} ({args.preset})" if args.method == "nerf" else "FDK"
    summary = f"{method}, {session.progress.iteration or 0} iterations" if args.method == "nerf" else method
    score_text = f"PSNR {scores.get('psnr', float('nan')):.1f} dB, SSIM {scores.get('ssim', float('nan')):.3f}"
    print(f"{session.message}; {score_text}", flush=True)

    # the reconstruction in the slice views (fit, as setSliceViewerLayers(fit=True)) and in 3D
    views.show_layers(scene, recon, None, opacity=0.0)
    slicer_views.fit_slices()
    if args.vr == "attenuation":
        rendering.show_attenuation_rendering(slicer_views.volume_rendering_logic, recon)
    else:
        slicer_views.show_volume_rendering(recon, True, follow_display=True)
    three_d = slicer_views.three_d
    three_d.reset_camera(zoom=1.4)
    _turn_camera(three_d, 30.0, 20.0)
    view_3d = _with_bar(slicer_views.render_3d(), (0.55, 0.55, 0.62), f"1   {recon.GetName()} (volume rendering)")
    top_row = [view_3d]
    if session.chart_node is not None:  # an iterative method's loss curve (FDK has none)
        top_row.append(_with_bar(render_loss_chart(scene, session.chart_node, VIEW_PX), (0.8, 0.8, 0.8),
                                 f"Plot   {session.chart_node.GetName()}"))
    recon_row = _slice_row(slicer_views, {name: recon.GetName() for name in SLICE_ORDER})
    top = _stack([top_row])
    slices = _stack([recon_row])
    width = max(top.width, slices.width)
    first = _stack([[_caption(width, f"CTNeRFRecon in 3D Slicer's views: the demo phantom, {FULL.views} views, {summary}; "
                                     f"{score_text}")], [top], [slices]])

    # the compare step: the reference, then the difference, over the reconstruction at opacity 0.5
    views.show_layers(scene, recon, reference, opacity=0.5)
    overlay_row = _slice_row(slicer_views, {name: f"{recon.GetName()} + {reference.GetName()} (0.5)"
                                            for name in SLICE_ORDER})
    views.show_layers(scene, recon, difference, opacity=1.0)
    difference_row = _slice_row(slicer_views, {name: difference.GetName() for name in SLICE_ORDER})
    views.show_layers(scene, recon, None, opacity=0.0)
    rows = _stack([overlay_row]), _stack([difference_row])
    width = max(r.width for r in rows)
    second = _stack([[_caption(width, "Compare: the reference over the reconstruction at opacity 0.5")], [rows[0]],
                     [_caption(width, "Compare: the difference (reconstruction - reference, 1/mm; mid grey = 0)")],
                     [rows[1]]])

    args.out.mkdir(parents=True, exist_ok=True)
    paths = [args.out / "slicer-reconstruction.png", args.out / "slicer-compare.png"]
    first.save(paths[0])
    second.save(paths[1])
    args.screenshot.mkdir(parents=True, exist_ok=True)
    if (args.screenshot / "slicer-reconstruction.png").resolve() != paths[0].resolve():
        shutil.copyfile(paths[0], args.screenshot / "slicer-reconstruction.png")
    slicer_views.close()
    for path in [*paths, args.screenshot / "slicer-reconstruction.png"]:
        print(f"wrote {path}")
    print(f"done in {time.monotonic() - started:.0f} s")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
