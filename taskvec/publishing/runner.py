"""The book runner: experiments.yaml -> papermill-executed section notebooks -> Jupyter Book.

1. Read and validate the experiment file; pick a profile.
2. Check every parameter the profile sets against each notebook's parameters cell
   (papermill only warns on unknown names), before any compute.
3. Compute the shared results (the main experiment per model) once, into the cache.
4. Execute each notebook in ``nb/`` with papermill into ``book/sections/``. An executed
   notebook records a key of its source, its parameters, the cache keys of the main
   results it reads (model weights, placement, task data, protocol), all task data and
   the source of every taskvec module; a rerun with the same key skips it. Outputs are
   written to a temporary file and renamed, so an interrupted run never leaves a
   half-written notebook behind.
5. Build the book with Jupyter Book (warnings are errors).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from .. import remote
from ..errors import SettingError, TaskvecError
from ..experiment import main_keys
from ..settings import Protocol
from ..store import code_version, make_key
from ..tasks import all_tasks, load_tasks
from .schema import ProfileSpec
from .sections import SECTIONS, as_list

ROOT = Path(__file__).resolve().parents[2]
#: The package whose every module a notebook may import.
PACKAGE = Path(__file__).resolve().parents[1]
#: Section notebooks in reading order (the sections' settings models); the last two read what the others produced.
NOTEBOOKS = tuple(SECTIONS)


class ExperimentFileError(SettingError):
    """A malformed experiment file; the message names the file and the key."""


def load_experiments(path: Path | str) -> tuple[str, dict[str, ProfileSpec]]:
    """Parse and validate an experiment file (against :class:`taskvec.publishing.schema.ExperimentFile`):
    returns (default profile name, profiles). Every problem found is reported, one per line, each
    naming the file and the key path."""
    from pydantic import ValidationError

    from .schema import ExperimentFile, problems

    path = Path(path)

    def fail(*found: str):
        raise ExperimentFileError("\n".join(f"{path}: {problem}" for problem in found))

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        fail(f"cannot read ({error.strerror})")
    except yaml.YAMLError as error:
        fail(f"not valid YAML ({str(error).splitlines()[0]})")
    try:
        spec = ExperimentFile.model_validate(data)
    except ValidationError as error:
        fail(*problems(error))
    return spec.default_profile(), dict(spec.profiles)


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The names (and defaults) declared in a notebook's ``parameters`` cell."""
    import papermill

    params = papermill.inspect_notebook(str(path))
    if not params:
        raise SettingError(f"{path}: no cell tagged 'parameters'")
    return params


def check_parameters(name: str, profile: ProfileSpec, nb_dir: Path) -> None:
    """Reject, before any compute, a notebook whose parameters cell does not declare exactly its section's
    settings (:data:`taskvec.publishing.sections.SECTIONS`); the values were checked with the file."""
    for notebook in NOTEBOOKS:
        path = nb_dir / f"{notebook}.ipynb"
        declared = set(notebook_parameters(path))
        expected = set(SECTIONS[notebook].model_fields)
        if declared != expected:
            raise SettingError(f"{path.name}: its parameters cell declares {', '.join(sorted(declared))}, its section's "
                               f"settings are {', '.join(sorted(expected))}")
        unknown = set(profile.parameters(notebook)) - declared
        if unknown:
            raise SettingError(f"profile {name!r}: {path.name} has no parameter(s) "
                               f"{', '.join(sorted(unknown))} (it declares {', '.join(sorted(declared))})")


def results_keys(models: Sequence[str], tasks: Sequence[str], protocol: Protocol,
                 remote: bool | str = False) -> dict[str, dict[str, str]]:
    """Main-experiment cache key per model and task (``tasks`` empty: all), without loading any model."""
    task_list = load_tasks(list(tasks) or None)
    return {m: main_keys(m, task_list, protocol, remote=remote) for m in models}


def package_sources() -> str:
    """Hash of the source of every .py file in the taskvec package."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def task_data() -> str:
    """Hash of every task's data: a section may read tasks outside the profile (dominance pairs)."""
    blob = json.dumps([t.identity() for t in load_tasks(all_tasks())], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _notebook_key(source: Path, params: dict, results: dict) -> str:
    """Key of an executed notebook: its source and parameters, the ``results`` keys it reads
    (see :func:`results_keys`), all task data and every module of the package."""
    return make_key((), kind="notebook", source=hashlib.sha256(source.read_bytes()).hexdigest(), params=params,
                    results=results, tasks=task_data(), package=package_sources())


def _recorded(path: Path) -> dict:
    """What an executed notebook recorded about its run (key, seconds); empty if none or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))["metadata"].get("taskvec", {})
    except (OSError, ValueError, KeyError):
        return {}


def parameters_line(params: dict, beside_shown: Sequence[str] = ()) -> str:
    """One line for the page that says what a section ran with: models, protocol overrides, where it ran, the
    runs beside it that are cached (and so shown), and the section's own settings. The injected cell itself
    stays in the executed notebook, hidden on the page. No folder path: those belong to the build machine."""
    shown = dict(params)
    parts = [f"models {', '.join(as_list(shown.pop('models', [])))}"]
    protocol = shown.pop("protocol", {}) or {}
    parts.append("protocol: " + (", ".join(f"{k} {v}" for k, v in protocol.items()) or "defaults"))
    where = shown.pop("remote", False)
    parts.append("runs here" if not where else f"runs on NDIF ({'configured host' if where is True else where})")
    if "beside" in shown:
        shown.pop("beside")
        parts.append("runs beside: " + (", ".join(beside_shown) or "none cached"))
    for name in ("cache_dir", "run_log", "sections_dir"):
        shown.pop(name, None)
    parts += [f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in shown.items() if v not in ("", [], {})]
    return "*Parameters:* " + " · ".join(parts) + "."


def _summarize_parameters(nb, line: str) -> None:
    """Hide papermill's injected-parameters cell on the page and put ``line`` after it."""
    import nbformat

    for index, cell in enumerate(nb.cells):
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags:
            if "remove-cell" not in tags:
                tags.append("remove-cell")
            note = nbformat.v4.new_markdown_cell(line, metadata={"tags": ["parameters-line"]})
            note.id = "parameters-line"
            nb.cells.insert(index + 1, note)
            return


def ipc_kernel_manager(folder: str) -> type:
    """A kernel manager whose kernel listens on Unix sockets under ``folder`` (private: mode 0700) instead of
    TCP ports on localhost: no other user of the machine can send the kernel code while a notebook runs, and
    the kernel does not warn about unencrypted TCP."""
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = os.path.join(folder, "kernel")  # the sockets are kernel-<port> files there

    return IPCKernelManager


def execute(notebook: Path, output: Path, params: dict, key: str, cwd: Path, line: str = "") -> float:
    """Run ``notebook`` with papermill into ``output`` atomically; returns seconds. With ``line``, the injected
    parameters are hidden on the page and summarized by it (:func:`parameters_line`)."""
    import nbformat
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".ipynb", prefix=f".{output.stem}-", dir=output.parent)
    os.close(fd)
    start = time.perf_counter()
    quiet = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}  # no progress bars in the book
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)  # the kernel inherits this process's environment at start
    sockets = tempfile.mkdtemp(prefix="taskvec-kernel-")  # mode 0700: only this user reaches the sockets
    try:
        papermill.execute_notebook(str(notebook), tmp, parameters=params, kernel_name="python3", cwd=str(cwd),
                                   progress_bar=False, kernel_manager_class=ipc_kernel_manager(sockets))
        seconds = time.perf_counter() - start
        nb = nbformat.read(tmp, as_version=4)
        nb.metadata["taskvec"] = {"key": key, "seconds": round(seconds, 1)}
        if line:
            _summarize_parameters(nb, line)
        nbformat.write(nb, tmp)
        os.replace(tmp, output)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if os.path.exists(tmp):
            os.remove(tmp)
        shutil.rmtree(sockets, ignore_errors=True)
    return seconds


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("torch", "transformers", "nnsight", "papermill", "jupyter-book", "altair", "scikit-learn", "numpy",
             "pandas", "gguf")
    return {"python": platform.python_version(), **{n: version(n) for n in names}}


def run(profile_name: str | None = None, experiments: Path | str = ROOT / "experiments.yaml",
        book_root: Path | str = ROOT, cache_dir: str = "", build: bool = True,
        only: list[str] | None = None, force: bool = False, log=print) -> dict:
    """Run a profile end to end; returns the run log (also written to ``book/sections/run_log.json``).

    ``book_root`` holds ``_config.yml``, ``_toc.yml`` and ``book/``; executed notebooks go to
    ``book_root/book/sections``.
    """
    from tqdm.auto import tqdm

    from ..models import resolve_source
    from . import sections

    default, profiles = load_experiments(experiments)
    name = profile_name or default
    if name not in profiles:
        raise SettingError(f"unknown profile {name!r}; defined: {', '.join(profiles)}")
    profile = profiles[name]
    for model in profile.models:
        resolve_source(model)
        if remote.is_remote(profile.remote):
            remote.check_setup(profile.remote, model)  # no key for the public host: fail before any compute
        remote.check_access(model)  # a gated hub model this machine may not read: one line, before any compute
    notebooks = list(only or NOTEBOOKS)
    bad = set(notebooks) - set(NOTEBOOKS)
    if bad:
        raise SettingError(f"unknown notebook(s) {', '.join(sorted(bad))}; known: {', '.join(NOTEBOOKS)}")
    nb_dir, out_dir = ROOT / "nb", Path(book_root) / "book" / "sections"
    check_parameters(name, profile, nb_dir)
    protocol = Protocol(**profile.protocol_settings())  # checked with the file

    started = time.perf_counter()
    log(f"profile {name}: {profile.description}")
    shared = sections.main_results(profile.models, profile.tasks, protocol, cache_dir or None,
                                   remote=profile.remote)  # shared, cached
    shared_s = time.perf_counter() - started
    main_record = [{"model": m, "tasks": len(r.accuracy), "cached_tasks": len(r.meta.get("cached_tasks", [])),
                    "compute_seconds": round(float(r.accuracy["seconds"].sum()), 1)} for m, r in shared.items()]

    results = results_keys(profile.models, profile.tasks, protocol, profile.remote)
    # Runs shown beside (e.g. NDIF runs of the paper's models) count once all their results are cached.
    results["beside"] = {label: keys for label, (_, _, keys) in
                         sections.beside_runs(profile.beside, profile.tasks, protocol, cache_dir or None).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.ipynb"):  # temp files of a run that was killed mid-notebook
        stale.unlink()
    log_path = out_dir / "run_log.json"
    record = {"profile": name, "description": profile.description, "models": profile.models,
              "beside": sorted(results["beside"]),
              "protocol": profile.protocol_settings(), "code_version": code_version(), "versions": versions(),
              "shared_results_seconds": round(shared_s, 1), "main_experiment": main_record, "notebooks": {}}
    for notebook in tqdm(notebooks, desc="notebooks", unit="nb"):
        params = profile.parameters(notebook, cache_dir)
        if notebook == "provenance":
            params = {**params, "run_log": str(log_path)}
            _write_json(log_path, record)  # what provenance reads: everything before it
        if notebook == "intro":
            params = {**params, "sections_dir": str(out_dir)}  # it reads the other pages' findings
        source, output = nb_dir / f"{notebook}.ipynb", out_dir / f"{notebook}.ipynb"
        key = _notebook_key(source, params, results)
        recorded = _recorded(output)
        if not force and not SECTIONS[notebook].reads_the_run and recorded.get("key") == key:
            record["notebooks"][notebook] = {"seconds": recorded.get("seconds", 0.0), "cached": True}
            continue
        seconds = execute(source, output, params, key, ROOT, parameters_line(params, sorted(results["beside"])))
        record["notebooks"][notebook] = {"seconds": round(seconds, 1), "cached": False}
    record["total_seconds"] = round(time.perf_counter() - started, 1)
    _write_json(log_path, record)
    if build:
        from .book import build_book, check_offline

        t0 = time.perf_counter()
        html = build_book(Path(book_root))
        problems = check_offline(html)
        if problems:  # a page that needs the network is a broken page for an offline reader
            raise RuntimeError("the built book loads from outside:\n" + "\n".join(problems))
        record["book_seconds"] = round(time.perf_counter() - t0, 1)
        record["html"] = str(html)
        log(f"book: {html / 'index.html'}")
    log(f"done in {time.perf_counter() - started:.0f} s")
    return record


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m taskvec book", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="profile in the experiment file (default: its 'default')")
    parser.add_argument("--experiments", default=str(ROOT / "experiments.yaml"))
    parser.add_argument("--cache-dir", default="", help="results cache (default $TASKVEC_CACHE/results)")
    parser.add_argument("--only", help="comma-separated notebooks to execute")
    parser.add_argument("--force", action="store_true", help="re-execute notebooks even if up to date")
    parser.add_argument("--no-build", action="store_true", help="execute notebooks only")
    ns = parser.parse_args(argv)
    try:
        run(ns.profile, ns.experiments, cache_dir=ns.cache_dir, build=not ns.no_build,
            only=ns.only.split(",") if ns.only else None, force=ns.force)
    except TaskvecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: say what is kept instead of a traceback
        from ..store import Store

        print(f"\ninterrupted: finished tasks are in the results cache at {Store(ns.cache_dir or None).root} and "
              f"finished notebooks in {ROOT / 'book' / 'sections'};\nrerunning the same command resumes from there",
              file=sys.stderr)
        return 130
    return 0
