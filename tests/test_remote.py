"""The NDIF code path, offline: remote="local" serializes each trace as a remote run would
(taskvec's own code shipped by value, local modules hidden) and executes it in-process."""

from __future__ import annotations

import torch

from taskvec import mechanism

TEXTS = ["example:a->b\nexample:c->", "example:x->", "example:hot->cold\nexample:up->"]


def test_remote_local_matches_local(tiny_gpt2):
    model = tiny_gpt2
    vectors = torch.randn(len(TEXTS), model.n_layers, model.d_model, generator=torch.Generator().manual_seed(5))
    local = (mechanism.next_tokens(model, TEXTS, return_logits=True), mechanism.hidden_states(model, TEXTS),
             mechanism.patched_next_tokens(model, TEXTS, vectors, [0, 2, 3], return_logits=True))
    model.remote = "local"
    try:
        remote = (mechanism.next_tokens(model, TEXTS, return_logits=True), mechanism.hidden_states(model, TEXTS),
                  mechanism.patched_next_tokens(model, TEXTS, vectors, [0, 2, 3], return_logits=True))
    finally:
        model.remote = False
    for a, b in zip(local, remote):
        torch.testing.assert_close(a, b)


# --- the remote path's checks and failures, offline (a real server is exercised in test_ndif_*.py) ---

import subprocess
import sys
from pathlib import Path

import pytest

from taskvec import remote
from taskvec.errors import TaskvecError

KEY = "tv-secret-0123456789-do-not-leak"


@pytest.fixture
def tiny_folder(tmp_path_factory):
    from conftest import tiny_model

    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


def test_a_remote_model_loads_without_weights(tiny_folder, monkeypatch):
    from taskvec.models import load_model

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded for a remote model")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    model = load_model(str(tiny_folder), remote="http://127.0.0.1:9")
    assert {p.device.type for p in model.hf.parameters()} == {"meta"}
    assert (model.n_layers, model.d_model) == (4, 32)
    assert model.placement == ("ndif http://127.0.0.1:9", "server")
    assert model.info["remote_host"] == "http://127.0.0.1:9"


def test_remote_results_are_keyed_on_the_host(tiny_folder):
    from taskvec.experiment import main_keys
    from taskvec.settings import Protocol
    from taskvec.tasks import load_task

    task, protocol = load_task("antonyms"), Protocol()
    keys = {where: main_keys(str(tiny_folder), [task], protocol, remote=where)["antonyms"]
            for where in (False, "http://a:1", "http://b:1")}
    assert len(set(keys.values())) == 3


def test_no_key_for_the_public_host_fails_before_any_compute(monkeypatch, tiny_folder):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(CONFIG.API, "HOST", remote.PUBLIC_HOST)
    with pytest.raises(remote.RemoteSetupError, match="no NDIF API key for https://api.ndif.us"):
        remote.check_setup(True, "EleutherAI/gpt-j-6b")
    env = {**__import__("os").environ, "NDIF_API_KEY": "", "NDIF_HOST": ""}
    run = subprocess.run([sys.executable, "-m", "taskvec", "main", "--model", str(tiny_folder), "--remote",
                          "--tasks", "antonyms", "--out", str(tiny_folder / "out")],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    assert run.returncode == 2 and "no NDIF API key" in run.stderr and "Traceback" not in run.stderr


def test_transient_failures_are_retried_then_named(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", KEY)
    calls, sleeps = [], []

    def refused():
        calls.append(1)
        raise ConnectionRefusedError(f"[Errno 111] Connection refused (key {KEY})")

    with remote.where(task="antonyms", phase="dev sweep"), pytest.raises(remote.RemoteRunError) as info:
        remote.call(refused, "http://127.0.0.1:9", "gemma-3-270m", sleep=sleeps.append)
    message = str(info.value)
    assert len(calls) == remote.ATTEMPTS and sleeps == [remote.BACKOFF_S, 2 * remote.BACKOFF_S]
    for part in ("http://127.0.0.1:9", "gemma-3-270m", "task antonyms", "phase dev sweep", "after 3 attempts"):
        assert part in message, (part, message)
    assert KEY not in message and "<NDIF_API_KEY>" in message
    assert isinstance(info.value, TaskvecError)  # the CLI prints it as one line


def test_a_server_side_exception_is_not_retried():
    from nnsight.intervention.backends.remote import RemoteError

    calls = []

    def fails():
        calls.append(1)
        raise RemoteError("IndexError: index 99 is out of bounds")

    with pytest.raises(remote.RemoteRunError, match=r"failed \(model m\): RemoteError: IndexError: index 99"):
        remote.call(fails, "http://127.0.0.1:9", "m", sleep=lambda s: None)
    assert len(calls) == 1


def test_local_runs_are_not_wrapped():
    with pytest.raises(ZeroDivisionError):
        remote.call(lambda: 1 / 0, False, "m")


def test_remote_settings_as_users_write_them():
    assert [remote.setting(v) for v in (True, False, None, "true", "True", "yes", "false", "0", "")] == \
        [True, False, False, True, True, True, False, False, False]  # papermill's -p remote true is a string
    assert remote.setting("http://127.0.0.1:8001") == "http://127.0.0.1:8001" and remote.setting("local") == "local"
    with pytest.raises(remote.RemoteSetupError, match="remote must be true, false or an NDIF host URL"):
        remote.setting("ndif.example")


def test_the_ndif_profile_without_a_key_fails_before_any_compute(monkeypatch):
    from nnsight import CONFIG

    from taskvec.publishing import runner

    from taskvec.publishing import sections

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(CONFIG.API, "HOST", remote.PUBLIC_HOST)
    monkeypatch.setattr(sections, "main_results", lambda *a, **k: pytest.fail("computed without a key"))
    with pytest.raises(remote.RemoteSetupError, match=r"no NDIF API key for https://api.ndif.us \(model 'EleutherAI/gpt-j-6b'\)"):
        runner.run("ndif", build=False, log=lambda *_: None)


def test_profile_remote_values_are_checked(tmp_path):
    from taskvec.publishing import runner

    path = tmp_path / "e.yaml"
    path.write_text("profiles:\n  p:\n    models: [gemma-3-270m]\n    remote: ndif.example\n")
    with pytest.raises(runner.ExperimentFileError, match=r"e.yaml: profiles.p.remote must be true, false or an http"):
        runner.load_experiments(path)


class _Job:
    """A submitted request as remote.wait sees it: None until it is done."""

    def __init__(self, polls_until_done):
        self.left, self.job_id, self.status = polls_until_done, "j1", None

    def __call__(self):
        self.left -= 1
        return {"values": [1]} if self.left <= 0 else None


def test_wait_polls_until_done_and_gives_up_at_its_deadline():
    now = [0.0]
    clock, sleep = (lambda: now[0]), (lambda s: now.__setitem__(0, now[0] + s))
    assert remote.wait(_Job(4), timeout=10, poll=1, clock=clock, sleep=sleep) == {"values": [1]}
    assert now[0] == 3  # three polls came back empty, one second apart
    now[0] = 0.0
    with pytest.raises(remote.RequestTimeout, match=r"no result within 5 s \(job j1, last status not yet queued\)"):
        remote.wait(_Job(100), timeout=5, poll=1, clock=clock, sleep=sleep)
    assert now[0] == 5


def test_a_timeout_is_named_and_not_retried(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    tries = []

    def slow():
        tries.append(1)
        raise remote.RequestTimeout("no result within 9 s (job j1, last status QUEUED)")

    with remote.where(task="t1", phase="sweep"), pytest.raises(
            remote.RemoteRunError, match=r"to http://h:1 timed out \(model m, task t1, phase sweep\)"):
        remote.call(slow, "http://h:1", "m", sleep=lambda s: None)
    assert tries == [1]


def test_polling_backs_off_up_to_its_ceiling():
    now, waits = [0.0], []

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    remote.wait(_Job(12), timeout=1000, clock=lambda: now[0], sleep=sleep)
    assert waits[0] == remote.POLL_S and all(b >= a for a, b in zip(waits, waits[1:]))
    assert max(waits) == remote.POLL_MAX_S


class _RegressingJob(_Job):
    """ndif 0.1.2's race: the job finished, but a late status write put it back to PROVISIONING, and every
    poll reads that status and no result, forever."""

    def __init__(self, statuses):
        super().__init__(10 ** 9)
        self.statuses = list(statuses)

    def __call__(self):
        self.status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return None


def test_a_status_that_stops_changing_is_reported_as_stale():
    now = [0.0]
    clock, sleep = (lambda: now[0]), (lambda s: now.__setitem__(0, now[0] + s))
    job = _RegressingJob(["QUEUED", "RUNNING", "COMPLETED", "PROVISIONING"])
    with pytest.raises(remote.StaleStatus, match="job j1 has shown status PROVISIONING for 10 s"):
        remote.wait(job, timeout=1000, poll=1, clock=clock, sleep=sleep, stale=10)
    assert now[0] == 13  # three status changes, then ten seconds of the same one
    # A job that keeps moving is never stale, however long it takes.
    now[0] = 0.0

    class Moving(_Job):
        def __call__(self):
            self.status = "QUEUED" if self.left % 2 else "RUNNING"
            return super().__call__()

    assert remote.wait(Moving(60), timeout=1000, poll=1, clock=clock, sleep=sleep, stale=10) == {"values": [1]}
    assert now[0] == 59


def test_a_stale_request_is_submitted_again_once_and_said(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    now = [0.0]
    clock, sleep = (lambda: now[0]), (lambda s: now.__setitem__(0, now[0] + s))
    submitted = []

    def request(jobs):
        def fn():
            job = jobs[len(submitted)]
            submitted.append(job)
            return remote.wait(job, timeout=100, poll=1, clock=clock, sleep=sleep, stale=10)
        return fn

    with pytest.warns(UserWarning, match=r"has shown status PROVISIONING .* submitted again, once"):
        got = remote.call(request([_RegressingJob(["PROVISIONING"]), _Job(3)]), "http://h:1", "m", sleep=sleep)
    assert got == {"values": [1]} and len(submitted) == 2
    # Stuck again: the second submission waits to its timeout (no third), and the failure says so.
    submitted.clear()
    with pytest.warns(UserWarning), pytest.raises(remote.RemoteRunError, match="timed out"):
        remote.call(request([_RegressingJob(["PROVISIONING"]), _RegressingJob(["PROVISIONING"])]), "http://h:1", "m",
                    sleep=sleep)
    assert len(submitted) == 2


def _gated(repo_id):
    import httpx
    from huggingface_hub.errors import GatedRepoError

    url = f"https://huggingface.co/api/models/{repo_id}/auth-check"
    raise GatedRepoError(f"Access to model {repo_id} is restricted.", response=httpx.Response(
        403, request=httpx.Request("GET", url)))


def test_a_gated_hub_model_is_one_line_before_any_request(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(remote.GatedModelError) as info:
        remote.check_access("meta-llama/Llama-3.1-8B", auth_check=_gated)
    message = str(info.value)
    for part in ("'meta-llama/Llama-3.1-8B' is gated", "no hub token is set", "HF_TOKEN",
                 "https://huggingface.co/meta-llama/Llama-3.1-8B", "even for a remote run"):
        assert part in message, (part, message)
    assert "\n" not in message
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_x")
    with pytest.raises(remote.GatedModelError, match="a token is set .* has not been granted access"):
        remote.check_access("meta-llama/Llama-3.1-8B", auth_check=_gated)


def test_access_checks_only_hub_ids_and_only_a_gated_answer(tmp_path):
    calls = []
    remote.check_access("gemma-3-270m", auth_check=calls.append)  # embedded: nothing asked
    remote.check_access(str(tmp_path), auth_check=calls.append)  # a local folder: nothing asked
    assert calls == []

    def offline(repo_id):
        raise OSError("no network")

    remote.check_access("owner/model", auth_check=offline)  # left to the loader, which names it


def test_the_book_stops_on_a_gated_model_before_any_compute(monkeypatch, tmp_path):
    from taskvec.publishing import runner

    monkeypatch.setattr("huggingface_hub.auth_check", _gated)
    profile = tmp_path / "experiments.yaml"
    profile.write_text("profiles:\n  gated:\n    models: [meta-llama/Llama-3.1-8B]\n    remote: http://127.0.0.1:9\n")
    monkeypatch.setattr("taskvec.publishing.sections.main_results",
                        lambda *a, **k: pytest.fail("computed before the access check"))
    with pytest.raises(remote.GatedModelError, match="is gated on the Hugging Face hub"):
        runner.run("gated", experiments=profile, book_root=tmp_path, build=False, log=lambda *_: None)
