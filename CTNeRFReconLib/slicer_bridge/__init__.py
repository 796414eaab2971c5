"""The bridge between the engine and a MRML scene: volume nodes, the worker process, a run session.

It needs only the MRML API (``vtkMRMLScene`` and its nodes) and VTK, never Qt, so it runs inside
3D Slicer and, for the tests, on the ``slicer-core`` package's real scene outside the application.
Every function takes the scene as an argument; nothing here touches ``slicer.mrmlScene``.

Modules (imported on demand; this file imports nothing heavy):

* ``volume_nodes``: a :class:`CTNeRFReconLib.data.Volume` in and out of a scalar volume node,
  scanner frame to RAS, CT-like window/level, attenuation or HU display;
* ``worker``: :class:`WorkerProcess`, the engine's command line in a subprocess, read without
  blocking, cancelled cleanly;
* ``session``: :class:`ReconstructionSession`, a worker tied to the scene (output node updated in
  place, live loss curve, metrics, difference volume, output on the reference's grid, stopped when
  the scene closes);
* ``compare``: a reference volume node resampled onto the reconstruction, scores, difference;
* ``tables``: the metrics table and the loss table with its plot chart (redrawn as rows arrive);
* ``views``: the reconstruction under the reference or difference in every slice view, linked, with
  one overlay opacity (flicking between them);
* ``projections``: a projection stack as a volume node for scrolling through the views, and a one-line
  description of a scan (format, views, detector, angles, distances);
* ``demo_data``: writes the demo phantom scan (run in the engine's interpreter);
* ``rendering``: volume rendering transfer functions for attenuation values (Slicer's presets are HU),
  rebuilt when the slice window/level changes.
"""
