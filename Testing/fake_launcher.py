"""A stand-in for Slicer's ``PythonSlicer``: a launcher process that runs the real Python as its child.

What it mimics (read in CTK AppLauncher's Base/ctkAppLauncher.cpp and Main.cpp, and Slicer's
SuperBuild/python_configure_python_launcher.cmake, which configures PythonSlicer with
SPLASHSCREEN_DISABLED):

* the child is started with QProcess in the launcher's own process group (no new session) and the
  launcher waits for it in its event loop; when it finishes normally the launcher exits with its
  exit code, when it crashes (a signal) the launcher prints an error and exits with EXIT_FAILURE;
* no signal handler is installed anywhere: SIGTERM or SIGINT end the launcher at once (default
  disposition), nothing is forwarded, and the child is NOT killed: it goes on as an orphan;
* without a splash screen the channels are ``QProcess::ForwardedChannels``: the child writes to the
  launcher's own stdout and stderr (inherited), so a client's pipe stays open until the child ends.
  With ``FAKE_LAUNCHER_RELAY=1`` it relays them instead (``SeparateChannels``, the splash-screen
  case): then the client's pipe closes when the launcher dies, and the child's writes fail.

Usage: ``fake_launcher.py ARGS...`` runs ``FAKE_LAUNCHER_PYTHON`` (default: this interpreter) with
ARGS. :func:`write_launcher` writes an executable script that can be a WorkerConfig.interpreter.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve()


def _relay(source, target):
    for chunk in iter(lambda: source.read1(65536), b""):
        target.write(chunk)
        target.flush()


def main(argv: list[str]) -> int:
    # like a Qt application: SIGINT ends the process (Python would raise KeyboardInterrupt instead)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    python = os.environ.get("FAKE_LAUNCHER_PYTHON") or sys.executable
    relay = os.environ.get("FAKE_LAUNCHER_RELAY") == "1"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_LAUNCHER_")}
    if not relay:
        child = subprocess.Popen([python, *argv], env=env)
        code = child.wait()
    else:
        child = subprocess.Popen([python, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        threads = [threading.Thread(target=_relay, args=(child.stdout, sys.stdout.buffer), daemon=True),
                   threading.Thread(target=_relay, args=(child.stderr, sys.stderr.buffer), daemon=True)]
        for t in threads:
            t.start()
        code = child.wait()
        for t in threads:
            t.join(timeout=5)
    if code < 0:  # QProcess::CrashExit
        print(f"error: [{python}] exit abnormally - Report the problem.", file=sys.stderr, flush=True)
        return 1
    return code


def write_launcher(folder: Path, name: str = "PythonFake", relay: bool = False) -> Path:
    """An executable launcher script in ``folder`` (its shebang: this interpreter), for
    ``WorkerConfig(interpreter=...)``; ``relay`` selects the relaying (splash-screen) mode."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable}\n"
                    "import os, sys\n"
                    f"sys.path.insert(0, {str(HERE.parent)!r})\n"
                    + ("os.environ['FAKE_LAUNCHER_RELAY'] = '1'\n" if relay else "")
                    + "from fake_launcher import main\n"
                    "sys.exit(main(sys.argv[1:]))\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def find_engine_child(launcher_pid: int, timeout: float = 60.0, interval: float = 0.01):
    """The launcher's child that runs the engine (`-m CTNeRFReconLib ...`), as psutil.Process, or None
    when none appears within ``timeout`` s (for the tests and benchmarks/bench_cancel.py)."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for child in psutil.Process(launcher_pid).children():
                if "CTNeRFReconLib" in child.cmdline():
                    return child
        except psutil.Error:
            pass
        time.sleep(interval)
    return None
