"""Builds and loads the fused renderer kernels (kernels/) through torch's C++ extension machinery.

The sources are compiled with ninja on first use into a cache folder ($CTNERF_KERNEL_CACHE, else
~/.cache/ctnerf_kernels), or ahead of time with ``python -m CTNeRFReconLib.kernels build``.
A CUDA build (CPU + CUDA kernels) is made when torch has CUDA and nvcc is found, else a CPU build.
Any failure is logged in one line and the library keeps using its PyTorch renderer: a missing
compiler must never stop a reconstruction.

Environment:
  CTNERF_KERNELS=auto|cpu|cuda|off   which build to use (default auto; off = PyTorch path only)
  CTNERF_KERNELS_DEBUG=1             -O0 -g build (separate cache folder)
  CTNERF_KERNEL_CACHE=DIR            where builds are kept
  CTNERF_CPU_GRAD=auto|buffers|atomics   how CPU backward kernels reduce scattered gradients
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MODE_ENV = "CTNERF_KERNELS"
DEBUG_ENV = "CTNERF_KERNELS_DEBUG"
CACHE_ENV = "CTNERF_KERNEL_CACHE"
CPU_GRAD_ENV = "CTNERF_CPU_GRAD"
MODES = ("auto", "cpu", "cuda", "off")
CPU_GRAD_MODES = {"auto": 0, "buffers": 1, "atomics": 2}
OPS = ("grid_line_integrals", "grid_line_integrals_backward", "joseph_line_integrals",
       "joseph_line_integrals_backward", "tv", "tv_backward", "vm_line_integrals",
       "vm_line_integrals_backward")


class KernelConfigError(ValueError):
    """An environment setting of the kernels has a value this module does not know."""


def source_dir() -> Path:
    """The kernels/ folder: beside the package in a checkout, or shipped inside it when installed."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_kernels", here.parent / "kernels"):
        if (cand / "ops.cpp").is_file():
            return cand
    raise FileNotFoundError(f"kernel sources not found (looked for ops.cpp in {here / '_kernels'} "
                            f"and {here.parent / 'kernels'})")


def kernel_mode() -> str:
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise KernelConfigError(f"environment variable {MODE_ENV}={mode!r} is not one of {', '.join(MODES)}; "
                                f"set it to one of those or unset it")
    return mode


def cpu_grad_mode() -> int:
    """The reduce_mode argument of the backward ops (0 auto, 1 per-thread buffers, 2 atomics)."""
    value = os.environ.get(CPU_GRAD_ENV, "auto").strip().lower() or "auto"
    if value not in CPU_GRAD_MODES:
        raise KernelConfigError(f"environment variable {CPU_GRAD_ENV}={value!r} is not one of "
                                f"{', '.join(CPU_GRAD_MODES)}; set it to one of those or unset it")
    return CPU_GRAD_MODES[value]


def debug_build() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ctnerf_kernels"


def find_nvcc() -> str | None:
    """nvcc of the CUDA toolkit torch would build with (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def torch_has_cuda() -> bool:
    return bool(torch.version.cuda) and torch.cuda.is_available()


@dataclass(frozen=True)
class BuildPlan:
    """What to compile and where: one of the two variants (cpu, cuda) of the extension."""

    variant: str
    sources: tuple[Path, ...]
    include_dir: Path
    build_dir: Path
    debug: bool
    cflags: tuple[str, ...] = field(default=())
    cuda_cflags: tuple[str, ...] = field(default=())
    ldflags: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return f"ctnerf_kernels_{self.variant}" + ("_debug" if self.debug else "")


def source_key(src: Path) -> str:
    """A short key of the kernels' source folder, which names its build folder. torch's loader rebuilds
    when the build's sources or flags change, and the flags name the source folder (its include path):
    two copies of the library sharing one build folder (an installed Slicer extension and a checkout, or
    a CI clone beside it) rebuilt each other's kernels at every switch, 17 s on 2 cores, inside a timed
    run. One folder per source location; a changed source in the same place still rebuilds there."""
    return hashlib.sha1(str(Path(src).resolve()).encode("utf-8")).hexdigest()[:10]


def plan_build(mode: str | None = None) -> BuildPlan:
    """Choose the variant for this process: CUDA when asked for or possible, else CPU."""
    mode = kernel_mode() if mode is None else mode
    if mode == "off":
        raise RuntimeError(f"kernels are turned off ({MODE_ENV}=off)")
    src = source_dir()
    want_cuda = mode in ("auto", "cuda") and torch_has_cuda() and find_nvcc() is not None
    if mode == "cuda" and not want_cuda:
        reason = ("this torch has no CUDA" if not torch.version.cuda else
                  "no GPU is visible" if not torch.cuda.is_available() else "nvcc was not found")
        log.warning("CTNeRF kernels: %s=cuda but %s; building the CPU kernels instead", MODE_ENV, reason)
    debug = debug_build()
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # ATen's parallel_for is an inline OpenMP region: without -fopenmp it silently runs serially.
    # The extension then shares the OpenMP runtime torch already loaded (same soname).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    sources = [src / "ops.cpp", *sorted((src / "cpu").glob("*.cpp"))]
    if want_cuda:
        sources += sorted((src / "cuda").glob("*.cu"))
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    variant = "cuda" if want_cuda else "cpu"
    build_dir = cache_root() / tag / (variant + ("_debug" if debug else "") + "-" + source_key(src))
    return BuildPlan(variant=variant, sources=tuple(sources), include_dir=src / "include", build_dir=build_dir,
                     debug=debug, cflags=tuple(opt + openmp), ldflags=tuple(openmp),
                     cuda_cflags=tuple(opt + (["-lineinfo"] if not debug else ["-G"])))


def _ninja_on_path() -> None:
    """torch calls `ninja` by name; the ninja wheel's binary may sit beside this interpreter only."""
    if shutil.which("ninja"):
        return
    dirs = [Path(sys.executable).parent]
    try:
        import ninja  # noqa: PLC0415 - optional helper package

        dirs.insert(0, Path(ninja.BIN_DIR))
    except ImportError:
        pass
    for d in dirs:
        if (d / "ninja").is_file():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return
    raise RuntimeError("ninja was not found; `pip install ninja` (it is needed to compile the kernels)")


def build(plan: BuildPlan, verbose: bool = False) -> None:
    """Compile (if needed) and load the extension into this process; raises on failure."""
    from torch.utils import cpp_extension  # noqa: PLC0415 - heavy import, only when building

    _ninja_on_path()
    plan.build_dir.mkdir(parents=True, exist_ok=True)
    # torch's own build lock is a plain file ('lock') that a builder killed mid-build never removes, and
    # every later build then waits for it forever. An flock dies with its process: holding it, no other
    # builder of ours is running, so a 'lock' file still there is stale and can go.
    with _build_lock(plan.build_dir):
        stale = plan.build_dir / "lock"
        if stale.exists():
            stale.unlink(missing_ok=True)
        cpp_extension.load(
            name=plan.name,
            sources=[str(s) for s in plan.sources],
            extra_cflags=list(plan.cflags),
            extra_cuda_cflags=list(plan.cuda_cflags),
            extra_ldflags=list(plan.ldflags),
            extra_include_paths=[str(plan.include_dir)],
            build_directory=str(plan.build_dir),
            verbose=verbose,
            with_cuda=plan.variant == "cuda",
            is_python_module=False,
        )


class _build_lock:
    """An exclusive flock on BUILD_DIR/.build.flock (a no-op where fcntl is missing)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".build.flock"
        self.handle = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: torch's own lock only
            return self
        self.handle = open(self.path, "a")
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()  # closing releases the flock
            self.handle = None


_lock = threading.Lock()
_state: dict = {"tried": False, "variant": None, "error": None}


def _has_kernel(dispatch_key: str) -> bool:
    """Whether this process has a ctnerf kernel registered for a dispatch key ('CPU', 'CUDA')."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("ctnerf::grid_line_integrals", dispatch_key)
    except RuntimeError:  # the operator is not defined yet (library not loaded)
        return False


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile and opcheck can trace the ops."""
    def grid_fake(volume, origin_xyz, spacing_xyz, origins, dirs, t_near, t_far, n_samples, jitter_seed):
        return volume.new_empty((origins.shape[0],))

    def grid_bwd_fake(grad_out, volume, *rest):
        return torch.empty_like(volume, memory_format=torch.contiguous_format)

    def vm_fake(planes, lines, basis, bias, box_min, box_max, origins, *rest):
        return planes.new_empty((origins.shape[0],))

    def vm_bwd_fake(grad_out, planes, lines, basis, bias, *rest):
        return (torch.empty_like(planes, memory_format=torch.contiguous_format),
                torch.empty_like(lines, memory_format=torch.contiguous_format),
                torch.empty_like(basis), torch.empty_like(bias))

    def joseph_fake(volume, origin_xyz, spacing_xyz, origins, *rest):
        return volume.new_empty((origins.shape[0],))

    def tv_fake(volume, edge):
        return volume.new_empty(())

    def tv_bwd_fake(grad_out, volume, edge):
        return torch.empty_like(volume, memory_format=torch.contiguous_format)

    fakes = (grid_fake, grid_bwd_fake, joseph_fake, grid_bwd_fake, tv_fake, tv_bwd_fake, vm_fake, vm_bwd_fake)
    for name, fn in zip(OPS, fakes):
        torch.library.register_fake(f"ctnerf::{name}", fn)


def load_kernels() -> str | None:
    """Load (building on first use) the kernels; returns 'cpu' or 'cuda', or None (PyTorch path).

    Tried once per process: a failed build is reported in one warning and not retried.
    """
    with _lock:
        if _state["tried"]:
            return _state["variant"]
        _state["tried"] = True
        try:
            if kernel_mode() == "off":
                return None
            if not _has_kernel("CPU"):
                plan = plan_build()
                start = time.perf_counter()
                build(plan)
                log.info("CTNeRF kernels: %s build ready in %.1f s (%s)", plan.variant,
                         time.perf_counter() - start, plan.build_dir)
                _register_fakes()
            _state["variant"] = "cuda" if _has_kernel("CUDA") else "cpu"
        except Exception as exc:  # noqa: BLE001 - any build problem degrades to the PyTorch path
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            _state["error"] = str(exc)
            log.warning("CTNeRF kernels unavailable, using the PyTorch renderer (%s: %s); details: "
                        "python -m CTNeRFReconLib.kernels build --verbose", type(exc).__name__, first)
            _state["variant"] = None
        return _state["variant"]


def kernels_available(device) -> bool:
    """True when the fused kernels are built for this device and not turned off."""
    try:
        if kernel_mode() == "off":
            return False
    except KernelConfigError as exc:
        log.warning("CTNeRF kernels: %s; using the PyTorch renderer", exc)
        return False
    variant = load_kernels()
    if variant is None:
        return False
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return variant == "cuda"
    return False


def last_error() -> str | None:
    """The full message of the build failure in this process, if any."""
    return _state["error"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m CTNeRFReconLib.kernels",
                                     description="Build the fused renderer kernels ahead of time.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile into the cache folder and load once to check")
    b.add_argument("--mode", choices=("auto", "cpu", "cuda"), default=None,
                   help=f"variant to build (default: {MODE_ENV} or auto)")
    b.add_argument("--verbose", action="store_true", help="show compiler commands and output")
    sub.add_parser("info", help="show what would be built and where")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "info":
        plan = plan_build("auto" if kernel_mode() == "off" else None)
        print(f"variant: {plan.variant}\nbuild dir: {plan.build_dir}\nnvcc: {find_nvcc()}\n"
              f"torch: {torch.__version__} (CUDA {torch.version.cuda})\n"
              f"sources: {', '.join(str(s) for s in plan.sources)}")
        return 0
    plan = plan_build(args.mode)
    start = time.perf_counter()
    try:
        build(plan, verbose=args.verbose)
    except Exception as exc:  # noqa: BLE001 - reported as a failed command
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print(f"built {plan.variant} kernels in {time.perf_counter() - start:.1f} s: {plan.build_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
