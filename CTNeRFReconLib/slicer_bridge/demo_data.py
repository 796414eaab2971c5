"""Write the demo phantom scan (an RTK case with reference.nrrd) into a folder.

Run in the engine's interpreter (it needs torch), as the module's "Load demo data" button does:
``python -m CTNeRFReconLib.slicer_bridge.demo_data FOLDER [--small]``. It imports no VTK or MRML.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="demo_data", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--small", action="store_true", help="the tiny case of the smoke tests (seconds)")
    args = parser.parse_args(argv)
    from CTNeRFReconLib.demo import FULL, SMALL, write_demo_case

    folder = write_demo_case(args.folder, SMALL if args.small else FULL).absolute()
    print(folder, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
