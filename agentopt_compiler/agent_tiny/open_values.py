"""Open-ended argument values for agent-tiny's generated tools: made-up words, names, codes, dates, numbers of any
length, none of them from a list.

The ``new_tool`` episodes used to draw every argument from short closed lists (ten cities, eight book titles, five
order numbers, integers below 1000). A model can learn such a list instead of copying: offered tools it had never
seen, agent-tiny called ``flight_status("Lisbon")`` for "status of LH400", ``translate_word("Denver")`` for "author of
the book Dracula?" and ``add(1500, 275)`` for "sum up 1500 and 2750" (issue 29). A value drawn here is new in almost
every episode, so the only way to write it into the call is to copy it from the request:

    Before: "where is my order ZX-77?"          -> order_status({"id": "ZX-77"})     (one of 5 order numbers)
    After:  "where is my order QV-30418?"       -> order_status({"id": "QV-30418"})  (letters, digits, separators)
            "translate dreskoo tiv into Plamish" -> translate({"text": "dreskoo tiv", "language": "Plamish"})

The shapes follow what the closed kind held (a capitalised name, a few lower-case words, a code, an e-mail address,
a date, a number), so a request still reads as it did.
"""

from __future__ import annotations

import random
import string

# share of generated-tool arguments drawn here; the rest keep their closed lists (real city names, words, ...)
OPEN_SHARE = 0.6

_ONSETS = ("b", "bl", "br", "ch", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "kl", "l", "m", "n", "p", "pl",
           "pr", "qu", "r", "s", "sh", "sk", "sl", "st", "t", "th", "tr", "v", "w", "y", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "oo", "ou", "ie")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "x", "k", "nd", "st", "sh")

# closed value kinds (everyday._VALUES, tool_families.ATTRIBUTES) -> the shape of an open value standing in for them
_SHAPES = {"city": "name", "person": "name", "country": "name", "restaurant": "name", "title": "name",
           "language": "name", "item": "words", "sku": "words", "dish": "words", "topic": "words",
           "subject": "words", "phrase": "words", "word": "word", "text": "words", "composed": "mixed",
           "order": "code", "currency": "currency", "email": "email", "day": "date", "int": "number"}


def pseudo_word(r: random.Random, syllables: int | None = None) -> str:
    """A pronounceable made-up word of 1-3 syllables (``dreskoo``, ``plam``): wider than tasks.py's
    ``made_up_word`` (consonant clusters, vowel pairs, one syllable), which stays as stage 1's pinned data has it."""
    n = syllables or r.choice((1, 2, 2, 2, 3))
    return "".join(r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS) for _ in range(n))


def _code(r: random.Random) -> str:
    letters = "".join(r.choice(string.ascii_uppercase) for _ in range(r.randint(1, 3)))
    digits = str(r.randint(1, 10 ** r.randint(1, 5) - 1))
    sep = r.choice(("", "", "-", " "))
    code = letters + sep + digits if r.random() < 0.75 else digits + sep + letters
    return code.lower() if r.random() < 0.2 else code


def open_number(r: random.Random, decimals: bool = True) -> int | float:
    """1 to 6 digits, each length equally likely; sometimes with one or two decimals."""
    n = r.randint(1, 10 ** r.randint(1, 6) - 1)
    if decimals and r.random() < 0.2:
        return round(n / 10 ** r.choice((1, 2)), 2)
    return n


def open_value(r: random.Random, kind: str):
    """A fresh value of the shape of the closed value kind ``kind`` (a key of ``_SHAPES``)."""
    shape = _SHAPES[kind]
    if shape == "name":
        words = [pseudo_word(r).capitalize() for _ in range(1 if r.random() < 0.75 else 2)]
        return " ".join(words)
    if shape == "word":
        return pseudo_word(r)
    if shape == "words":
        return " ".join(pseudo_word(r) for _ in range(r.randint(1, 4)))
    if shape == "mixed":  # a composed tool's free text: words, a code, or words and a number
        pick = r.random()
        if pick < 0.4:
            return " ".join(pseudo_word(r) for _ in range(r.randint(1, 3)))
        return _code(r) if pick < 0.75 else f"{pseudo_word(r)} {r.randint(1, 9999)}"
    if shape == "code":
        return _code(r)
    if shape == "currency":
        return "".join(r.choice(string.ascii_uppercase) for _ in range(3))
    if shape == "email":
        return f"{pseudo_word(r)}{r.choice(('', '.', '_'))}{pseudo_word(r, 1)}@{pseudo_word(r)}." \
               f"{r.choice(('com', 'org', 'net', 'io', 'edu'))}"
    if shape == "date":
        return f"{r.randint(1990, 2035)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
    return open_number(r, decimals=False)


def has_open_shape(kind: str) -> bool:
    return kind in _SHAPES
