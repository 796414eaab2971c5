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
  place, loss curve, metrics, difference volume);
* ``compare``: a reference volume node resampled onto the reconstruction, scores, difference;
* ``projections``: a projection stack as a volume node for scrolling through the views;
* ``demo_data``: writes the demo phantom scan (run in the engine's interpreter).
"""
