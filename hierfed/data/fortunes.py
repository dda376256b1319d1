"""Workloads of real human-written text from Debian's fortune packages, read at run time (nothing
is copied into the repository): `category` classification and multilingual causal LM.

    task = load_data(DataConfig(source="fortunes", task="category", categories=10, shelf=2))

Files: the English packages (`fortunes`, `fortunes-min`) put one file per category in
/usr/share/games/fortunes/; fortunes-zh puts its three files there too (chinese, song100, tang300);
the other languages have a sub-directory each (de/, es/, it/, pl/, ru/, fortunes-<lang>). A record is
the text between lines that are a single `%`.

Cleaning (deterministic, no randomness): ANSI colour escapes and carriage returns are removed,
whitespace runs collapse to one space, empty records and records longer than data.max_chars are
skipped, a text that occurs twice in one category is kept once, and a text found in two categories
is dropped (its label would be ambiguous).

Groups: every example carries the group the per-group evaluation reports it under (Example.group,
also its Example.client, so the `natural` and `shelves` partitions can use it): the category task
deals its K categories (the K largest files) onto shelves of data.shelf categories in a
seeded order, named by their categories (`cookie+science`); the LM task's group is the language.

Split: per group, a seeded eval_fraction of the records is held out; the eval set keeps at most
eval_samples // groups of each group, so every group is evaluated on as many records as it can.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np

from hierfed.data.schema import DataConfig, Example, TaskData
from hierfed.errors import HierfedError

ROOT = Path("/usr/share/games/fortunes")
ZH_FILES = ("chinese", "song100", "tang300")  # fortunes-zh installs into the English directory
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SEP = re.compile(r"^%\s*$", re.MULTILINE)


def package(lang: str) -> str:
    """The Debian package(s) that install a language's fortunes."""
    return "fortunes fortunes-min" if lang == "en" else f"fortunes-{lang}"


def _missing(what: str, lang: str) -> HierfedError:
    return HierfedError(f"data.source=fortunes: {what}; install it with: apt-get install {package(lang)}")


def _is_text(p: Path) -> bool:
    # .dat are strfile indices, .u8 symlinks to the same text; it/'s files are also symlinked
    # from the top directory; es/off holds the offensive set, a sub-directory we do not read.
    return p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8") and not p.name.endswith("-pre")


def language_files(root: Path, lang: str) -> list[Path]:
    """The fortune files of one language, sorted by name; one line naming the package if none."""
    if lang == "en":
        files = [p for p in sorted(root.glob("*")) if _is_text(p) and p.name not in ZH_FILES] if root.is_dir() else []
        where = f"no English fortune files in {root}"
    elif lang == "zh":
        files = [root / n for n in ZH_FILES if _is_text(root / n)]
        where = f"no Chinese fortune files ({', '.join(ZH_FILES)}) in {root}"
    else:
        d = root / lang
        files = [p for p in sorted(d.glob("*")) if _is_text(p)] if d.is_dir() else []
        where = f"no fortune files for language {lang!r} in {d}"
    if not files:
        raise _missing(where, lang)
    return files


def read_records(path: Path, max_chars: int) -> list[str]:
    """The cleaned records of one fortune file, in file order, duplicates kept once."""
    text = path.read_bytes().decode("utf-8", errors="replace").replace("\r", "")
    seen, out = set(), []
    for raw in _SEP.split(_ANSI.sub("", text)):
        rec = " ".join(raw.split())
        if rec and len(rec) <= max_chars and "\ufffd" not in rec and rec not in seen:
            seen.add(rec)
            out.append(rec)
    return out


def _split(groups: dict[str, list[tuple[str, str | None]]], labels: dict[str, int] | None, cfg: DataConfig) -> TaskData:
    """Per group a seeded eval_fraction held out (at most eval_samples // groups kept for eval).

    `groups` maps group name -> [(text, category name)] (LM: category None) in a fixed order."""
    train: list[Example] = []
    held: list[Example] = []
    cap = max(1, cfg.eval_samples // len(groups))
    for gi, (name, items) in enumerate(groups.items()):
        if len(items) < 2:
            raise HierfedError(f"data.source=fortunes: group {name!r} has {len(items)} record(s); "
                               "it needs 2 to hold one out for eval (raise data.max_chars)")
        rng = np.random.default_rng([cfg.seed, gi])
        perm = rng.permutation(len(items))
        n_eval = min(cap, max(1, round(len(items) * cfg.eval_fraction)))
        ev = set(perm[:n_eval].tolist())
        for i, (text, cat) in enumerate(items):
            label = None
            if labels is not None:
                assert cat is not None  # the category task: every record has its category
                label = labels[cat]
            ex = Example(text, label, name, name)
            (held if i in ev else train).append(ex)
    kind: Literal["classification", "causal_lm"] = "causal_lm" if labels is None else "classification"
    names = None if labels is None else tuple(sorted(labels, key=labels.__getitem__))
    return TaskData(kind, tuple(train), tuple(held), names, tuple(groups))


def category_task(cfg: DataConfig, root: Path) -> TaskData:
    """The K largest English category files (bytes; ties by name); label = category (ids in name
    order); group = its shelf of data.shelf categories."""
    files = language_files(root, "en")
    if len(files) < cfg.categories:
        raise _missing(f"data.categories={cfg.categories} but {root} has {len(files)} English categories", "en")
    chosen = sorted(p.name for p in sorted(files, key=lambda p: (-p.stat().st_size, p.name))[: cfg.categories])
    records = {p.name: read_records(p, cfg.max_chars) for p in files}
    owners: dict[str, int] = {}
    for recs in records.values():  # over every English file: a text filed twice has no one label
        for r in recs:
            owners[r] = owners.get(r, 0) + 1
    labels = {c: i for i, c in enumerate(chosen)}
    order = [chosen[i] for i in np.random.default_rng([cfg.seed, 1 << 20]).permutation(len(chosen))]
    shelves: dict[str, list[tuple[str, str | None]]] = {}
    for s in range(0, len(order), cfg.shelf):
        cats = sorted(order[s: s + cfg.shelf])
        shelves["+".join(cats)] = [(r, c) for c in cats for r in records[c] if owners[r] == 1]
    return _split(shelves, labels, cfg)


def lm_task(cfg: DataConfig, root: Path) -> TaskData:
    """Causal LM over the records of data.languages (all of each language's files); group = language."""
    langs: dict[str, list[tuple[str, str | None]]] = {}
    for lang in cfg.languages:
        recs: list[tuple[str, str | None]] = []
        seen: set[str] = set()
        for p in language_files(root, lang):
            for r in read_records(p, cfg.max_chars):
                if r not in seen:
                    seen.add(r)
                    recs.append((r, None))
        langs[lang] = recs
    return _split(langs, None, cfg)


def fortunes(cfg: DataConfig) -> TaskData:
    """The task named by cfg.task, read from cfg.path (default /usr/share/games/fortunes)."""
    root = Path(cfg.path).expanduser() if cfg.path else ROOT
    if not root.is_dir():
        raise _missing(f"{root} does not exist", cfg.languages[0] if cfg.task == "lm" else "en")
    return category_task(cfg, root) if cfg.task == "category" else lm_task(cfg, root)
