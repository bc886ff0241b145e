"""Task data: every shipped file loads and is sound; bad files fail with the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskvec.tasks import (PAPER_CATEGORIES, Example, Task, TaskFileError, UnknownTaskError, all_tasks, list_tasks,
                           load_task, load_task_file, load_tasks, task_files)

PAPER_TASKS = {
    "algorithmic": {"next_letter", "prev_letter", "list_first", "list_last", "to_upper", "to_lower"},
    "translation": {"fr_en", "es_en", "en_fr", "en_es"},
    "linguistic": {"present_gerund", "present_past", "plural_singular", "antonyms"},
    "knowledge": {"country_capital", "person_language", "location_continent", "location_religion"},
}


def test_the_paper_s_18_tasks_are_shipped():
    tasks = load_tasks()
    assert len(tasks) == 18
    by_category = {c: {t.name for t in tasks if t.category == c} for c in PAPER_CATEGORIES}
    assert by_category == PAPER_TASKS
    for task in tasks:
        assert task.compare == ("prefix" if task.category == "knowledge" else "exact")


@pytest.mark.parametrize("name", sorted(set().union(*PAPER_TASKS.values())))
def test_shipped_task_is_sound(name):
    task = load_task(name)
    inputs = [e.input for e in task.examples]
    assert len(set(inputs)) == len(inputs)
    assert all(e.input not in e.outputs for e in task.examples)
    if task.category in ("translation", "linguistic", "knowledge"):
        assert len(task) >= 100, f"{name}: only {len(task)} examples"


def test_generated_tasks_follow_their_rule():
    assert load_task("next_letter").examples[0] == Example("a", ("b",))
    assert load_task("prev_letter").examples[-1] == Example("z", ("y",))
    assert load_task("to_upper").examples[2] == Example("c", ("C",))
    first, last = load_task("list_first"), load_task("list_last")
    for a, b in zip(first.examples, last.examples):
        items = a.input.split(",")
        assert a.input == b.input and 2 <= len(items) <= 4 and len(set(items)) == len(items)
        assert a.output == items[0] and b.output == items[-1]


def test_scoring_rules():
    exact = Task("t", "linguistic", "d", "exact", (Example("go", ("went",)),) * 1)
    assert exact.is_correct(" went ", exact.examples[0])
    assert not exact.is_correct("wen", exact.examples[0])
    prefix = Task("t", "knowledge", "d", "prefix", (Example("USA", ("Washington",)),))
    assert prefix.is_correct("Wash", prefix.examples[0])
    # Either direction, as the original code: a prediction that runs past the answer counts too.
    assert prefix.is_correct(" Washington,", prefix.examples[0])
    assert not prefix.is_correct("Washingtown", prefix.examples[0])
    assert not exact.is_correct("wenty", exact.examples[0])  # exact tasks stay exact
    assert not prefix.is_correct("Paris", prefix.examples[0])
    assert not prefix.is_correct("  ", prefix.examples[0])
    many = Task("t", "linguistic", "d", "exact", (Example("big", ("small", "little")),))
    assert many.is_correct("little", many.examples[0])


def write(tmp_path: Path, category: str, name: str, data) -> Path:
    path = tmp_path / category / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def good(name="mini", **over):
    data = {"name": name, "category": "linguistic", "description": "d", "compare": "exact",
            "examples": [[f"w{i}", f"v{i}"] for i in range(12)]}
    data.update(over)
    return data


@pytest.mark.parametrize("data, problem", [
    ("{not json", "not valid JSON"),
    ([1, 2], "top level must be a JSON object"),
    ({k: v for k, v in good().items() if k != "compare"}, "missing key(s) compare"),
    (good(compare="fuzzy"), "unknown compare rule 'fuzzy'"),
    (good(category="math"), "unknown category 'math'"),
    (good(category="knowledge"), "but the file is in folder 'linguistic'"),
    (good(name="other"), "does not match the file name"),
    (good(examples=[["a", "b"]] * 12), "repeats examples[0]"),
    (good(examples=[["a", "a"]] + [[f"w{i}", "v"] for i in range(11)]), "is also its own answer"),
    (good(examples=[["a", "b"], ["c"]] + [[f"w{i}", "v"] for i in range(10)]), "examples[1] must be a [input, output] pair"),
    (good(examples=[["a", ""]] + [[f"w{i}", "v"] for i in range(11)]), "output must be a non-empty string"),
    (good(examples=[[" a", "b"]] + [[f"w{i}", "v"] for i in range(11)]), "without surrounding spaces"),
    (good(examples=[["a", "b"]]), "only 1 examples"),
    (good(generator={"rule": "next_letter"}), "exactly one of 'examples'"),
])
def test_malformed_task_file_names_file_and_problem(tmp_path, data, problem):
    path = write(tmp_path, "linguistic", "mini", data)
    with pytest.raises(TaskFileError) as info:
        load_task_file(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_bad_generator_is_reported(tmp_path):
    data = {"name": "lists", "category": "algorithmic", "description": "d", "compare": "exact",
            "generator": {"rule": "list_first", "min_len": 5, "max_len": 2, "pool_size": 10, "seed": 1}}
    with pytest.raises(TaskFileError, match="lists.json: generator 'list_first': bad or missing parameter"):
        load_task_file(write(tmp_path, "algorithmic", "lists", data))
    data["generator"] = {"rule": "shuffle"}
    with pytest.raises(TaskFileError, match="generator.rule must be one of"):
        load_task_file(write(tmp_path, "algorithmic", "lists", data))


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError, match="unknown task 'antonym'.*antonyms"):
        load_task("antonym")
    with pytest.raises(UnknownTaskError, match="'nope'"):
        load_tasks(["antonyms", "nope"])


def test_folder_of_tasks_is_discovered(tmp_path):
    write(tmp_path, "linguistic", "mini", good())
    assert list(task_files(tmp_path)) == ["mini"]
    assert list_tasks(tmp_path) == ["mini"]
    assert len(load_task("mini", tmp_path)) == 12


def test_all_tasks_means_the_paper_s_and_the_sequence_tasks_are_named_explicitly():
    assert all_tasks() == list_tasks() + ["list_reverse", "spell_word"]
    assert [t.name for t in load_tasks()] == list_tasks()
    assert [t.category for t in load_tasks(["spell_word", "list_reverse"])] == ["sequence", "sequence"]


def test_tasks_readme_lists_every_task_with_its_size():
    readme = (Path(__file__).parent.parent / "tasks" / "README.md").read_text()
    for task in load_tasks(all_tasks()):
        row = next((line for line in readme.splitlines() if line.startswith("|") and f"`{task.name}`" in line), None)
        assert row is not None, f"{task.name} missing from tasks/README.md"
        assert f"| {len(task)} |" in row, f"tasks/README.md has a stale size for {task.name}"


def test_tasks_readme_gives_each_tasks_format_and_usable_count_for_gemma():
    """The Method page's table (scripts/tasks_table.py) is current for the embedded default model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tasks_table", Path(__file__).parent.parent / "scripts" / "tasks_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = module.README.read_text()
    for line in module.table(models=("gemma-3-270m",)).splitlines()[2:]:
        task = line.split("|")[2].strip()
        gemma = line.split("|")[-2].strip()
        row = next(r for r in readme.splitlines() if f"| {task} |" in r)
        assert row.split("|")[6].strip() == gemma, f"tasks/README.md is stale for {task}: run scripts/tasks_table.py"
