"""The fortunes workloads on the installed Debian packages (CI installs them with apt-get: .ci/run),
the shelves partition, and the config checks of data.source=fortunes."""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import numpy as np
import pydantic
import pytest

from hierfed.data import DataConfig, Example, load_data, partition
from hierfed.errors import HierfedError

ROOT = Path("/usr/share/games/fortunes")
ZH = {"chinese", "song100", "tang300"}


def _raises_one_line(match, fn, *args, **kwargs):
    with pytest.raises(HierfedError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def _english_files() -> dict[str, Path]:
    """Oracle, from the packages' own file lists: what `fortunes` and `fortunes-min` install."""
    return {p.name: p for p in ROOT.iterdir()
            if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8") and p.name not in ZH}


def _texts(path: Path) -> set[str]:
    """Oracle parser: strip escapes by hand, cut on lines equal to '%', collapse whitespace."""
    raw = path.read_text(encoding="utf-8", errors="replace").replace("\r", "")
    raw = re.sub("\x1b\\[[0-9;]*m", "", raw)
    return {" ".join(chunk.split()) for chunk in ("\n" + raw + "\n").split("\n%\n")} - {""}


@pytest.fixture(scope="module")
def category():
    return load_data(DataConfig(source="fortunes", categories=6, shelf=2, eval_samples=120))


def test_the_english_packages_are_installed():
    files = _english_files()
    assert {"cookie", "computers", "fortunes", "riddles"} <= files.keys()  # fortunes + fortunes-min
    assert len(files) >= 30


def test_category_labels_are_the_k_largest_files(category):
    files = _english_files()
    largest = sorted(files, key=lambda n: (-os.path.getsize(files[n]), n))[:6]
    assert category.kind == "classification"
    assert set(category.labels) == set(largest) and list(category.labels) == sorted(largest)
    assert {e.label for e in category.train} == set(range(6)) == {e.label for e in category.eval}


def test_category_records_come_from_their_file_and_are_clean(category):
    texts = {name: _texts(ROOT / name) for name in category.labels}
    for e in category.train[::25] + category.eval:
        name = category.labels[e.label]
        assert e.text in texts[name], (name, e.text)
        assert all(e.text not in t for n, t in texts.items() if n != name)  # no ambiguous label
        assert 0 < len(e.text) <= 400 and "  " not in e.text and "\x1b" not in e.text
    everything = [e.text for e in category.train + category.eval]
    assert len(everything) == len(set(everything))  # duplicates kept once
    # nothing lost but the overlong and the ambiguous: per category, kept <= the oracle's records
    kept = collections.Counter(category.labels[e.label] for e in category.train + category.eval)
    for name in category.labels:
        short = {t for t in texts[name] if len(t) <= 400}
        assert 0.8 * len(short) <= kept[name] <= len(short)


def test_shelves_are_groups_of_categories_and_eval_is_balanced(category):
    assert len(category.groups) == 3
    assert sorted(c for g in category.groups for c in g.split("+")) == list(category.labels)
    for e in category.train + category.eval:
        assert e.group == e.client and category.labels[e.label] in e.group.split("+")
    per_group = collections.Counter(e.group for e in category.eval)
    assert set(per_group.values()) == {40}  # eval_samples // 3 each (every shelf has more than 400)


def test_category_is_deterministic_from_the_seed(category):
    again = load_data(DataConfig(source="fortunes", categories=6, shelf=2, eval_samples=120))
    assert again == category
    other = load_data(DataConfig(source="fortunes", categories=6, shelf=2, eval_samples=120, seed=99))
    assert other.labels == category.labels
    assert {e.text for e in other.eval} != {e.text for e in category.eval}
    assert other.groups != category.groups or other.train != category.train


def test_max_chars_skips_long_records():
    task = load_data(DataConfig(source="fortunes", categories=2, shelf=1, max_chars=80))
    assert max(len(e.text) for e in task.train + task.eval) <= 80
    assert set(task.groups) == set(task.labels)  # shelf=1: a shelf per category


@pytest.mark.parametrize("lang, script", [("de", "äöüß"), ("ru", "абвгдеж"), ("zh", "的一是不了")])
def test_lm_groups_are_languages(lang, script):
    task = load_data(DataConfig(source="fortunes", task="lm", languages=["en", lang], eval_samples=40))
    assert task.kind == "causal_lm" and task.labels is None and task.groups == ("en", lang)
    assert {e.group for e in task.train} == {"en", lang}
    assert collections.Counter(e.group for e in task.eval) == {"en": 20, lang: 20}
    theirs = " ".join(e.text for e in task.train if e.group == lang)
    assert any(ch in theirs for ch in script)
    files = [p for p in (ROOT / lang).iterdir()] if lang != "zh" else [ROOT / n for n in ZH]
    pool = set().union(*(_texts(p) for p in files if p.is_file() and p.suffix not in (".dat", ".u8")))
    assert all(e.text in pool for e in task.eval if e.group == lang)


def test_missing_packages_name_the_apt_get_install(tmp_path):
    _raises_one_line(r"apt-get install fortunes fortunes-min$", load_data,
                     DataConfig(source="fortunes", path=str(tmp_path)))
    _raises_one_line(r"apt-get install fortunes fortunes-min$", load_data,
                     DataConfig(source="fortunes", path=str(tmp_path / "absent")))
    _raises_one_line(r"language 'xx'.*apt-get install fortunes-xx$", load_data,
                     DataConfig(source="fortunes", task="lm", languages=["en", "xx"]))
    _raises_one_line(r"data.categories=500 but .* apt-get install fortunes fortunes-min$", load_data,
                     DataConfig(source="fortunes", categories=500))


@pytest.mark.parametrize("kwargs, match", [
    ({"languages": ["en", "en"]}, "lists a language twice"),
    ({"languages": ["../x"]}, "not a language code"),
    ({"languages": []}, "languages"),
    ({"eval_path": "x"}, "eval_path is not used by data.source=fortunes"),
    ({"categories": 1}, "categories"),
    ({"task": "qa"}, "task"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(pydantic.ValidationError, match=match):
        DataConfig(source="fortunes", **kwargs)


# ---- the shelves partition -------------------------------------------------------------------

def _grouped(groups: str) -> list[Example]:
    return [Example(str(i), group=g, client=g) for i, g in enumerate(groups)]


def test_shelves_deal_whole_groups_when_clients_are_fewer():
    # sorted groups a b c -> clients 0 1 0
    parts = partition(_grouped("cabcab"), 2, "shelves")
    assert [p.tolist() for p in parts] == [[0, 1, 3, 4], [2, 5]]


def test_shelves_split_a_group_over_several_clients():
    examples = _grouped("a" * 10 + "b" * 7)
    parts = partition(examples, 5, "shelves", seed=3)  # clients 0 2 4 share a, clients 1 3 share b
    assert sorted(np.concatenate(parts).tolist()) == list(range(17))
    assert [{examples[i].group for i in p} for p in parts] == [{"a"}, {"b"}, {"a"}, {"b"}, {"a"}]
    assert [len(p) for p in parts] == [4, 4, 3, 3, 3]
    again = partition(examples, 5, "shelves", seed=3)
    assert all((x == y).all() for x, y in zip(parts, again))
    other = partition(examples, 5, "shelves", seed=4)
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(parts, other))


def test_shelves_errors():
    _raises_one_line("needs a group on every example", partition, [Example("a"), Example("b")], 1, "shelves")
    _raises_one_line("group 'b' has 1 examples for 2 clients", partition, _grouped("aaab"), 4, "shelves")
    _raises_one_line("data.partition=shelves splits a group", partition, _grouped("aabb"), 3, "natural")


def test_shelves_on_the_category_task(category):
    parts = partition(category.train, 8, "shelves", seed=1)
    held = [{category.train[i].group for i in p} for p in parts]
    assert all(len(h) == 1 for h in held) and {g for h in held for g in h} == set(category.groups)
    labels = [{category.train[i].label for i in p} for p in parts]
    assert all(len(x) == 2 for x in labels)  # each client holds its shelf's two categories


@pytest.mark.parametrize("sets, expected", [
    (["data.source=fortunes", "data.task=lm", "data.languages=[en,xx]", "model.source=gpt2"],
     ("hierfed: error: data.source=fortunes: no fortune files for language 'xx' in /usr/share/games/fortunes/xx; "
      "install it with: apt-get install fortunes-xx")),
    (["data.source=fortunes", "data.path=/nonexistent-fortunes"],
     "hierfed: error: data.source=fortunes: /nonexistent-fortunes does not exist; install it with: apt-get install fortunes fortunes-min"),
])
def test_hierfed_run_stops_before_launch_naming_the_package(sets, expected):
    from conftest import hierfed

    res = hierfed("run", *[a for s in sets for a in ("--set", s)], timeout=120)
    assert res.returncode == 2 and "launching" not in res.stdout
    assert [line for line in res.stderr.splitlines() if line.strip()] == [expected]
