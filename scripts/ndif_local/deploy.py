"""``deploy``: serve local model folders under the key a client computes for them."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from . import netns, procs
from .common import HarnessError, log, sha16, tail_file
from .install import installed_venvs
from .stack import CPU_ACTOR_CLASS, Stack

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def model_key(folder: str) -> str:
    """The key nnsight 0.8.1's client sends for ``TransformersModel(folder)`` / ``LanguageModel(folder)``.

    ``Remotable.to_model_key``: "<import path of TransformersModel>:<json>", where the JSON is
    ``HuggingFaceModel._remoteable_model_key`` ({"repo_id", "revision"}) plus the pipeline task that
    ``TransformersModel._remoteable_model_key`` adds, dumped with json.dumps' default separators. The
    client puts the Hub's canonical id in "repo_id" (HfApi().model_info); for a local folder that look-up
    fails, so clients pre-fill ``nnsight.modeling.huggingface._ID_CACHE[folder] = folder``.
    """
    suffix = json.dumps({"repo_id": folder, "revision": None, "task": "text-generation"})
    return f"nnsight.modeling.transformers.TransformersModel:{suffix}"


def weights_bytes(folder: Path) -> int:
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not size:
        raise HarnessError(f"{folder}: no weight file ({', '.join(WEIGHT_SUFFIXES)})")
    return size


def yaml_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def spec_entry(folder: str, key: str, size: int) -> str:
    """One model of ``ndif deploy -f``'s YAML. model_key, size_bytes, dtype and actor_class are given, so
    the controller neither asks the Hub nor describes the checkpoint (which fails with ndif 0.1.2 +
    nnsight 0.8.1: describe_checkpoint() got an unexpected keyword argument 'trust_remote_code')."""
    return (f"  - checkpoint: {yaml_str(folder)}\n"
            f"    model_key: {yaml_str(key)}\n"
            "    task: text-generation\n"
            f"    size_bytes: {size}\n"
            "    dtype: float32\n"
            f"    actor_class: {CPU_ACTOR_CLASS}\n"
            "    pinned: true\n")


def served_keys(host: str) -> set[str]:
    """Model keys with a replica in the RUNNING state, from the API's /status."""
    code, body = procs.http_get(f"{host}/status", 10)
    if code != 200:
        return set()
    try:
        deployments = json.loads(body).get("deployments", {})
    except ValueError:
        return set()
    # Entries are "<replica>:<actor class>:<model key>"; the model key itself contains colons.
    return {name.split(":", 2)[2] for name, info in deployments.items()
            if name.count(":") >= 2 and info.get("application_state") == "RUNNING"}


def cmd_deploy(args) -> None:
    stack = Stack(args.dir)
    state = stack.read()
    if not state or not stack.processes(state) or procs.http_get(f"{stack.host(state)}/connected", 3)[0] != 200:
        raise HarnessError(f"no running stack in {stack.dir}: start it first")
    server, s3 = installed_venvs()
    specs, keys, sizes = [], {}, {}
    for raw in args.folders:
        folder = os.path.abspath(raw)  # the client must use this exact string as the model's path
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise HarnessError(f"{folder}: not a model folder (no config.json)")
        keys[folder] = model_key(folder)
        sizes[folder] = weights_bytes(Path(folder))
        specs.append(spec_entry(folder, keys[folder], sizes[folder]))
    spec = stack.dir / f"deploy-{sha16(' '.join(keys))}.yaml"
    spec.write_text("models:\n" + "".join(specs))
    # One `ndif deploy` for all: one Ray client connection (each holds a ~0.5 GB server process a while),
    # and the models load in parallel.
    start = time.time()
    timeout = args.timeout * len(keys)
    logfile = stack.logs / "deploy.log"
    command = [str(server.bin / "ndif"), "deploy", "-f", str(spec)]
    if state.get("netns"):  # it talks to Ray, inside the stack's own network
        command = netns.enter(state["netns"]) + command
    proc = procs.spawn(command, stack.env(state, server, s3), stack.dir, logfile)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        procs.kill_tree(proc.pid)
        proc.wait()
        code = None
    actor_logs = f"(the model actors' logs: {stack.dir / 'ray'}/session_latest/logs/worker-*.err)"
    if code != 0:
        what = f"took over {timeout:.0f}s" if code is None else f"failed ({code})"
        raise HarnessError(f"`ndif deploy` {what}; end of {logfile}:\n{tail_file(logfile)}\n{actor_logs}")
    # `ndif deploy` returns once every replica is ready; the API's view must agree.
    host = stack.host(state)
    procs.wait_until(lambda: set(keys.values()) <= served_keys(host), 60, f"the deployed models in {host}/status",
                     [logfile])
    seconds = time.time() - start
    state = stack.read()
    state.setdefault("models", {}).update(keys)
    for folder in keys:
        state.setdefault("deploy_seconds", {})[folder] = round(seconds, 1)
    stack.write(state)
    log(f"deployed in {seconds:.1f}s: " + ", ".join(f"{f} ({sizes[f] / 1e6:.1f} MB)" for f in keys))
