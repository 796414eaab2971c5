"""The CUDA sources of kernels/ compile with nvcc for sm_80 and sm_90 (no GPU needed, about a minute)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "kernels"))
from check_cuda_compile import find_nvcc  # noqa: E402


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found (no CUDA toolkit: CUDA_HOME, /usr/local/cuda, PATH)")
def test_cuda_sources_compile_for_sm80_and_sm90():
    proc = subprocess.run([sys.executable, str(ROOT / "kernels" / "check_cuda_compile.py"), "--arch", "80",
                           "--arch", "90"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   kernels/cuda/render_cuda.cu sm_80 sm_90" in proc.stdout
