#!/usr/bin/env python3
"""Robustness figures: reader fuzzing (inputs, executions, findings and whether each is now fixed)
and kill trials on real workers (how many, how each was hurt, results lost: the goal is 0).

    nice -n 19 python benchmarks/bench_robustness.py --trials 100 --out benchmarks/results/robustness
    nice -n 19 python benchmarks/bench_robustness.py --fuzz-seconds 600 --trials 0   # fuzz every reader first

Fuzz figures come from Testing/fuzz/stats/<target>.json, which every run of
Testing/fuzz/fuzz_readers.py appends to (--fuzz-seconds N runs a campaign of N seconds per target
first). A finding counts as fixed when its corpus input now replays as a clean refusal (or, for the
events log, loads without raising); a corpus input that does not, and every input still in
Testing/fuzz/open/<target>/, counts as open. With --trials 0 no kill trial runs: the kill-trial
figures of the previous OUT.json are kept (copied over, with "kill_kept_from" saying from when),
so refreshing the fuzz figures never drops them. Each kill trial starts a worker on the same run folder (resuming
the previous trial's run), hurts it (SIGKILL at a random moment, during a snapshot, checkpoint,
volume or run.json write, after a SIGTERM, or a SIGTERM storm), checks that every file present is
complete, and then (every --resume-every trials) resumes it and checks that the run continued from
the last complete checkpoint. A trial loses results when any of those checks fails.
Prints a table and writes JSON (OUT.json).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "Testing" / "fuzz"))

import fuzz_readers  # noqa: E402


OPEN = fuzz_readers.HERE / "open"
"""Findings not fixed yet (Testing/fuzz/open/<target>/, see its README): counted as open, never replayed."""


def open_entries(name: str) -> list[Path]:
    folder = OPEN / name
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith((".txt", ".md"))
                  and not p.name.startswith(".")) if folder.is_dir() else []


def fuzz_figures() -> dict:
    """Per reader: the fuzz runs' totals, and its findings: each corpus input is replayed (fixed when
    it now ends as a clean refusal, open otherwise); every input in open/ is open."""
    rows = {}
    for name, target in fuzz_readers.TARGETS.items():
        path = fuzz_readers.STATS / f"{name}.json"
        runs = json.loads(path.read_text())["runs"] if path.exists() else []
        entries = [p for t, p in fuzz_readers.corpus_entries(name)]
        fixed = 0
        for p in entries:
            outcome, _ = fuzz_readers.replay_one(target, p.read_bytes())
            fixed += outcome != fuzz_readers.Outcome.FINDING
        still_open = open_entries(name)
        rows[name] = {
            "engines": sorted({r["engine"] for r in runs}),
            "runs": len(runs),
            "seconds": round(sum(r.get("seconds_run", 0) for r in runs), 1),
            "executions": sum(r.get("libfuzzer_executions", r["executions"]) for r in runs),
            "inputs_checked": sum(r["executions"] for r in runs),
            "refused": sum(r["refused"] for r in runs), "loaded": sum(r["ok"] for r in runs),
            "finding_executions": sum(r["findings"] for r in runs),
            "findings": len(entries) + len(still_open),
            "corpus_findings": len(entries), "fixed": fixed,
            "open": len(still_open) + len(entries) - fixed,
            "open_inputs": [p.name for p in still_open],
        }
    return rows


def kill_figures(trials: int, resume_every: int, seed: int, work: Path, partial: Path | None = None,
                 modes=None) -> dict:
    from faults import MODES, kill_trial
    from worker_case import write_small_case

    work.mkdir(parents=True, exist_ok=True)
    case = write_small_case(work / "case")
    rng = random.Random(seed)
    results = []
    t0 = time.monotonic()
    for k in range(trials):
        run = work / f"run{k // 25}"  # a fresh folder every 25 trials; within it each trial continues the last
        mode = (modes or MODES)[k % len(modes or MODES)]
        tr = kill_trial(case, run, mode, rng, resume=(k + 1) % resume_every == 0 or k == trials - 1)
        results.append(tr)
        print(f"trial {k + 1:3d}/{trials} {mode:20s} {tr.killed_at:45s} ckpt {tr.checkpoint_iteration!s:>5s} "
              f"resumed {tr.resumed!s:5s} {'LOST: ' + '; '.join(tr.problems + [tr.resume_problem]) if tr.lost else 'ok'}"
              f"  ({tr.seconds:.1f} s)", flush=True)
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"trials": len(results), "lost": sum(t.lost for t in results),
                                           "resumes": sum(t.resumed is True for t in results),
                                           "seconds": round(time.monotonic() - t0, 1),
                                           "trials_detail": [vars(t) for t in results]}, indent=1, default=str))
    by_mode = {}
    for tr in results:
        m = by_mode.setdefault(tr.mode, {"trials": 0, "inside_write": 0, "resumed": 0, "lost": 0})
        m["trials"] += 1
        m["inside_write"] += "being written" in tr.killed_at
        m["resumed"] += tr.resumed is True
        m["lost"] += tr.lost
    return {"trials": len(results), "lost": sum(t.lost for t in results),
            "resumes": sum(t.resumed is True for t in results), "seconds": round(time.monotonic() - t0, 1),
            "by_mode": by_mode,
            "lost_details": [{"mode": t.mode, "problems": t.problems, "resume": t.resume_problem}
                             for t in results if t.lost]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--resume-every", type=int, default=1, help="resume after every Nth trial (1: every trial)")
    ap.add_argument("--modes", nargs="+", help="only these kill modes (default: all, in turn)")
    ap.add_argument("--fuzz-seconds", type=float, default=0.0, help="first fuzz every reader this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ctnerf_bench_robustness"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robustness")
    args = ap.parse_args(argv)
    if args.fuzz_seconds > 0:
        subprocess.run([sys.executable, str(ROOT / "Testing" / "fuzz" / "fuzz_readers.py"), "campaign",
                        "--seconds", str(args.fuzz_seconds)], check=True)
    report = {}
    out = args.out.with_suffix(".json")
    if args.trials > 0:
        report["kill"] = kill_figures(args.trials, args.resume_every, args.seed, args.work,
                                      partial=args.out.with_suffix(".partial.json"), modes=args.modes)
    elif out.exists():  # keep the last kill-trial figures: rerunning them is slow (~15 min for 100)
        previous = json.loads(out.read_text())
        if "kill" in previous:
            report["kill"] = previous["kill"]
            report["kill_kept_from"] = previous.get("kill_kept_from") or time.strftime(
                "%Y-%m-%d", time.gmtime(out.stat().st_mtime))
    report["fuzz"] = fuzz_figures()  # after the trials: a campaign running beside them has finished more
    fz = report["fuzz"]
    print(f"\n{'reader':16s} {'engine':10s} {'seconds':>8s} {'executions':>11s} {'refused':>8s} {'loaded':>7s} "
          f"{'findings':>8s} {'fixed':>6s} {'open':>5s}")
    for name, r in fz.items():
        print(f"{name:16s} {','.join(r['engines']) or '-':10s} {r['seconds']:8.0f} {r['executions']:11d} "
              f"{r['refused']:8d} {r['loaded']:7d} {r['findings']:8d} {r['fixed']:6d} {r['open']:5d}")
    tot = {k: sum(r[k] for r in fz.values()) for k in ("seconds", "executions", "findings", "fixed", "open")}
    print(f"{'total':16s} {'':10s} {tot['seconds']:8.0f} {tot['executions']:11d} {'':8s} {'':7s} "
          f"{tot['findings']:8d} {tot['fixed']:6d} {tot['open']:5d}")
    if "kill" in report:
        k = report["kill"]
        kept = f" (kept from the run of {report['kill_kept_from']})" if "kill_kept_from" in report else ""
        print(f"\nkill trials{kept}: {k['trials']} in {k['seconds']:.0f} s, resumed {k['resumes']}, "
              f"results lost {k['lost']}")
        for mode, m in k["by_mode"].items():
            print(f"  {mode:20s} trials {m['trials']:3d}  killed inside the write {m['inside_write']:3d}  "
                  f"resumed {m['resumed']:3d}  lost {m['lost']:3d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{out}")
    return 1 if report.get("kill", {}).get("lost") else 0


if __name__ == "__main__":
    sys.exit(main())
