"""Command line: ``python -m taskvec {main,tasks,prompts}`` (``book``: see taskvec.publishing.runner).

Every argument (model name, task names, sizes, prompt file) is checked before a
model loads, so a typo fails in a second rather than after minutes of compute.
``main`` keeps each finished task in the results cache, so an interrupted run
(Ctrl-C) resumes where it stopped when the same command is run again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import remote
from .errors import TaskvecError
from .experiment import PromptSet
from .settings import Protocol
from .models import resolve_source
from .tasks import load_tasks


TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


def boolean(text: str) -> bool:
    """A flag's value: true/yes/1 or false/no/0 (any case); anything else is an error, not False."""
    word = text.strip().lower()
    if word in TRUE:
        return True
    if word in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (or yes/no, 1/0), got {text!r}")


def _protocol_args(parser: argparse.ArgumentParser) -> None:
    """One flag per Protocol setting, its help the setting's description (taskvec/settings.py)."""
    for name, f in Protocol.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if f.annotation is bool:
            parser.add_argument(flag, type=boolean, default=f.default, metavar="{true,false}",
                                help=f"{f.description} (default {str(f.default).lower()})")
        else:
            kind = int if isinstance(f.default, int) else str
            parser.add_argument(flag, type=kind, default=f.default, help=f"{f.description} (default {f.default!r})")


def _protocol(ns: argparse.Namespace) -> Protocol:
    return Protocol(**{name: getattr(ns, name) for name in Protocol.model_fields})


def _tasks(ns: argparse.Namespace):
    names = None if ns.tasks in (None, "all") else [n.strip() for n in ns.tasks.split(",") if n.strip()]
    return load_tasks(names)


def _store(ns: argparse.Namespace):
    """The results cache ``main`` reads and writes (None with --no-cache)."""
    from .store import Store

    return None if ns.no_cache else Store(ns.cache_dir or None)


def _model_and_loader(ns: argparse.Namespace, store):
    """The model for a run and how to load it: with the cache it is passed by name and loads only if some
    task is not cached yet. A remote run without a key for the public host fails here, before any compute."""
    from .models import load_model

    if remote.is_remote(ns.remote):
        remote.check_setup(ns.remote, ns.model)
    remote.check_access(ns.model)

    def loader(name: str):
        return load_model(name, remote=ns.remote)

    return (ns.model if store else loader(ns.model)), loader


def _write_tables(out: Path, result) -> None:
    """The accuracy, dev-curve and prediction tables of a run, as CSV files in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    result.accuracy.to_csv(out / "accuracy.csv", index=False)
    result.dev_curve.to_csv(out / "dev_curve.csv", index=False)
    result.predictions.to_csv(out / "predictions.csv", index=False)


def cmd_main(ns: argparse.Namespace) -> int:
    from .experiment import run_main_experiment
    from .prompts import read_jsonl

    protocol = _protocol(ns)
    tasks = _tasks(ns)
    resolve_source(ns.model)
    if ns.max_new_tokens is not None:
        return _long_answers(ns, protocol, tasks)
    prompts = None
    if ns.prompts:
        try:
            loaded = read_jsonl(ns.prompts)
        except OSError as error:  # missing, a folder, unreadable: say which file, no traceback
            raise TaskvecError(f"--prompts {ns.prompts}: cannot read the prompt file ({error.strerror})") from None
        for task in tasks:
            splits = loaded.get(task.name, {})
            empty = [s for s in ("dev", "test", "baseline") if not splits.get(s)]
            if empty:
                raise TaskvecError(f"{ns.prompts}: task {task.name!r} has no {'/'.join(empty)} prompts")
        prompts = {name: PromptSet(s.get("dev", []), s.get("test", []), s.get("baseline", []))
                   for name, s in loaded.items()}
    start = time.perf_counter()
    store = _store(ns)
    model, loader = _model_and_loader(ns, store)
    result = run_main_experiment(model, tasks, protocol, prompts=prompts, store=store, loader=loader,
                                 remote=ns.remote)
    from .studies import stats

    out = Path(ns.out)
    accuracy = stats.with_intervals(result.accuracy, result.predictions)
    means = stats.means_with_intervals(result.accuracy, seed=protocol.seed)
    _write_tables(out, result)
    accuracy.to_csv(out / "accuracy.csv", index=False)  # with each accuracy's prompts and Wilson interval
    means.to_csv(out / "means.csv", index=False)
    meta = {**result.meta, "model": result.model, "n_layers": result.n_layers,
            "seconds": round(time.perf_counter() - start, 1)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    table = accuracy[["task", "format", "n_usable", "best_layer", "saturated"]].copy()
    for c in stats.CONDITIONS:
        table[f"{c} (n) [95% CI]"] = [f"{stats.shown(v, lo, hi)} ({'-' if n != n else int(n)})" for v, lo, hi, n in
                                      accuracy[[f"{c}_acc", f"{c}_lo", f"{c}_hi", f"{c}_n"]].itertuples(index=False)]
    print(table.to_string(index=False))
    print("mean over tasks [95% bootstrap interval over tasks]: " + ", ".join(
        f"{r.condition} {stats.shown(r.mean, r.lo, r.hi)} ({r.n_tasks} tasks)" for r in means.itertuples(index=False)))
    print(f"wrote {out}/accuracy.csv, means.csv, dev_curve.csv, predictions.csv, meta.json")
    return 0


def _long_answers(ns: argparse.Namespace, protocol: Protocol, tasks) -> int:
    """``main --max-new-tokens N``: answers generated up to N tokens, scored on the first token and whole."""
    from .studies import long_answers

    if ns.prompts:
        raise TaskvecError("--prompts and --max-new-tokens do not go together: the long-answer experiment samples "
                           "its prompts from every example (no single-token filter)")
    long_answers.check_max_new_tokens(ns.max_new_tokens)
    start = time.perf_counter()
    store = _store(ns)
    model, loader = _model_and_loader(ns, store)
    result = long_answers.run(model, tasks, protocol, ns.max_new_tokens, store=store, loader=loader, remote=ns.remote)
    out = Path(ns.out)
    _write_tables(out, result)
    (out / "meta.json").write_text(json.dumps({"model": result.model, "max_new_tokens": ns.max_new_tokens,
                                               "protocol": protocol.as_dict(),
                                               "task_seconds": result.seconds,
                                               "seconds": round(time.perf_counter() - start, 1)}, indent=1, default=str))
    print(result.accuracy.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"wrote {out}/accuracy.csv, dev_curve.csv, predictions.csv, meta.json")
    return 0


def cmd_tasks(ns: argparse.Namespace) -> int:
    from .experiment import usable_counts
    from .models import load_model

    tasks = _tasks(ns)
    if ns.model:
        resolve_source(ns.model)
        table = usable_counts(tasks, load_model(ns.model).tokenizer)  # the paper protocol's format rule
    else:
        import pandas as pd

        table = pd.DataFrame([{"task": t.name, "category": t.category, "compare": t.compare,
                               "n_examples": len(t), "description": t.description} for t in tasks])
    print(table.to_string(index=False))
    return 0


def cmd_prompts(ns: argparse.Namespace) -> int:
    from .prompts import write_jsonl

    protocol = _protocol(ns)
    tasks = _tasks(ns)
    if ns.model:
        from .scoring import single_token_examples
        from .models import load_model

        resolve_source(ns.model)
        tokenizer = load_model(ns.model).tokenizer
        tasks = [single_token_examples(t, tokenizer, protocol.format_for(t, tokenizer)) for t in tasks]
    sets = {}
    for task in tasks:
        for split, prompts in PromptSet.sample(task, protocol).as_dict().items():
            sets.setdefault(split, []).extend(prompts)
    print(f"wrote {write_jsonl(ns.out, sets)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m taskvec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("book", help="execute the section notebooks and build the book (python -m taskvec book -h)")

    main = sub.add_parser("main", help="run the main experiment and write its tables")
    main.add_argument("--model", default="gemma-3-270m", help="embedded name, local folder or hub id")
    main.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'")
    main.add_argument("--prompts", help="JSONL prompt file to use instead of sampling (see 'prompts')")
    main.add_argument("--out", default="results/main", help="output folder")
    main.add_argument("--cache-dir", default="", help="results cache (default $TASKVEC_CACHE/results, "
                      "i.e. ~/.cache/taskvec/results): finished tasks are kept there and reused")
    main.add_argument("--no-cache", action="store_true", help="neither read nor write the results cache")
    main.add_argument("--remote", nargs="?", const=True, default=False, metavar="HOST",
                      help="run on NDIF: nnsight's configured host (NDIF_HOST, key from NDIF_API_KEY), or HOST "
                           "(http://host:port); no weights are loaded here")
    main.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                      help="generate answers of up to N tokens and score them whole as well as by their first token "
                           "(every example usable, no single-token filter; columns first_token_acc and "
                           "full_answer_acc per condition)")
    _protocol_args(main)
    main.set_defaults(func=cmd_main)

    tasks = sub.add_parser("tasks", help="list tasks (with --model: usable single-token examples)")
    tasks.add_argument("--model")
    tasks.add_argument("--tasks", default="all")
    tasks.set_defaults(func=cmd_tasks)

    prompts = sub.add_parser("prompts", help="export the sampled prompt sets as JSONL")
    prompts.add_argument("--model", help="restrict to this tokenizer's single-token examples first")
    prompts.add_argument("--tasks", default="all")
    prompts.add_argument("--out", required=True)
    _protocol_args(prompts)
    prompts.set_defaults(func=cmd_prompts)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["book"]:
        from .publishing.runner import main as book_main

        return book_main(argv[1:])
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except TaskvecError as error:  # bad input (unknown model/task, bad files and sizes); bugs keep their traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {_interrupted(ns)}", file=sys.stderr)
        return 130


def _interrupted(ns: argparse.Namespace) -> str:
    """What an interrupted command leaves behind, in one line."""
    if ns.command == "main":
        store = _store(ns)
        if store is None:
            return "nothing was kept (--no-cache); rerun without --no-cache to keep finished tasks"
        return (f"finished tasks are in the results cache at {store.root}; "
                "rerunning the same command resumes from there")
    return "nothing was written"
