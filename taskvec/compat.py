"""Every private or undocumented API of transformers and nnsight that taskvec relies on, in one place.

Checked on transformers 5.23.0 and nnsight 0.8.1 (torch 2.13, Python 3.11 here; the local NDIF
server of tests/ndif_server.py runs the same on Python 3.12). When either library moves, this is
the file to read and fix; nothing else in taskvec reaches behind a public API of theirs.

``torch_module(envoy)`` -- nnsight's ``Envoy._module``
    The ``torch.nn.Module`` an nnsight envoy wraps. Needed for the model's config, parameters
    (device, dtype, ``d_model``) and for checking the architecture's paths on the bare module
    (an envoy answers ``getattr`` with child envoys). nnsight names it in ``Envoy``'s docstring
    but gives it no public accessor.

``name_folder_for_ndif(path)`` -- nnsight's ``nnsight.modeling.huggingface._ID_CACHE``
    nnsight names a model to an NDIF server by its hub id, which it asks the hub for (and caches
    in this module-level dict) when a request is first sent. A local folder (an embedded model,
    or a folder a local NDIF server deployed) has no hub id and the hub is not to be asked:
    writing ``_ID_CACHE[path] = path`` makes the folder's path its own id.

``select_cache_rows(cache, rows)`` -- transformers' ``Cache.layers`` and its layers' state
    A copy of a key/value cache holding some of its batch rows (repeats allowed). The public
    ``Cache.batch_select_indices`` re-indexes in place; taskvec needs the original intact (every
    patched row of a sweep runs on its own copy of one prefix's cache). The copy is shallow per
    layer object, which relies on how ``DynamicLayer``/``DynamicSlidingWindowLayer`` keep their
    state: ``keys``/``values`` tensors that ``batch_select_indices`` rebinds (never writes into),
    plus the sliding window and the count of tokens seen, which must stay as they are (a cache
    rebuilt from saved keys and values would not match: a sliding-window layer keeps only its
    window, and its count of tokens seen sets the mask offsets). It runs inside traces, on an
    NDIF server too (taskvec's source travels with each request, see :func:`taskvec.remote.ship_code`).

``is_key_value_cache(cache)`` -- transformers' ``Cache.layers`` and its layer classes
    Whether a forward's cache is one :func:`select_cache_rows` can copy: a ``Cache`` whose every layer is
    exactly a ``DynamicLayer`` or ``DynamicSlidingWindowLayer`` (keys and values, full or windowed). A
    recurrent, linear-attention or indexer layer keeps other state, so its family is declined
    (:func:`taskvec.arch.check_parts`).

``drop_gguf_quantizer(model)`` -- transformers' ``PreTrainedModel.hf_quantizer`` and
    ``config.quantization_config``: a model de-quantized from a GGUF file still carries its
    quantizer, and ``save_pretrained`` refuses a quantized model. After loading, the weights are
    plain float32: dropping both lets it be saved as an ordinary safetensors folder.

Not routed here: :mod:`taskvec.remote` builds nnsight's ``RemoteBackend`` (``blocking=False``,
``job.status``, ``job.job_id``) and classifies its ``RemoteError``, from the internal module
``nnsight.intervention.backends.remote``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def torch_module(envoy: Any) -> torch.nn.Module:
    """The ``torch.nn.Module`` an nnsight envoy (e.g. a ``TransformersModel``) wraps."""
    return envoy._module


def name_folder_for_ndif(path: str) -> None:
    """Make nnsight name the model at ``path`` to an NDIF server by that path, not by a hub id it would ask the hub for."""
    import nnsight.modeling.huggingface as nnsight_hf

    nnsight_hf._ID_CACHE[path] = path


def select_cache_rows(cache, rows: torch.Tensor):
    """A copy of a transformers key/value ``cache`` holding batch rows ``rows`` (repeats allowed).

    Each layer object is copied shallowly (its sliding-window state and length stay as they are)
    and its keys and values re-indexed, so ``cache`` itself is left intact.
    """
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    if new.layers:
        new.batch_select_indices(rows.to(cache.layers[0].keys.device))
    return new


def is_key_value_cache(cache: Any) -> bool:
    """A transformers Cache whose every layer keeps keys and values (full or sliding window), nothing else."""
    from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

    if not isinstance(cache, Cache) or not cache.layers:
        return False
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)


def drop_gguf_quantizer(model: torch.nn.Module) -> None:
    """Let a model de-quantized from GGUF (its weights plain now) be saved by ``save_pretrained``."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
