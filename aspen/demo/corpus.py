"""Procedural simple-English corpus used to pretrain the embedded demo model.

Every sentence is produced by the small grammar below (our own word lists and templates; nothing is copied
from any book or other project). License: the grammar and all text it generates are dedicated to the public
domain under CC0 1.0 (https://creativecommons.org/publicdomain/zero/1.0/).

The corpus has two kinds of documents, separated by a blank line:

* short children's stories ("Once upon a time, there was a little dog named Max. ..."), and
* one-line Q&A / instruction pairs ("Question: what color is the sky?\\nAnswer: the sky is blue."), so that
  adapters can later be fine-tuned for small tasks on top of the demo base.

Output is a pure function of ``seed`` and ``num_sentences``.
"""
from __future__ import annotations

import random

BOYS = ("Tom", "Ben", "Sam", "Max", "Jack", "Leo", "Tim", "Dan")
GIRLS = ("Lily", "Mia", "Anna", "Lucy", "Emma", "Sue", "Kim", "Rose")
ANIMALS = ("dog", "cat", "bird", "rabbit", "frog", "bear", "duck", "fox", "mouse", "horse")
ANIMAL_ADJ = ("little", "old", "big", "small", "happy", "sleepy", "brown", "white", "fluffy", "funny")
COLORS = ("red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "black", "brown")
OBJECTS = ("ball", "kite", "box", "hat", "book", "cup", "boat", "doll", "drum", "car", "toy", "bag")
PLACES = ("the park", "the garden", "the forest", "the beach", "the school", "the farm", "the river",
          "the shop", "the hill", "the lake", "the zoo", "the house")
SPOTS = ("window", "door", "tree", "fire", "fence", "river", "bed", "table")
UNDER = ("bed", "table", "tree", "chair", "bush", "box")
SIGHTS = ("the rain", "the sun", "the stars", "the moon", "the birds", "the clouds", "the snow", "the trees",
          "the sea", "the flowers")
FOODS = ("apple", "cake", "cookie", "sandwich", "banana", "pie", "carrot", "pear")
DRINKS = ("milk", "water", "juice", "tea")
FEELINGS = ("happy", "sad", "tired", "hungry", "scared", "excited", "proud", "sleepy", "glad")
FAMILY = ("mom", "dad", "friend", "sister", "brother", "grandma", "grandpa")
ACTIVITIES = ("run and jump", "sing songs", "read books", "play in the sun", "draw pictures", "swim in the lake",
              "climb trees", "dance", "fly a kite", "help at home")
WEATHER = ("sunny", "rainy", "windy", "cold", "warm", "snowy", "bright")
TOO = ("cold", "dark", "late", "far", "big", "high", "wet")

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
THING_COLORS = (("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("snow", "white"), ("banana", "yellow"),
                ("apple", "red"), ("carrot", "orange"), ("leaf", "green"), ("sea", "blue"), ("milk", "white"),
                ("night", "dark"), ("cloud", "white"), ("frog", "green"), ("strawberry", "red"),
                ("crow", "black"), ("pumpkin", "orange"))
SOUNDS = (("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"), ("pig", "oink"),
          ("bird", "tweet"), ("lion", "roar"), ("horse", "neigh"), ("frog", "ribbit"), ("owl", "hoot"),
          ("mouse", "squeak"))
OPPOSITES = (("big", "small"), ("hot", "cold"), ("up", "down"), ("happy", "sad"), ("fast", "slow"),
             ("day", "night"), ("old", "new"), ("wet", "dry"), ("tall", "short"), ("light", "dark"),
             ("full", "empty"), ("loud", "quiet"), ("in", "out"), ("open", "closed"))
HOMES = (("fish", "in the water"), ("bird", "in a nest"), ("bee", "in a hive"), ("bear", "in a cave"),
         ("rabbit", "in a hole"), ("cow", "on a farm"), ("fox", "in the forest"), ("duck", "on the lake"),
         ("lion", "in the zoo"), ("frog", "in the pond"))
LEGS = (("dog", "four"), ("cat", "four"), ("bird", "two"), ("duck", "two"), ("spider", "eight"),
        ("horse", "four"), ("ant", "six"), ("frog", "four"), ("bee", "six"))
CATEGORIES = (("color", COLORS), ("fruit", ("apple", "banana", "pear", "orange")), ("animal", ANIMALS),
              ("toy", ("ball", "kite", "doll", "drum", "boat")))


class _Char:
    """A story character: how to name it, and its pronouns."""

    def __init__(self, name: str, pron: str, poss: str, obj: str) -> None:
        self.name, self.pron, self.poss, self.obj = name, pron, poss, obj


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _new_char(r: random.Random) -> _Char:
    kind = r.random()
    if kind < 0.35:
        return _Char(r.choice(BOYS), "he", "his", "him")
    if kind < 0.7:
        return _Char(r.choice(GIRLS), "she", "her", "her")
    return _Char(f"the {r.choice(ANIMAL_ADJ)} {r.choice(ANIMALS)}", "it", "its", "it")


def _other_name(r: random.Random, c: _Char) -> str:
    while True:
        n = r.choice(BOYS + GIRLS)
        if n != c.name:
            return n


def _middle(r: random.Random, c: _Char) -> str:
    """One sentence in the body of a story; ``S`` is the character's name or pronoun."""
    s = c.name if r.random() < 0.6 else c.pron
    o = _other_name(r, c)
    t = r.randrange(17)
    if t == 0:
        out = f"{s} took the {r.choice(COLORS)} {r.choice(OBJECTS)} to {r.choice(PLACES)}."
    elif t == 1:
        out = f"{s} sat by the {r.choice(SPOTS)} and looked at {r.choice(SIGHTS)}."
    elif t == 2:
        out = f"{s} went to {r.choice(PLACES)} with {c.poss} {r.choice(FAMILY)}."
    elif t == 3:
        out = f"{s} found {_a(r.choice(COLORS))} {r.choice(OBJECTS)} under the {r.choice(UNDER)}."
    elif t == 4:
        out = f"{s} ate {_a(r.choice(FOODS))} and drank some {r.choice(DRINKS)}."
    elif t == 5:
        out = f"{s} played with the {r.choice(COLORS)} {r.choice(OBJECTS)} all day."
    elif t == 6:
        out = f"{s} wanted to go to {r.choice(PLACES)}, but it was too {r.choice(TOO)}."
    elif t == 7:
        out = f"{s} liked to {r.choice(ACTIVITIES)}."
    elif t == 8:
        out = f"{s} saw {_a(r.choice(ANIMAL_ADJ))} {r.choice(ANIMALS)} near {r.choice(PLACES)}."
    elif t == 9:
        out = f"{c.pron} was very {r.choice(FEELINGS)}."
    elif t == 10:
        out = f"{s} gave the {r.choice(OBJECTS)} to {o}, and {o} said thank you."
    elif t == 11:
        out = f"It was a {r.choice(WEATHER)} day, so {c.name} stayed by the {r.choice(SPOTS)}."
    elif t == 12:
        out = f'"Can I play with your {r.choice(OBJECTS)}?" asked {o}. "Yes, you can," said {c.name}.'
    elif t == 13:
        out = f'"Look at {r.choice(SIGHTS)}!" said {c.name}. "It is so pretty."'
    elif t == 14:
        fam = r.choice(FAMILY)
        out = (f'"Where is my {r.choice(OBJECTS)}?" asked {c.name}. '
               f'"It is in {r.choice(PLACES)}," said {c.poss} {fam}.')
    elif t == 15:
        f = r.choice(FEELINGS)
        out = f'"I am {f}," said {c.name}. "Me too," said {o}.'
    else:
        out = f"{s} jumped, laughed and sang a song about {r.choice(SIGHTS)}."
    return _cap(out)


def _opening(r: random.Random, c: _Char) -> str:
    t = r.randrange(4)
    if t == 0 and c.pron != "it":
        return f"Once upon a time, there was a {r.choice(ANIMAL_ADJ)} {'boy' if c.pron == 'he' else 'girl'} " \
               f"named {c.name}."
    if t == 0 or t == 1:
        if c.pron == "it":
            return f"Once upon a time, there was {_a(c.name[4:])}. It lived near {r.choice(PLACES)}."
        return f"Once upon a time, {c.name} lived in a small house near {r.choice(PLACES)}."
    if t == 2:
        return f"One day, {c.name} went to {r.choice(PLACES)}."
    return _cap(f"{c.name} woke up early. It was a {r.choice(WEATHER)} day.")


def _ending(r: random.Random, c: _Char) -> str:
    t = r.randrange(5)
    if t == 0:
        return f"{_cap(c.pron)} was happy."
    if t == 1:
        return "They played until the sun went down. The end."
    if t == 2:
        return _cap(f"Then {c.name} went home and slept.")
    if t == 3:
        return _cap(f"From that day on, {c.name} and {_other_name(r, c)} were best friends.")
    return f"{_cap(c.pron)} smiled and went home. The end."


def _story(r: random.Random, n_middle: int) -> tuple[str, int]:
    c = _new_char(r)
    parts = [_opening(r, c)] + [_middle(r, c) for _ in range(n_middle)] + [_ending(r, c)]
    return " ".join(parts), len(parts)


def qa_pairs(seed: int = 0) -> list[str]:
    """Every distinct Q&A / instruction pair the grammar knows (a few hundred), in a fixed order."""
    r = random.Random(seed + 1)
    out = [f"Question: what color is the {t}?\nAnswer: the {t} is {c}." for t, c in THING_COLORS]
    out += [f"Question: what does the {a} say?\nAnswer: the {a} says {s}." for a, s in SOUNDS]
    for a in range(1, 10):
        for b in range(1, 11 - a):
            out.append(f"Question: what is {NUMBERS[a]} plus {NUMBERS[b]}?\n"
                       f"Answer: {NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
            out.append(f"Question: what is {NUMBERS[a + b]} minus {NUMBERS[b]}?\n"
                       f"Answer: {NUMBERS[a + b]} minus {NUMBERS[b]} is {NUMBERS[a]}.")
    for x, y in OPPOSITES:
        out.append(f"Question: what is the opposite of {x}?\nAnswer: the opposite of {x} is {y}.")
        out.append(f"Question: what is the opposite of {y}?\nAnswer: the opposite of {y} is {x}.")
    out += [f"Question: where does the {a} live?\nAnswer: the {a} lives {h}." for a, h in HOMES]
    out += [f"Question: how many legs does a {a} have?\nAnswer: a {a} has {n} legs." for a, n in LEGS]
    out += [f"Question: what comes after {NUMBERS[n]}?\nAnswer: after {NUMBERS[n]} comes {NUMBERS[n + 1]}."
            for n in range(1, 10)]
    for name in BOYS + GIRLS:
        out.append(f"Instruction: say hello to {name}.\nResponse: Hello, {name}!")
        out.append(f"Instruction: make this sentence happy: {name} is sad.\nResponse: {name} is happy.")
    for cat, items in CATEGORIES:
        for item in items:
            thing = _cap(item) if cat == "color" else _cap(_a(item))
            out.append(f"Instruction: name {_a(cat)}.\nResponse: {thing} is {_a(cat)}.")
    for n in range(2, 6):
        out.append(f"Instruction: count to {NUMBERS[n]}.\nResponse: {', '.join(NUMBERS[1:n + 1])}.")
    for _ in range(24):
        adj, animal = r.choice(ANIMAL_ADJ), r.choice(ANIMALS)
        c = _Char(f"the {adj} {animal}", "it", "its", "it")
        body = " ".join(_middle(r, c) for _ in range(2))
        out.append(f"Instruction: tell a short story about {_a(adj)} {animal}.\nResponse: {body} "
                   f"{_ending(r, c)}")
    return out


def make_documents(seed: int = 0, num_sentences: int = 8000) -> list[str]:
    """Stories with about ``num_sentences`` sentences in all, mixed with every Q&A pair at least once."""
    r = random.Random(seed)
    docs: list[str] = []
    total = 0
    while total < num_sentences:
        story, n = _story(r, r.randint(2, 5))
        docs.append(story)
        total += n
    qa = qa_pairs(seed)
    extra = [r.choice(qa) for _ in range(num_sentences // 8)]
    for pair in qa + extra:
        docs.insert(r.randrange(len(docs) + 1), pair)
    return docs


def make_corpus(seed: int = 0, num_sentences: int = 8000) -> str:
    """The whole corpus as one string: documents separated by a blank line."""
    return "\n\n".join(make_documents(seed, num_sentences)) + "\n"


def corpus_words(text: str) -> set[str]:
    """Lower-cased words of ``text`` with surrounding punctuation stripped (the corpus vocabulary)."""
    words = (w.strip(".,!?\"':;()").lower() for w in text.split())
    return {w for w in words if w}


if __name__ == "__main__":  # pragma: no cover - manual inspection
    print(make_corpus()[:3000])
