"""The results cache keeps only whole entries: a damaged one is reported with its path and computed again,
never read; two processes computing the same entry at once both succeed and leave one whole entry."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from taskvec.store import DamagedEntryWarning, Store, read_json, write_json
from taskvec.study import ModelRef, Study, cached

ROOT = Path(__file__).resolve().parents[1]


def write_entry(folder: Path) -> None:
    write_json(folder / "meta.json", {"seconds": 1.0})
    (folder / "predictions.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    (folder / "sub").mkdir()
    (folder / "sub" / "vectors.bin").write_bytes(bytes(range(256)) * 4)


def test_an_entry_records_its_key_and_the_checksum_of_each_file(tmp_path):
    store = Store(tmp_path)
    folder = store.save("main", "m", "k" * 40, write_entry)
    done = json.loads((folder / "DONE").read_text())
    assert done["key"] == "k" * 40 and sorted(done["files"]) == ["meta.json", "predictions.jsonl", "sub/vectors.bin"]
    assert store.has("main", "m", "k" * 40)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left


@pytest.mark.parametrize("damage, problem", [
    (lambda f: (f / "predictions.jsonl").write_text('{"a": 1}\n'), "predictions.jsonl is not the file that was written"),
    (lambda f: (f / "predictions.jsonl").write_text('{"a": 9}\n{"a": 2}\n'), "predictions.jsonl is not the file"),
    (lambda f: (f / "sub" / "vectors.bin").unlink(), "sub/vectors.bin is missing"),
    (lambda f: (f / "DONE").write_text(json.dumps({"key": "other", "files": {}})), "names another key"),
])
def test_a_damaged_entry_is_reported_with_its_path_discarded_and_absent(tmp_path, damage, problem):
    store = Store(tmp_path)
    folder = store.save("main", "m", "k" * 40, write_entry)
    damage(folder)
    with pytest.warns(DamagedEntryWarning, match=str(folder).replace(".", r"\.") + r" is damaged \(.*" + problem):
        assert not store.has("main", "m", "k" * 40)
    assert not folder.exists()
    store.save("main", "m", "k" * 40, write_entry)  # and it is written again whole
    assert store.has("main", "m", "k" * 40)


def test_an_entry_written_before_checksums_is_read_as_it_is(tmp_path):
    store = Store(tmp_path)
    folder = store.save("main", "m", "k" * 40, write_entry)
    (folder / "DONE").write_text("k" * 40)  # the marker of earlier versions: the key alone
    assert store.has("main", "m", "k" * 40)


@dataclass
class Numbers:
    values: list

    def save(self, folder: Path) -> None:
        write_json(folder / "values.json", self.values)

    @classmethod
    def load(cls, folder: Path) -> "Numbers":
        return cls(read_json(folder / "values.json"))


def test_a_damaged_entry_is_computed_again_never_read(tmp_path):
    store, calls = Store(tmp_path), []
    study = Study("numbers", Numbers)
    from conftest import tiny_model

    model = tiny_model("gpt2")
    ref = ModelRef(model)

    def compute(model):
        calls.append(model)
        return Numbers([1, 2, 3])

    first = cached(study, ref, "unit", compute, store, part=1)
    folder = store.path("numbers", model.name, first.key)
    (folder / "values.json").write_text("[1, 2")  # truncated
    with pytest.warns(DamagedEntryWarning, match="values.json"):
        again = cached(study, ref, "unit", compute, store, part=1)
    assert (again.result, again.from_cache, len(calls)) == (Numbers([1, 2, 3]), False, 2)  # computed again
    assert cached(study, ref, "unit", compute, store, part=1).from_cache and len(calls) == 2


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from taskvec.store import Store

    def write(folder):
        (folder / "part1").write_text(sys.argv[2] * 1000)
        time.sleep(1.0)  # both writers are inside save() at once
        (folder / "part2").write_text(sys.argv[2])

    Store(sys.argv[1]).save("main", "m", "k" * 40, write)
    print("saved", sys.argv[2])
""")


def test_two_processes_computing_one_entry_both_succeed_and_leave_it_whole(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    runs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), tag], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in "ab"]
    outs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outs]
    store = Store(tmp_path / "cache")
    folder = store.path("main", "m", "k" * 40)
    assert store.has("main", "m", "k" * 40)
    tag = (folder / "part2").read_text()
    assert (folder / "part1").read_text() == tag * 1000  # one writer's entry, whole
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary or discarded folder left
