"""Compile every CUDA source of kernels/ with nvcc (no GPU needed), so a CUDA build error cannot land.

Runs `nvcc -c` on kernels/cuda/*.cu against the installed torch's headers for the given GPU
architectures (default sm_80 and sm_90, one fat object per source), with the flags torch's
extension builder uses. Works with
a CPU-only torch wheel: that wheel ships c10/cuda and ATen/cuda headers but not the generated
c10/cuda/impl/cuda_cmake_macros.h, which c10/cuda/CUDAMacros.h includes unless
C10_CUDA_NO_CMAKE_CONFIGURE_FILE is defined; the script defines it when the file is missing (the
generated file only sets a Windows export macro, so nothing changes on Linux).

    python kernels/check_cuda_compile.py [--arch 80 --arch 90] [--nvcc PATH] [--jobs N]

Exit status 0 when every source compiles for every architecture, 1 on a compile error, 2 when
nvcc is not found.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ARCHS = ("80", "90")


def find_nvcc(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_command(nvcc: str, source: Path, output: Path, archs, threads: int = 1) -> list[str]:
    """The compile line: torch's include dirs and nvcc flags, the kernels' headers, the archs (with
    `threads` > 1 nvcc compiles them in parallel, its --threads)."""
    import torch
    from torch.utils import cpp_extension

    torch_inc = Path(torch.__file__).resolve().parent / "include"
    cuda_inc = Path(nvcc).resolve().parent.parent / "include"
    cmd = [nvcc, "-c", str(source), "-o", str(output), "-std=c++20", "-O3", "-lineinfo",
           "-Xcompiler", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=ctnerf_kernels_cuda",
           f"-I{HERE / 'include'}", "-isystem", str(cuda_inc)]
    cmd += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if threads > 1:
        cmd += ["--threads", str(threads)]
    cmd += list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    for inc in cpp_extension.include_paths():
        cmd += ["-isystem", inc]
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return cmd


def compile_one(nvcc: str, source: Path, archs, workdir: Path, threads: int = 1) -> tuple[str, bool, str, float]:
    out = workdir / f"{source.stem}.o"
    start = time.perf_counter()
    proc = subprocess.run(nvcc_command(nvcc, source, out, archs, threads), capture_output=True, text=True)
    label = f"{source.relative_to(HERE.parent)} " + " ".join(f"sm_{a}" for a in archs)
    return label, proc.returncode == 0, (proc.stdout + proc.stderr).strip(), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="compute capability digits, e.g. 80 (repeatable)")
    parser.add_argument("--nvcc", help="path to nvcc (default: CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH)")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="compilations run at once")
    args = parser.parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("nvcc not found: install the CUDA toolkit or pass --nvcc / set CUDA_HOME", file=sys.stderr)
        return 2
    sources = sorted((HERE / "cuda").glob("*.cu"))
    if not sources:
        print(f"no .cu files under {HERE / 'cuda'}", file=sys.stderr)
        return 1
    archs = args.arch or list(DEFAULT_ARCHS)
    failed = 0
    # the jobs' share of the cores goes to nvcc's per-architecture threads (one source today)
    threads = max(1, min(len(archs), args.jobs // len(sources)))
    with tempfile.TemporaryDirectory(prefix="ctnerf_nvcc_") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(compile_one, nvcc, s, archs, Path(tmp), threads) for s in sources]
        for job in jobs:
            label, ok, log, secs = job.result()
            print(f"{'ok  ' if ok else 'FAIL'} {label} ({secs:.0f} s)")
            if not ok:
                failed += 1
                print(log, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
