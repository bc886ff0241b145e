"""Remote runs on NDIF: where requests go, the checks made before any compute, and failures that
name what failed.

A model loaded with ``load_model(name, remote=True)`` (or a host URL) holds no weights: every
trace is sent to an NDIF server, which runs it on its copy of the model. The host comes from
nnsight's configuration (``NDIF_HOST`` or nnsight's config file), the API key from ``NDIF_API_KEY``
or nnsight's config file; the key is handed to nnsight and never written anywhere by taskvec
(results, notebooks, logs and error messages name the host, never the key).

Trace bodies call taskvec's helpers (the architecture accessor, :mod:`taskvec.mechanism`), which a
server cannot import: :func:`ship_code` registers the package with nnsight so its source travels
by value with each request.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from typing import Callable, TypeVar

from .errors import TaskvecError

#: NDIF's public service: the only host that needs an API key before anything is sent.
PUBLIC_HOST = "https://api.ndif.us"
#: Attempts per request when the failure is transient (host unreachable, connection dropped).
ATTEMPTS = 3
#: Seconds before the second attempt; doubled for each further one.
BACKOFF_S = 2.0

#: Seconds one request may take, waiting in the server's queue included, before it is given up
#: (``TASKVEC_NDIF_TIMEOUT`` overrides it). A request that runs out is not retried: the server may
#: still be working on it; finished tasks stay cached, and a rerun resumes after them.
TIMEOUT_S = float(os.environ.get("TASKVEC_NDIF_TIMEOUT", "1800"))
#: Seconds between two status polls of a submitted request: POLL_S at first, growing by half each
#: time up to POLL_MAX_S, so a short request is collected at once and a long one in the server's
#: queue is not polled four times a second.
POLL_S = 0.25
POLL_MAX_S = 5.0

#: Seconds a submitted job may show one unchanged status (not final) before the request is submitted again,
#: once (``TASKVEC_NDIF_STALE`` overrides it). ndif 0.1.2 writes a job's status from three processes without
#: ordering, so a late "PROVISIONING" can land after "COMPLETED" and stay there: a poll would then wait out
#: the whole timeout for a job that finished in a second. Every taskvec request only reads the model, so a
#: second submission is safe; it is made once, with a warning, and the second waits to the timeout.
STALE_S = float(os.environ.get("TASKVEC_NDIF_STALE", "300"))

T = TypeVar("T")

# Which task and phase a remote request belongs to, for error messages (set by the experiment).
_WHERE: contextvars.ContextVar[dict] = contextvars.ContextVar("taskvec_remote_where", default={})


class RemoteSetupError(TaskvecError):
    """A remote run that cannot start: no API key for the public host, a bad host URL."""


class RemoteRunError(TaskvecError):
    """A remote request that failed; the message names host, model, task and phase."""


class RequestTimeout(Exception):
    """A submitted request gave no result within :data:`TIMEOUT_S` (raised by :func:`wait`)."""


class StaleStatus(Exception):
    """A submitted job showed one status, not final, for :data:`STALE_S` (raised by :func:`wait`; :func:`call`
    submits the request again, once)."""

    def __init__(self, job_id, status: str, seconds: float) -> None:
        super().__init__(f"job {job_id} has shown status {status} for {seconds:.0f} s")
        self.job_id, self.status, self.seconds = job_id, status, seconds


# Set while a request is submitted the second time: its wait does not give up on a stale status again.
_RESUBMITTED: contextvars.ContextVar[bool] = contextvars.ContextVar("taskvec_remote_resubmitted", default=False)


def setting(value) -> bool | str:
    """A remote setting as users write it: True/False, "true"/"false" (papermill's ``-p remote true``
    passes a string), "local" (nnsight's in-process simulation) or an NDIF host URL."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip()
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0", ""):
        return False
    if text == "local" or text.startswith(("http://", "https://")):
        return text
    raise RemoteSetupError(f"remote must be true, false or an NDIF host URL (http://host:port), got {value!r}")


def is_remote(remote: bool | str) -> bool:
    """True for a real server (``True`` or a host URL); ``"local"`` is nnsight's in-process simulation."""
    return bool(remote) and remote != "local"


def host(remote: bool | str = True) -> str:
    """The NDIF host requests go to: ``remote`` itself when it is a URL, else nnsight's configured host."""
    if isinstance(remote, str) and remote != "local":
        return remote.rstrip("/")
    from nnsight import CONFIG

    return str(CONFIG.API.HOST).rstrip("/")


def api_key() -> str | None:
    """The key nnsight will send (``NDIF_API_KEY`` or nnsight's config); never printed or stored."""
    from nnsight import CONFIG

    return CONFIG.API.APIKEY or None


def check_setup(remote: bool | str, model: str) -> str:
    """Fail before any compute when a remote run cannot work; returns the host."""
    target = host(remote)
    if not target.startswith(("http://", "https://")):
        raise RemoteSetupError(f"NDIF host {target!r} for model {model!r} is not an http(s) URL "
                               "(set NDIF_HOST, or pass remote='http://host:port')")
    if target == PUBLIC_HOST and not api_key():
        raise RemoteSetupError(
            f"no NDIF API key for {target} (model {model!r}): set NDIF_API_KEY, or run "
            "`python -c \"from nnsight import CONFIG; CONFIG.set_default_api_key('YOUR_KEY')\"`; "
            "keys are free at https://login.ndif.us")
    return target


class GatedModelError(RemoteSetupError):
    """A hub model whose licence the user's account has not accepted (or no token was given)."""


def check_access(model: str, auth_check=None) -> None:
    """Fail in one line, before any request, when ``model`` is a gated hub repository this machine may not
    read: its config and tokenizer are read here even when it runs on NDIF. Only a gated answer is turned
    into this error; anything else (no network, a typo) is left to the loader, which names it."""
    from huggingface_hub.errors import GatedRepoError

    from .models import resolve_source

    if resolve_source(model) != "hub":
        return  # an embedded model or a local folder

    if auth_check is None:
        from huggingface_hub import auth_check
    try:
        auth_check(model)
    except GatedRepoError:
        token = "a token is set (HF_TOKEN or hf auth login) but its account" if _hf_token() else "no hub token is set, and"
        raise GatedModelError(
            f"model {model!r} is gated on the Hugging Face hub and {token} has not been granted access: accept its "
            f"licence at https://huggingface.co/{model} and set HF_TOKEN to a token of that account "
            "(its config and tokenizer are read on this machine even for a remote run)") from None
    except Exception:  # noqa: BLE001 - offline, unknown id, rate limit: the loader reports those by name
        return


def _hf_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001
        return None


def ship_code() -> None:
    """Send taskvec's source with each request (the server has no taskvec to import)."""
    import nnsight

    import taskvec

    nnsight.register(taskvec)


def backend(nn_model, remote: bool | str):
    """The backend of one request: for a real server a non-blocking one (submitted when its session
    exits, then collected by :func:`wait`, which can give up); None otherwise (nnsight's own).

    nnsight's blocking backend waits on its websocket without a deadline, so a request the server
    never answers would hang a run for good; polling bounds it.
    """
    if not is_remote(remote):
        return None
    from nnsight.intervention.backends.remote import RemoteBackend

    return RemoteBackend(nn_model.to_model_key(), host=host(remote), blocking=False)


def wait(job, timeout: float | None = None, poll: float | None = None,
         clock=time.monotonic, sleep=time.sleep, stale: float | None = None) -> dict:
    """The saved values of a submitted request (``job`` from :func:`backend`), polled until done.

    ``poll`` fixes the seconds between polls (default: from :data:`POLL_S`, growing to :data:`POLL_MAX_S`).
    Raises nnsight's ``RemoteError`` when the job fails on the server, :class:`RequestTimeout` when it has
    not finished ``timeout`` seconds (default :data:`TIMEOUT_S`) after this call, and :class:`StaleStatus`
    when its status has not changed for ``stale`` seconds (default :data:`STALE_S`; never for a request
    that is already a second submission).
    """
    limit = TIMEOUT_S if timeout is None else timeout
    stale_s = None if _RESUBMITTED.get() else (STALE_S if stale is None else stale)
    start = clock()
    deadline = start + limit
    interval = POLL_S if poll is None else poll
    seen, since = None, start
    while True:
        result = job()
        if result is not None:
            return result
        now = clock()
        status = getattr(job.status, "name", job.status) or "not yet queued"
        if status != seen:
            seen, since = status, now
        if now >= deadline:
            raise RequestTimeout(f"no result within {limit:g} s (job {job.job_id}, last status {status})")
        if stale_s is not None and now - since >= stale_s:
            raise StaleStatus(job.job_id, status, now - since)
        sleep(interval)
        if poll is None:
            interval = min(interval * 1.5, POLL_MAX_S)


@contextlib.contextmanager
def where(**parts: str):
    """Label the remote requests made inside this block (e.g. ``task=``, ``phase=``) for error messages."""
    token = _WHERE.set({**_WHERE.get(), **parts})
    try:
        yield
    finally:
        _WHERE.reset(token)


def _scrub(text: str) -> str:
    key = api_key()
    return text.replace(key, "<NDIF_API_KEY>") if key else text


def _transient(error: BaseException) -> bool:
    """Failures worth another attempt: the request never reached the server or the connection dropped."""
    import httpx

    if isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError)):
        return True
    try:
        import websocket

        if isinstance(error, websocket.WebSocketException):
            return True
    except ImportError:  # pragma: no cover - nnsight depends on websocket-client
        pass
    from nnsight.intervention.backends.remote import RemoteError

    # nnsight wraps an HTTP transport failure ("Failed to send request: [Errno 111] ...") in RemoteError;
    # a job that ran and failed on the server reports its own exception instead, which no retry fixes.
    cause = error.__cause__
    return isinstance(error, RemoteError) and cause is not None and isinstance(cause, httpx.TransportError)


def call(fn: Callable[[], T], remote: bool | str, model: str, sleep=time.sleep) -> T:
    """Run ``fn`` (one remote request); retry transient failures, then raise :class:`RemoteRunError`.

    The message names the host, the model, and the task and phase set by :func:`where`, and
    carries the server's own error text; the API key never appears in it.
    """
    if not is_remote(remote):
        return fn()
    target = host(remote)
    attempt = 0
    while attempt < ATTEMPTS:
        attempt += 1
        try:
            return fn()
        except StaleStatus as stale:
            if _RESUBMITTED.get():  # pragma: no cover - wait() does not raise it a second time
                raise
            import warnings

            warnings.warn(f"NDIF request to {target} (model {model}): {stale}; the server may have finished it and "
                          "kept a stale status, so the request (it only reads) is submitted again, once",
                          stacklevel=2)
            token = _RESUBMITTED.set(True)
            try:
                return call(fn, remote, model, sleep)
            finally:
                _RESUBMITTED.reset(token)
        except Exception as error:  # noqa: BLE001 - classified below, re-raised with context
            transient = _transient(error)
            if transient and attempt < ATTEMPTS:
                sleep(BACKOFF_S * 2 ** (attempt - 1))
                continue
            labels = ", ".join(f"{k} {v}" for k, v in _WHERE.get().items())
            what = ("timed out" if isinstance(error, RequestTimeout) else
                    "unreachable or dropped the connection" if transient else "failed")
            tries = f" after {attempt} attempts" if transient else ""
            text = _scrub(str(error))
            # A server-side failure arrives as the server's whole traceback: its last line says what failed.
            last = [line for line in text.strip().splitlines() if line.strip()][-1:] or [""]
            failure = RemoteRunError(f"NDIF request to {target} {what}{tries} (model {model}"
                                     f"{', ' + labels if labels else ''}): {type(error).__name__}: {last[0].strip()}")
            failure.remote_text = text  # the full text, for a reader who needs the server's traceback
            raise failure from None
    raise AssertionError("unreachable")  # pragma: no cover
