"""CTNeRFReconLib: sparse-view cone-beam CT reconstruction, usable without Slicer and without a GPU."""
__version__ = "0.1.0"
