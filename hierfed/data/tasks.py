"""Built-in tasks generated from a seed: `topics` (4-class classification) and `corpus` (causal LM).

Both are deterministic given the task seed, need no files or network, and build in milliseconds.
Train and eval come from separate random streams, so eval_samples does not change the train split.
"""

from __future__ import annotations

import numpy as np

from hierfed.data.schema import DataConfig, Example, TaskData

TOPIC_NAMES = ("sports", "science", "food", "weather")
NUM_AUTHORS = 8  # synthetic "authors" (the natural clients); author a prefers topic a % 4
AUTHOR_BIAS = 2.0  # an author writes its preferred topic 2x as often as each other topic
DISTRACTOR_RATE = 0.15  # sentences that also mention one word from another topic
MIN_WORDS, MAX_WORDS = 8, 14

# Nouns that name exactly one topic. The first noun slot of every sentence draws from these, so
# every sentence has at least one unambiguous word of its own topic and label noise is zero.
_NOUNS = {
    "sports": "match team coach goal referee stadium league tournament striker goalkeeper season "
    "championship marathon racket medal trophy scoreboard umpire defender penalty athlete relay "
    "basketball football tennis hockey volleyball swimmer cyclist",
    "science": "laboratory experiment telescope microscope satellite software computer robot "
    "algorithm battery processor physicist chemist molecule rocket engineer laptop smartphone "
    "circuit vaccine researcher database network sensor microchip spacecraft genome galaxy",
    "food": "recipe kitchen soup bread pasta chef oven garlic cheese dessert salad sauce bakery "
    "pancake omelette flour cinnamon curry lasagna sandwich butter tomato casserole pastry dough "
    "restaurant menu pie muffin",
    "weather": "rain storm forecast thunder snow fog wind temperature humidity drizzle hurricane "
    "blizzard sunshine hail tornado frost heatwave umbrella raincoat lightning breeze rainbow "
    "drought meteorologist flood monsoon thermometer gust",
}
# Words that belong to two topics; they only fill secondary slots, so context decides.
_SHARED = {
    "sports": "field record cup pitch",
    "science": "field record cloud chip pressure",
    "food": "chip cup bowl heat",
    "weather": "cloud pressure heat",
}
_ADJECTIVES = {
    "sports": "competitive athletic undefeated exhausting professional olympic",
    "science": "digital scientific experimental wireless electronic technical",
    "food": "delicious spicy crispy savory homemade tasty",
    "weather": "stormy foggy windy freezing humid rainy sunny",
}
_ACTIVITIES = {  # past-tense verb phrases for the {V} slot
    "sports": ["trained hard", "scored twice", "won easily", "practised all day", "lost narrowly"],
    "science": ["ran the tests", "wrote some code", "measured everything", "fixed the bug",
                "published the results"],
    "food": ["baked all morning", "tasted the stew", "chopped the onions", "stirred the pot",
             "cooked dinner"],
    "weather": ["checked the sky", "stayed dry indoors", "shoveled the driveway",
                "waited out the downpour", "watched the clouds"],
}
_PEOPLE = ["Anna", "my neighbor", "the teacher", "our friend Tom", "my uncle", "Maria",
           "the old man", "a student", "Lucas", "my cousin", "the manager", "Priya"]
_TIMES = ["yesterday", "last night", "this morning", "on Sunday", "last weekend", "after lunch",
          "all week", "again today", "this evening"]
_FILLERS = ["strange", "pleasant", "small", "big", "welcome", "rare", "long", "quiet"]

# {N} unambiguous own-topic noun, {M} any own-topic noun, {A} own-topic adjective,
# {V} own-topic activity, {D} unambiguous noun of another topic, {P} person, {T} time, {F} filler.
_TEMPLATES = [
    "{P} talked about the {N} and the {M} {T}.",
    "{T}, {P} read a long article about the {A} {N}.",
    "Everyone in town was discussing the {N} and the {M} {T}.",
    "{P} thinks the {N} was better than the {M} this year.",
    "We spent the whole afternoon talking about the {A} {N}.",
    "{P} wrote a short note about the {N} near the {M}.",
    "Nobody expected the {N} to change so quickly {T}.",
    "There was a {F} surprise with the {N} during the {M}.",
    "I heard on the radio that the {N} would be {A} {T}.",
    "{P} {V} before the {N} {T}.",
    "The {A} {N} made {P} smile {T}.",
    "My sister keeps asking me questions about the {N} and the {M}.",
    "{P} posted a photo of the {N} with a short caption {T}.",
    "It was a {F} day, and the {N} was all anyone mentioned.",
    "According to {P}, the {M} matters more than the {N}.",
]
# Each has two own-topic slots (N with M, A or V) and one distractor, so a reader still knows the
# topic.
_DISTRACTOR_TEMPLATES = [
    "{P} ignored the {D} and talked about the {N} and the {M} {T}.",
    "Forget the {D}; {P} only cares about the {A} {N}.",
    "Even though {P} loves the {D}, today was about the {N} and the {M}.",
    "{P} {V} near the {N} {T}, so the {D} was forgotten.",
    "Nobody mentioned the {D}, because the {A} {N} was far more interesting.",
]


def _words(spec: dict[str, str]) -> dict[str, list[str]]:
    return {k: v.split() for k, v in spec.items()}


NOUNS, SHARED, ADJECTIVES = _words(_NOUNS), _words(_SHARED), _words(_ADJECTIVES)


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _topic_sentence(rng: np.random.Generator, label: int) -> str:
    topic = TOPIC_NAMES[label]
    distract = rng.random() < DISTRACTOR_RATE
    while True:
        template = _pick(rng, _DISTRACTOR_TEMPLATES if distract else _TEMPLATES)
        other = TOPIC_NAMES[(label + 1 + int(rng.integers(len(TOPIC_NAMES) - 1))) % 4]
        slots = {
            "N": _pick(rng, NOUNS[topic]),
            "M": _pick(rng, NOUNS[topic] + SHARED[topic]),
            "A": _pick(rng, ADJECTIVES[topic]),
            "V": _pick(rng, _ACTIVITIES[topic]),
            "D": _pick(rng, NOUNS[other]),
            "P": _pick(rng, _PEOPLE),
            "T": _pick(rng, _TIMES),
            "F": _pick(rng, _FILLERS),
        }
        if slots["M"] == slots["N"]:
            continue
        text = template.format(**slots)
        text = text[0].upper() + text[1:]
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            return text


def _topic_examples(rng: np.random.Generator, n: int, exclude: set[str]) -> list[Example]:
    labels = rng.permutation(np.arange(n) % len(TOPIC_NAMES))  # balanced to within one
    # P(author | topic): weight AUTHOR_BIAS for the two authors who prefer the topic, 1 otherwise.
    prefers = np.arange(NUM_AUTHORS)[None, :] % len(TOPIC_NAMES) == np.arange(4)[:, None]
    author_p = np.where(prefers, AUTHOR_BIAS, 1.0)
    author_p /= author_p.sum(axis=1, keepdims=True)
    out = []
    for label in labels.tolist():
        text = _topic_sentence(rng, label)
        while text in exclude:  # keep eval sentences unseen in train
            text = _topic_sentence(rng, label)
        exclude.add(text)
        author = int(rng.choice(NUM_AUTHORS, p=author_p[label]))
        out.append(Example(text=text, label=label, client=f"author{author}"))
    return out


def topics(cfg: DataConfig) -> TaskData:
    """4-class topic classification over template sentences; balanced, zero label noise."""
    seen: set[str] = set()
    train = _topic_examples(np.random.default_rng([cfg.seed, 0]), cfg.train_samples, seen)
    eval_ = _topic_examples(np.random.default_rng([cfg.seed, 1]), cfg.eval_samples, seen)
    return TaskData("classification", tuple(train), tuple(eval_), TOPIC_NAMES)


# ---- corpus: short lines with structure a tiny LM can learn ----------------------------------

_NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
            "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
_MONTHS = ("january february march april may june july august september october november "
           "december").split()
_COLORS = "red blue green yellow black white".split()
_DETS = ["the", "a", "my", "our", "that"]
_VERBS = ["liked", "saw", "found", "wanted", "watched", "remembered", "described"]
_WHEN = ["today", "yesterday", "on monday", "in the morning", "at night", "last week"]


def _corpus_line(rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.5:  # a simple sentence whose two nouns share a topic
        topic = _pick(rng, list(TOPIC_NAMES))
        a, b = _pick(rng, NOUNS[topic]), _pick(rng, NOUNS[topic])
        adj = _pick(rng, ADJECTIVES[topic])
        return f"{_pick(rng, _DETS)} {a} {_pick(rng, _VERBS)} the {adj} {b} {_pick(rng, _WHEN)} ."
    if kind < 0.65:  # counting up from a random start
        start, length = int(rng.integers(0, 14)), int(rng.integers(4, 8))
        return " ".join(_NUMBERS[start:start + length])
    if kind < 0.8:  # a repeated colour pattern
        k = int(rng.integers(2, 4))
        cycle = list(rng.choice(_COLORS, size=k, replace=False))
        return " ".join(cycle[i % k] for i in range(int(rng.integers(6, 10))))
    if kind < 0.9:  # addition with number words
        x, y = int(rng.integers(0, 11)), int(rng.integers(0, 11))
        return f"{_NUMBERS[x]} plus {_NUMBERS[y]} is {_NUMBERS[x + y]} ."
    seq = _DAYS if rng.random() < 0.5 else _MONTHS  # consecutive days or months, wrapping
    start, length = int(rng.integers(len(seq))), int(rng.integers(3, 6))
    return " ".join(seq[(start + i) % len(seq)] for i in range(length))


def corpus(cfg: DataConfig) -> TaskData:
    """A causal-LM corpus of short generated lines (sentences, counting, patterns, sums)."""

    def lines(stream: int, n: int) -> tuple[Example, ...]:
        rng = np.random.default_rng([cfg.seed, stream])
        return tuple(Example(text=_corpus_line(rng)) for _ in range(n))

    return TaskData("causal_lm", lines(0, cfg.train_samples), lines(1, cfg.eval_samples), None)
