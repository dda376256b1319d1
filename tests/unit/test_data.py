"""hierfed.data: built-in tasks, file sources, partitioners, config validation."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pydantic
import pytest

from hierfed.data import DataConfig, Example, TaskData, label_skew, load_data, partition
from hierfed.data.tasks import NOUNS, TOPIC_NAMES
from hierfed.errors import HierfedError


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _raises_one_line(match, fn, *args, **kwargs):
    with pytest.raises(HierfedError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- config ----------------------------------------------------------------------------------

def test_config_defaults_are_the_topics_task():
    cfg = DataConfig()
    assert (cfg.source, cfg.partition, cfg.path) == ("topics", "iid", None)


@pytest.mark.parametrize("kwargs, match", [
    ({"source": "jsonl"}, "data.path is required"),
    ({"source": "disk"}, "data.path is required"),
    ({"source": "topics", "path": "x.jsonl"}, "data.path is not used"),
    ({"source": "corpus", "eval_path": "x.jsonl"}, "data.eval_path is not used"),
    ({"eval_fraction": 0.0}, "eval_fraction"),
    ({"eval_fraction": 0.6}, "eval_fraction"),
    ({"alpha": 0.0}, "alpha"),
    ({"train_samples": 0}, "train_samples"),
    ({"eval_samples": -1}, "eval_samples"),
    ({"partition": "shards"}, "partition"),
    ({"source": "csv"}, "source"),
    ({"shuffle": True}, "shuffle"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(pydantic.ValidationError, match=match):
        DataConfig(**kwargs)


# ---- built-in tasks --------------------------------------------------------------------------

def test_topics_is_deterministic_and_seeded():
    a, b = load_data(DataConfig()), load_data(DataConfig())
    assert a == b
    c = load_data(DataConfig(seed=99))
    assert c.train != a.train and c.eval != a.eval
    # the eval size does not move the train split
    assert load_data(DataConfig(eval_samples=50)).train == a.train


def test_topics_is_balanced_4_class_with_authors():
    task = load_data(DataConfig(train_samples=802, eval_samples=200))
    assert task.kind == "classification"
    assert task.labels == TOPIC_NAMES and task.num_labels == 4
    assert len(task.train) == 802 and len(task.eval) == 200
    counts = np.bincount([e.label for e in task.train], minlength=4)
    assert counts.max() - counts.min() <= 1
    assert set(np.bincount([e.label for e in task.eval])) == {50}
    assert {e.client for e in task.train} == {f"author{i}" for i in range(8)}
    assert all(8 <= len(e.text.split()) <= 14 for e in task.train + task.eval)
    assert not {e.text for e in task.eval} & {e.text for e in task.train}


def test_topics_has_distractors_from_other_topics():
    task = load_data(DataConfig())
    owner = {w: t for t, words in NOUNS.items() for w in words}
    mixed = [e for e in task.train
             if any(owner.get(w, TOPIC_NAMES[e.label]) != TOPIC_NAMES[e.label]
                    for w in re.findall(r"[a-z]+", e.text.lower()))]
    assert 0.05 < len(mixed) / len(task.train) < 0.3


def test_topics_learnable_by_bag_of_words_centroids():
    """tf-idf nearest centroid: clearly learnable, yet not solved by keyword lookup alone."""
    task = load_data(DataConfig())
    words = lambda s: re.findall(r"[a-z]+", s.lower())  # noqa: E731
    vocab = {w: i for i, w in enumerate(sorted({w for e in task.train for w in words(e.text)}))}

    def counts(examples):
        x = np.zeros((len(examples), len(vocab)))
        for row, e in enumerate(examples):
            for w in words(e.text):
                if w in vocab:
                    x[row, vocab[w]] += 1
        return x

    train = counts(task.train)
    idf = np.log(len(train) / (1 + (train > 0).sum(axis=0)))

    def features(x):
        x = x * idf
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    y = np.array([e.label for e in task.train])
    centroids = np.stack([features(train)[y == k].mean(axis=0) for k in range(4)])
    pred = (features(counts(task.eval)) @ centroids.T).argmax(axis=1)
    acc = float((pred == np.array([e.label for e in task.eval])).mean())
    assert 0.8 <= acc < 1.0


def test_corpus_is_causal_lm_and_deterministic():
    task = load_data(DataConfig(source="corpus", train_samples=300, eval_samples=30))
    assert task.kind == "causal_lm" and task.labels is None and task.num_labels is None
    assert len(task.train) == 300 and len(task.eval) == 30
    assert all(e.label is None and e.text.strip() for e in task.train + task.eval)
    assert task == load_data(DataConfig(source="corpus", train_samples=300, eval_samples=30))
    assert task.train != load_data(DataConfig(source="corpus", train_samples=300, seed=1)).train


# ---- partitioners ----------------------------------------------------------------------------

def _labelled(n, k=4):
    return [Example(f"t{i}", i % k) for i in range(n)]


def _covers(parts, n):
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(n))
    assert all(len(p) > 0 and p.dtype == np.int64 for p in parts)


def test_iid_near_equal_sizes_and_seeded():
    parts = partition(_labelled(103), 10, "iid", seed=3)
    _covers(parts, 103)
    assert sorted(map(len, parts)) == [10] * 7 + [11] * 3
    again = partition(_labelled(103), 10, "iid", seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(_labelled(103), 10, "iid", seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    examples = _labelled(2000)
    skew = {a: np.mean([label_skew(examples, partition(examples, 10, "dirichlet", alpha=a, seed=s))
                        for s in range(3)])
            for a in (100.0, 1.0, 0.1)}
    assert skew[100.0] < 0.1 < skew[1.0] < skew[0.1]
    assert label_skew(examples, partition(examples, 10, "iid", seed=0)) < 0.1


def test_dirichlet_is_deterministic_and_never_leaves_a_client_empty():
    examples = _labelled(200)
    a = partition(examples, 50, "dirichlet", alpha=0.01, seed=5)
    b = partition(examples, 50, "dirichlet", alpha=0.01, seed=5)
    _covers(a, 200)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    _covers(partition(_labelled(8), 8, "dirichlet", alpha=0.001, seed=0), 8)


def test_dirichlet_needs_labels():
    _raises_one_line("needs a label on every example", partition,
                     [Example("a"), Example("b")], 2, "dirichlet")


def test_natural_maps_one_to_one():
    examples = [Example(str(i), client=c) for i, c in enumerate("bacab")]
    assert [p.tolist() for p in partition(examples, 3, "natural")] == [[1, 3], [0, 4], [2]]


def test_natural_assigns_extra_groups_round_robin():
    # sorted groups a b c d e -> clients 0 1 0 1 0
    examples = [Example(str(i), client=c) for i, c in enumerate("edcba")]
    assert [p.tolist() for p in partition(examples, 2, "natural")] == [[0, 2, 4], [1, 3]]


def test_natural_with_too_few_groups_names_both_numbers():
    examples = [Example(str(i), client=c) for i, c in enumerate("abcabc")]
    _raises_one_line(r"^natural partition: the data has 3 clients but the topology has 4$",
                     partition, examples, 4, "natural")
    _raises_one_line("needs a client on every example", partition,
                     [Example("x", client="a"), Example("y")], 1, "natural")


def test_natural_on_topics_authors():
    task = load_data(DataConfig(train_samples=400))
    parts = partition(task.train, 8, "natural")
    _covers(parts, 400)
    assert [{task.train[i].client for i in p} for p in parts] == [{f"author{i}"} for i in range(8)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural"])
def test_more_clients_than_examples_is_an_error(scheme):
    examples = [Example(str(i), i % 2, client=str(i)) for i in range(3)]
    _raises_one_line("3 examples cannot give each of 5 clients", partition, examples, 5, scheme)


def test_bad_partition_arguments():
    _raises_one_line("unknown scheme 'shards'", partition, _labelled(4), 2, "shards")
    _raises_one_line("num_clients must be a positive integer", partition, _labelled(4), 0, "iid")


# ---- jsonl -----------------------------------------------------------------------------------

def test_jsonl_string_labels_map_in_sorted_order(tmp_path):
    rows = [{"text": f"t{i}", "label": lab, "client": i % 3}
            for i, lab in enumerate(["pos", "neg", "neutral"] * 10)]
    task = load_data(DataConfig(source="jsonl", path=_write_jsonl(tmp_path / "d.jsonl", rows)))
    assert task.kind == "classification" and task.labels == ("neg", "neutral", "pos")
    assert len(task.train) == 27 and len(task.eval) == 3
    by_text = {e.text: e for e in task.train + task.eval}
    assert by_text["t0"].label == 2 and by_text["t1"].label == 0 and by_text["t0"].client == "0"


def test_jsonl_int_labels_kept_or_remapped(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(20)]
    task = load_data(DataConfig(source="jsonl", path=_write_jsonl(tmp_path / "a.jsonl", rows)))
    assert task.labels == ("0", "1", "2")
    assert all(e.label == int(e.text[1:]) % 3 for e in task.train + task.eval)
    rows = [{"text": f"t{i}", "label": [5, 10][i % 2]} for i in range(20)]
    task = load_data(DataConfig(source="jsonl", path=_write_jsonl(tmp_path / "b.jsonl", rows)))
    assert task.labels == ("5", "10")
    assert {e.label for e in task.train} == {0, 1}


def test_jsonl_without_labels_is_causal_lm(tmp_path):
    rows = [{"text": f"line {i}", "label": None} if i % 2 else {"text": f"line {i}"}
            for i in range(10)]
    path = _write_jsonl(tmp_path / "lm.jsonl", rows)
    task = load_data(DataConfig(source="jsonl", path=path, eval_fraction=0.2))
    assert task.kind == "causal_lm" and task.labels is None
    assert len(task.eval) == 2
    assert task == load_data(DataConfig(source="jsonl", path=path, eval_fraction=0.2))
    texts = [e.text for e in task.train]
    assert texts == sorted(texts, key=lambda t: int(t.split()[1]))  # file order kept


def test_jsonl_holdout_is_seeded(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": str(i)} for i in range(50)])
    evals = {s: {e.text for e in load_data(DataConfig(source="jsonl", path=path, seed=s)).eval}
             for s in (1, 1, 2)}
    assert len(evals[1]) == 5 and evals[1] != evals[2]


def test_jsonl_custom_fields_and_eval_path(tmp_path):
    train = _write_jsonl(tmp_path / "tr.jsonl", [{"body": "a", "y": "x"}, {"body": "b", "y": "z"}])
    evalp = _write_jsonl(tmp_path / "ev.jsonl", [{"body": "c", "y": "y"}])
    cfg = DataConfig(source="jsonl", path=train, eval_path=evalp, text_field="body",
                     label_field="y")
    task = load_data(cfg)
    assert task.labels == ("x", "y", "z")  # names come from train and eval together
    assert [e.label for e in task.train] == [0, 2] and task.eval == (Example("c", 1),)


@pytest.mark.parametrize("lines, match", [
    (['{"text": "a"}', "", "{not json"], r"line 3 is not valid JSON"),
    (['{"text": "a"}', '{"body": "b"}'], r"line 2 has no 'text' field \(data.text_field\)"),
    (['{"text": 3}'], r"line 1 field 'text' must be a string"),
    (['["a"]'], r"line 1 must be a JSON object"),
    (['{"text": "a", "label": 1}', '{"text": "b"}', '{"text": "c", "label": 0}'],
     r"line 1 has a label but line 2 does not"),
    (['{"text": "a", "label": 1}', '{"text": "b", "label": "x"}'],
     r"labels mix integers \(line 1\) and strings \(line 2\)"),
    (['{"text": "a", "label": 1.5}'], r"line 1 label 1.5 must be an integer or a string"),
    (["", "  "], r"has no records"),
])
def test_jsonl_errors_name_the_line(tmp_path, lines, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    msg = _raises_one_line(match, load_data, DataConfig(source="jsonl", path=path))
    assert msg.startswith(f"data.path={path}: ")


def test_jsonl_errors_in_the_eval_file_say_so(tmp_path):
    train = _write_jsonl(tmp_path / "tr.jsonl", [{"text": "a", "label": "x"}] * 3)
    evalp = _write_jsonl(tmp_path / "ev.jsonl", [{"text": "b", "label": "y"}, {"text": "c"}])
    cfg = DataConfig(source="jsonl", path=train, eval_path=evalp)
    _raises_one_line("line 1 has a label but line 2 of data.eval_path does not", load_data, cfg)
    _write_jsonl(tmp_path / "ev.jsonl", ["{"])
    _raises_one_line(f"^data.eval_path={evalp}: line 1 is not valid JSON", load_data, cfg)


def test_jsonl_missing_file(tmp_path):
    _raises_one_line("no such file", load_data,
                     DataConfig(source="jsonl", path=str(tmp_path / "nope.jsonl")))


def test_jsonl_too_small_to_hold_out(tmp_path):
    path = _write_jsonl(tmp_path / "one.jsonl", [{"text": "a"}])
    _raises_one_line("1 record", load_data, DataConfig(source="jsonl", path=path))


# ---- disk (datasets.save_to_disk) ------------------------------------------------------------

def test_disk_dataset_round_trip(tmp_path):
    import datasets  # in the test extra: a missing install fails, not skips
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(20)],
                                     "label": ["b", "a"] * 10, "client": ["u", "v"] * 10})
    ds.save_to_disk(str(tmp_path / "ds"))
    task = load_data(DataConfig(source="disk", path=str(tmp_path / "ds")))
    assert task.kind == "classification" and task.labels == ("a", "b")
    assert len(task.train) == 18 and len(task.eval) == 2
    assert all(e.label == (int(e.text[1:]) + 1) % 2 for e in [*task.train, *task.eval])
    assert {e.client for e in task.train} == {"u", "v"}


def test_disk_dataset_dict_with_class_labels_and_test_split(tmp_path):
    import datasets  # in the test extra: a missing install fails, not skips
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [1, 1, 1]},
                                            features=features),
        "test": datasets.Dataset.from_dict({"sentence": ["d"], "label": [0]}, features=features),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    task = load_data(DataConfig(source="disk", path=str(tmp_path / "dd"), text_field="sentence"))
    assert task.labels == ("neg", "pos")  # ClassLabel names, even with a class unseen in train
    assert [e.label for e in task.train] == [1, 1, 1] and tuple(task.eval) == (Example("d", 0),)


def test_disk_unlabelled_is_causal_lm(tmp_path):
    import datasets  # in the test extra: a missing install fails, not skips
    datasets.Dataset.from_dict({"text": ["x"] * 10}).save_to_disk(str(tmp_path / "lm"))
    task = load_data(DataConfig(source="disk", path=str(tmp_path / "lm")))
    assert task.kind == "causal_lm" and (len(task.train), len(task.eval)) == (9, 1)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural"])
def test_a_rank_holds_only_its_clients_rows_of_a_dataset_on_disk(tmp_path, scheme):
    """A datasets directory stays memory-mapped: the task holds no text, and a client's shard
    (`take`, as a device builds its clients' data) is a lazy selection of exactly that client's
    rows. Oracle: the same records as JSON Lines, loaded eagerly and partitioned over all of them,
    give the same shards with the same examples."""
    import datasets  # in the test extra: a missing install fails, not skips

    from hierfed.data import take
    from hierfed.data.files import Rows

    n = 120
    cols = {"text": [f"row {i} " + "x" * (i % 9) for i in range(n)], "label": [["b", "a", "c"][i * 7 % 3] for i in range(n)],
            "client": [f"u{i * 5 % 6}" for i in range(n)]}
    datasets.Dataset.from_dict(cols).save_to_disk(str(tmp_path / "ds"))
    path = _write_jsonl(tmp_path / "all.jsonl", [{k: v[i] for k, v in cols.items()} for i in range(n)])
    disk = load_data(DataConfig(source="disk", path=str(tmp_path / "ds"), partition=scheme))
    eager = load_data(DataConfig(source="jsonl", path=path, partition=scheme))
    assert isinstance(disk.train, Rows) and isinstance(disk.eval, Rows)
    assert type(disk.train.ds.data).__name__ == "MemoryMappedTable"  # the texts are on disk, not in the heap
    assert (disk.kind, disk.labels) == (eager.kind, eager.labels) and list(disk.eval) == list(eager.eval)
    ours = partition(disk.train, 6, scheme, alpha=0.5, seed=3)
    oracle = partition(eager.train, 6, scheme, alpha=0.5, seed=3)
    for c in (1, 4):  # a device with clients 1 and 4
        np.testing.assert_array_equal(ours[c], oracle[c])
        mine = take(disk.train, ours[c])
        assert isinstance(mine, Rows) and len(mine.ds) == len(oracle[c])  # only this client's rows
        assert list(mine) == [eager.train[i] for i in oracle[c]]
        assert [mine[j] for j in range(len(mine))] == list(mine) and mine[-1] == list(mine)[-1]


def test_disk_errors(tmp_path):
    import datasets  # in the test extra: a missing install fails, not skips
    _raises_one_line("no such directory", load_data,
                     DataConfig(source="disk", path=str(tmp_path / "missing")))
    (tmp_path / "junk").mkdir()
    _raises_one_line("cannot load with datasets.load_from_disk", load_data,
                     DataConfig(source="disk", path=str(tmp_path / "junk")))
    datasets.Dataset.from_dict({"body": ["x", "y"]}).save_to_disk(str(tmp_path / "ds"))
    _raises_one_line("no column 'text'", load_data,
                     DataConfig(source="disk", path=str(tmp_path / "ds")))


def test_disk_without_datasets_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    _raises_one_line(r"^data.source=disk needs the 'datasets' package: pip install datasets$",
                     load_data, DataConfig(source="disk", path=str(tmp_path)))


def test_taskdata_num_labels():
    assert TaskData("causal_lm", (), (), None).num_labels is None
    assert TaskData("classification", (), (), ("a", "b")).num_labels == 2


def test_a_rank_builds_its_task_once_for_the_same_config():
    """Pre-flight and role ask for the same task: the second call returns the same object (held
    once, not twice); another config builds anew."""
    from hierfed.data import DataConfig, load_data

    a = load_data(DataConfig(source="topics", train_samples=40, eval_samples=8))
    assert load_data(DataConfig(source="topics", train_samples=40, eval_samples=8)) is a
    b = load_data(DataConfig(source="topics", train_samples=41, eval_samples=8))
    assert b is not a and len(b.train) == 41
