"""Benchmark the main experiment: wall time per phase, prompts and tokens processed, peak RSS.

    python scripts/benchmark.py                      # all 18 tasks, paper protocol, default model
    python scripts/benchmark.py --study heads        # the heads study on its default tasks and sizes (the book's)
    python scripts/benchmark.py --tasks 3            # the first 3 tasks
    python scripts/benchmark.py --tasks antonyms,en_fr
    python scripts/benchmark.py --tasks 2 --remote http://127.0.0.1:8001   # through an NDIF server

Targets (issue 9): the full 18-task run on Gemma 3 270M in at most 240 s on 2 cores, peak RSS at most 3 GB.
Figures are printed, not asserted: timing belongs here, not in the test suite.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import platform
import resource
import time

import pandas as pd
import torch

from taskvec import Protocol, list_tasks, load_model, load_tasks, run_main_experiment
from taskvec.mechanism import track_usage
from taskvec.models import resolve_source
from taskvec.studies import heads as heads_study

TARGET_SECONDS, TARGET_RSS_GB = 240, 3.0


def flop_per_token(model) -> float:
    """Forward FLOP per token: 2 x the parameters a token's pass multiplies by (the embedding is a lookup;
    the unembedding is counted per read-out row, see main)."""
    embedding = model.hf.get_input_embeddings().weight
    body = sum(p.numel() for p in model.hf.parameters() if p is not embedding and p.data_ptr() != embedding.data_ptr())
    return 2.0 * body


def matmul_flops(size: int = 1024, seconds: float = 1.0) -> float:
    """This machine's float32 matmul rate with torch's threads, FLOP/s (best of a few runs)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t))
    return best


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--tasks", default="all", help="'all', a number N (first N tasks), or comma-separated names")
    parser.add_argument("--n-dev", type=int, default=Protocol.model_fields["n_dev"].default)
    parser.add_argument("--n-test", type=int, default=Protocol.model_fields["n_test"].default)
    parser.add_argument("--n-baseline", type=int, default=Protocol.model_fields["n_baseline"].default)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="weights' dtype (default: the model's, float32 on a CPU)")
    parser.add_argument("--compare", metavar="DIR", help="a folder written by --save: count predictions that differ")
    # dest: nnsight gives every object a .save() method, which argparse would take for the option's value
    parser.add_argument("--save", dest="save_dir", metavar="DIR", help="write this run's predictions and accuracy table there")
    parser.add_argument("--study", default="main", choices=["main", "heads"],
                        help="main: the main experiment (the targets below); heads: the heads study (no target, its "
                             "forward tokens and seconds per phase)")
    parser.add_argument("--remote", nargs="?", const=True, default=False, metavar="HOST",
                        help="run on NDIF (nnsight's configured host, or HOST): requests per task and seconds per request")
    args = parser.parse_args()

    default_tasks = list_tasks() if args.study == "main" else list(heads_study.DEFAULT_TASKS)
    names = default_tasks if args.tasks == "all" else (
        list_tasks()[: int(args.tasks)] if args.tasks.isdigit() else args.tasks.split(","))
    tasks = load_tasks(names)
    resolve_source(args.model)
    protocol = Protocol(n_dev=args.n_dev, n_test=args.n_test, n_baseline=args.n_baseline, dtype=args.dtype)

    t0 = time.perf_counter()
    model = load_model(args.model, remote=args.remote) if args.remote else load_model(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with track_usage() as usage:
        if args.study == "heads":  # θ at the middle layer for every task: the cost does not depend on which
            layers = {t.name: model.n_layers // 2 for t in tasks}
            result = heads_study.run_all(model, tasks, protocol, layers, progress=False)
        else:
            result = run_main_experiment(model, tasks, protocol, progress=False)
    run_s = time.perf_counter() - t1

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    where = f"on NDIF at {model.info['remote_host']}" if args.remote else f"{model.info['dtype']} on {model.info['device']}"
    print(f"model: {args.model} ({model.n_layers} layers, {where})")
    if args.study == "heads":
        print(f"heads study: {len(tasks)} tasks ({', '.join(names)}), {heads_study.HeadSizes()!r}, "
              f"{heads_study.FvSizes()!r}, {protocol.n_shots} shots")
    else:
        print(f"protocol: {protocol.n_shots} shots, {protocol.n_dev} dev / {protocol.n_test} test / "
              f"{protocol.n_baseline} baseline prompts, {len(tasks)} tasks")
    token_flop, head_flop = flop_per_token(model), 2 * model.d_model * model.arch.vocab_size
    rate = None if args.remote else matmul_flops()
    if rate:
        print(f"arithmetic: {token_flop / 1e9:.2f} GFLOP per forward token (2 x non-embedding parameters), "
              f"{head_flop / 1e9:.2f} GFLOP per row read out through the unembedding; this machine's float32 "
              f"matmul: {rate / 1e9:.0f} GFLOP/s. floor = the phase's arithmetic at that rate.")
    print(f"\n{'phase':<28}{'requests':>9}{'traces':>8}{'rows':>8}{'tokens':>9}{'heads':>8}{'seconds':>9}"
          f"{'floor s':>9}{'s/request':>10}")
    floors = {}
    for phase, e in usage.by_phase.items():
        floors[phase] = (e["tokens"] * token_flop + e["heads"] * head_flop) / rate if rate else float("nan")
        print(f"{phase:<28}{e['requests']:>9}{e['traces']:>8}{e['rows']:>8}{e['tokens']:>9}{e['heads']:>8}"
              f"{e['seconds']:>9.1f}{floors[phase]:>9.1f}{e['seconds'] / e['requests']:>10.2f}")
    print(f"{'all phases':<28}{usage.total('requests'):>9.0f}{usage.total('traces'):>8.0f}{usage.total('rows'):>8.0f}"
          f"{usage.total('tokens'):>9.0f}{usage.total('heads'):>8.0f}{usage.total('seconds'):>9.1f}"
          f"{sum(floors.values()):>9.1f}")
    print(f"requests per task: {usage.total('requests') / len(tasks):.1f}; "
          f"seconds per request: {usage.total('seconds') / max(usage.total('requests'), 1):.2f}")
    if args.study == "heads":
        print(f"\nload model: {load_s:.1f} s")
        print(f"heads study on {args.model}: {usage.total('tokens'):.0f} forward tokens, {run_s:.1f} s "
              f"({run_s / len(tasks):.1f} s per task); the book's page budget is 180 s on 2 cores")
        print(f"peak RSS: {peak_rss_gb():.2f} GB")
        return
    per_task = result.accuracy.set_index("task")["seconds"]
    print(f"\nload model: {load_s:.1f} s")
    print(f"experiment: {run_s:.1f} s total, {run_s / len(tasks):.1f} s per task "
          f"(min {per_task.min():.1f} {per_task.idxmin()}, max {per_task.max():.1f} {per_task.idxmax()})")
    rss = peak_rss_gb()
    print(f"peak RSS: {rss:.2f} GB")
    full = run_s * 18 / len(tasks)
    if args.remote:  # the targets are for this machine's own compute; remotely the server's time counts
        print(f"\nserver: {run_s / len(tasks):.1f} s per task, {usage.total('requests') / len(tasks):.1f} requests per task")
    else:
        print(f"\ntarget: 18 tasks <= {TARGET_SECONDS} s -> {'projected ' if len(tasks) != 18 else ''}{full:.0f} s "
              f"({'met' if full <= TARGET_SECONDS else 'MISSED'}); peak RSS < {TARGET_RSS_GB} GB -> "
              f"{'met' if rss <= TARGET_RSS_GB else 'MISSED'}")
    print("mean accuracy:", result.summary().round(3).to_dict())
    columns = ["task", "condition", "prompt", "token_id", "correct"]
    if args.save_dir:
        out = Path(args.save_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.predictions[columns].to_csv(out / "predictions.csv", index=False)
        result.dev_curve.to_csv(out / "dev_curve.csv", index=False)
        result.accuracy.drop(columns="seconds").to_csv(out / "accuracy.csv", index=False)
    if args.compare:
        other = pd.read_csv(Path(args.compare) / "predictions.csv")
        both = result.predictions[columns].merge(other, on=["task", "condition", "prompt"], suffixes=("", "_other"))
        changed = both[both["token_id"] != both["token_id_other"]]
        flips = int((both["correct"] != both["correct_other"]).sum())
        curve = pd.read_csv(Path(args.compare) / "dev_curve.csv").merge(result.dev_curve, on=["task", "layer"],
                                                                        suffixes=("_other", ""))
        moved = int((curve["dev_acc"] - curve["dev_acc_other"]).abs().gt(1e-9).sum())
        print(f"\nagainst {args.compare}: {len(changed)} of {len(both)} scored predictions differ "
              f"({flips} change correctness); {moved} of {len(curve)} dev-curve points differ")
        if len(changed):
            print(changed.groupby(["task", "condition"]).size().to_string())


if __name__ == "__main__":
    main()
