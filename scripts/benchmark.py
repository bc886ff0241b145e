"""Benchmark the main experiment: wall time per phase, prompts and tokens processed, peak RSS.

    python scripts/benchmark.py                      # all 18 tasks, paper protocol, default model
    python scripts/benchmark.py --tasks 3            # the first 3 tasks
    python scripts/benchmark.py --tasks antonyms,en_fr
    python scripts/benchmark.py --tasks 2 --remote http://127.0.0.1:8001   # through an NDIF server

Targets (issue 2): the full 18-task run under 10 minutes on 2 cores, peak RSS under 3 GB.
Figures are printed, not asserted: timing belongs here, not in the test suite.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from taskvec import Protocol, list_tasks, load_model, load_tasks, run_main_experiment
from taskvec.mechanism import USAGE
from taskvec.models import resolve_source

TARGET_SECONDS, TARGET_RSS_GB = 600, 3.0


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--tasks", default="all", help="'all', a number N (first N tasks), or comma-separated names")
    parser.add_argument("--n-dev", type=int, default=Protocol.n_dev)
    parser.add_argument("--n-test", type=int, default=Protocol.n_test)
    parser.add_argument("--n-baseline", type=int, default=Protocol.n_baseline)
    parser.add_argument("--remote", nargs="?", const=True, default=False, metavar="HOST",
                        help="run on NDIF (nnsight's configured host, or HOST): requests per task and seconds per request")
    args = parser.parse_args()

    names = list_tasks() if args.tasks == "all" else (
        list_tasks()[: int(args.tasks)] if args.tasks.isdigit() else args.tasks.split(","))
    tasks = load_tasks(names)
    resolve_source(args.model)
    protocol = Protocol(n_dev=args.n_dev, n_test=args.n_test, n_baseline=args.n_baseline)

    t0 = time.perf_counter()
    model = load_model(args.model, remote=args.remote)
    load_s = time.perf_counter() - t0
    USAGE.reset()
    t1 = time.perf_counter()
    result = run_main_experiment(model, tasks, protocol, progress=False)
    run_s = time.perf_counter() - t1

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    where = f"on NDIF at {model.info['remote_host']}" if args.remote else f"{model.info['dtype']} on {model.info['device']}"
    print(f"model: {args.model} ({model.n_layers} layers, {where})")
    print(f"protocol: {protocol.n_shots} shots, {protocol.n_dev} dev / {protocol.n_test} test / "
          f"{protocol.n_baseline} baseline prompts, {len(tasks)} tasks")
    print(f"\n{'phase':<14}{'requests':>9}{'traces':>8}{'rows':>9}{'tokens':>10}{'seconds':>10}{'tok/s':>9}{'s/request':>10}")
    for phase, e in USAGE.by_phase.items():
        print(f"{phase:<14}{e['requests']:>9}{e['traces']:>8}{e['rows']:>9}{e['tokens']:>10}{e['seconds']:>10.1f}"
              f"{e['tokens'] / max(e['seconds'], 1e-9):>9.0f}{e['seconds'] / e['requests']:>10.2f}")
    print(f"{'all phases':<14}{USAGE.total('requests'):>9.0f}{USAGE.total('traces'):>8.0f}{USAGE.total('rows'):>9.0f}"
          f"{USAGE.total('tokens'):>10.0f}{USAGE.total('seconds'):>10.1f}")
    print(f"requests per task: {USAGE.total('requests') / len(tasks):.1f}; "
          f"seconds per request: {USAGE.total('seconds') / max(USAGE.total('requests'), 1):.2f}")
    per_task = result.accuracy.set_index("task")["seconds"]
    print(f"\nload model: {load_s:.1f} s")
    print(f"experiment: {run_s:.1f} s total, {run_s / len(tasks):.1f} s per task "
          f"(min {per_task.min():.1f} {per_task.idxmin()}, max {per_task.max():.1f} {per_task.idxmax()})")
    rss = peak_rss_gb()
    print(f"peak RSS: {rss:.2f} GB")
    full = run_s * 18 / len(tasks)
    print(f"\ntarget: 18 tasks < {TARGET_SECONDS} s -> {'projected ' if len(tasks) != 18 else ''}{full:.0f} s "
          f"({'met' if full < TARGET_SECONDS else 'MISSED'}); peak RSS < {TARGET_RSS_GB} GB -> "
          f"{'met' if rss < TARGET_RSS_GB else 'MISSED'}")
    print("mean accuracy:", result.summary().round(3).to_dict())


if __name__ == "__main__":
    main()
