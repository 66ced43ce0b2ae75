"""The distillation benchmark as many processes at once, for a machine with many cores or a GPU.

Every (fraction, seed, student) run and every ablation row is its own ``benchmarks/distill.py`` process, at most
``--slots`` at a time: first the teachers of every fraction (and their caches of every view), then the students
of a fraction as soon as its teacher is ready (full labels first, then the ablation, then the smaller fractions),
then the two aggregating calls that write distill.json and distill-losses.json. Each process writes its log
under ``WORK/logs``; runs already finished in ``WORK`` are reused, so an interrupted call can simply be repeated.

    python benchmarks/distill_parallel.py --work /tmp/w --slots 16 --deadline 540

On a 2-core CPU this is no faster than the plain script; it is meant for the GPU machine, where one student run
leaves the device mostly idle.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import share_checkpoints

SEEDS = (0, 1, 2)
FRACTIONS = (1.0, 0.1, 0.01)
KINDS = ("distilled", "labels_only", "dsh")
ABLATION_ROWS = ("kd + code_relation", "kd + code_bce", "kd + code_bce + code_relation", "code_relation")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Launcher:
    """Starts benchmark processes with their logs, and says when."""

    def __init__(self, work: Path) -> None:
        self.work, self.started = work, time.time()
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.time() - self.started

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.work / "logs" / f"{name}.log", "w") as log:
            process = subprocess.Popen([sys.executable, "benchmarks/distill.py", *args], stdout=log,
                                       stderr=subprocess.STDOUT, env=ENV)
        self.log(f"start {name}")
        return process


def student_jobs(fraction: float, common: list[str], work: Path) -> list[tuple[float, str, list[str]]]:
    """(priority, name, arguments) of a fraction's student runs, and for full labels the ablation's."""
    rank = FRACTIONS.index(fraction)
    jobs = [(rank, f"f{fraction:g}-s{seed}-{kind}",
             ["--fractions", str(fraction), "--seeds", str(seed), "--students", kind, "--skip-step-ratio", *common,
              "--out", str(work / "parts" / f"{fraction:g}-{seed}-{kind}.json")])
            for seed in SEEDS for kind in KINDS]
    if fraction >= 1:
        jobs += [(0.5, f"ablation{i}-s{seed}", ["--ablation", "--only", row, "--seeds", str(seed), *common,
                                                "--out", str(work / "parts" / f"ablation{i}-{seed}.json")])
                 for i, row in enumerate(ABLATION_ROWS) for seed in SEEDS]
    return jobs


def link_teacher(work: Path, fraction: float) -> None:
    """The fraction's teacher linked into every seed's run before its students start in parallel (they would
    otherwise race to link it)."""
    teacher = work / ("teacher-f1" if fraction >= 1 else f"teacher-f{fraction:g}")
    for seed in SEEDS:
        share_checkpoints(teacher, work / f"f{fraction:g}-s{seed}", ("teacher",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench_out/distill-parallel")
    parser.add_argument("--slots", type=int, default=16, help="processes at a time")
    parser.add_argument("--deadline", type=float, default=None, help="seconds: launch nothing after 0.75 of it, "
                        "stop the students at 0.85 of it and the aggregation at the deadline")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--extra", default="", help="more arguments for every distill.py call (space-separated)")
    args = parser.parse_args()
    work = Path(args.work)
    common = ["--epochs", str(args.epochs), "--work", str(work), "--teacher-run", str(work / "teacher-f1"),
              *args.extra.split()]
    deadline = args.deadline or float("inf")
    launcher = Launcher(work)
    running = {f"prepare-f{f:g}": launcher.start(f"prepare-f{f:g}", ["--prepare", "--fractions", str(f), *common,
                                                                      "--out", str(work / f"prepare-{f:g}.json")])
               for f in FRACTIONS}
    queue: list[tuple[float, str, list[str]]] = []
    failed: list[str] = []
    while True:
        for name, process in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            launcher.log(f"done {name} rc={process.returncode}")
            if process.returncode:
                failed.append(name)
            elif name.startswith("prepare-f"):
                fraction = float(name.removeprefix("prepare-f"))
                link_teacher(work, fraction)
                queue = sorted([*queue, *student_jobs(fraction, common, work)], key=lambda job: job[0])
        while queue and len(running) < args.slots and launcher.elapsed() < 0.75 * deadline:
            _, name, job_args = queue.pop(0)
            running[name] = launcher.start(name, job_args)
        if not running or launcher.elapsed() > 0.85 * deadline:
            break
        time.sleep(2)
    for process in running.values():
        process.kill()
    launcher.log(f"students done; failed: {failed}; stopped: {sorted(running)}; not started: "
                 f"{[name for _, name, _ in queue]}")
    if queue or failed or running:
        return
    for name, final in (("table", ["--fractions", ",".join(map(str, FRACTIONS[::-1])), *common,
                                   "--out", "benchmarks/results/distill.json"]),
                        ("ablation", ["--ablation", *common, "--out", "benchmarks/results/distill-losses.json"])):
        process = launcher.start(name, final)
        try:
            process.wait(timeout=max(1.0, deadline - launcher.elapsed()) if args.deadline else None)
            launcher.log(f"done {name} rc={process.returncode}")
        except subprocess.TimeoutExpired:
            process.kill()
            launcher.log(f"stopped {name} at the deadline")


if __name__ == "__main__":
    main()
