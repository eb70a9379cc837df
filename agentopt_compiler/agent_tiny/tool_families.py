"""Procedural tool families for agent-tiny's ``new_tool`` episodes: many tools of one shape whose names differ.

everyday.py's 30 hand-made tool concepts each come with a few names; a model trained on them learned those concepts
and, offered a tool it had never seen, reached for a familiar one ("please add 348 and 519" -> ``multiply``, issue 29).
A family is one shape under many names, offered next to its siblings, so the only way to the right call is to match
the request's words against the tool names and parameter names the system prompt shows:

    arithmetic   two numbers in, one out (sum, difference, product, quotient, power, remainder), each operation
                 under several names (``sum_numbers``, ``plus``, ``minus``, ``quotient``, ...), parameters under
                 several pairs of names (a/b, x/y, first/second, ...); the request names the operation in words or
                 as a symbol, and the siblings offered are the other operations.
                 Before: ``add`` and ``multiply`` offered, the model calls ``multiply`` for "add 348 and 519".
                 After (the intent): the tool whose name says sum is called with (348, 519).
    attribute    "the <noun> of <thing>" for 55 nouns over six kinds of thing (``get_mayor(city)``,
                 ``currency_of(country)``, ``lookup_warranty(item)``, ...), offered next to tools of other nouns
                 of the same thing, so the noun in the request picks the tool.
    composed     ``<verb>_<object>`` from 40 verbs and 50 objects (``track_parcel``, ``cancel_booking``,
                 ``count_vowels``, ...: 2000 names, too many to remember), or from made-up words (``blick_tramf``),
                 offered next to tools that share the verb or the object, and asked for with both words in the
                 request: the name is matched word by word.

Arguments are copied from the request: 60% of them are made-up values (open_values.py), so no list can stand in
for copying.

No generated name holds a held-out tool name (everyday.HELDOUT_TOOL_NAMES) as whole words: ``sum_numbers`` is
generated, ``add_numbers`` never is, so the hand-written unseen-tool set stays unseen.
"""

from __future__ import annotations

import random

from .open_values import OPEN_SHARE, open_number, open_value, pseudo_word

# operation -> (names, requests ({0}, {1}: the first and second parameter), result of (x, y))
ARITHMETIC = {
    "sum": (("sum_numbers", "sum_two", "plus", "total_of", "sum", "sum_of"),
            ("{0} plus {1}", "what's {0} + {1}?", "sum of {0} and {1}", "add {0} and {1}", "{0} and {1} together",
             "total of {0} and {1}", "I have {0} and get {1} more, how many is that?", "{0} + {1}",
             "put {0} and {1} together", "what do {0} and {1} make combined"),
            lambda x, y: x + y),
    "difference": (("subtract", "minus", "difference", "sub", "take_away"),
                   ("{0} minus {1}", "{0} - {1}", "subtract {1} from {0}", "take {1} away from {0}",
                    "what's {0} less {1}", "difference between {0} and {1}", "I had {0} and lost {1}, what's left?"),
                   lambda x, y: x - y),
    "product": (("product", "times", "product_of", "mul", "mult"),
                ("{0} times {1}", "{0} * {1}", "{0} x {1}", "product of {0} and {1}", "multiply {0} by {1}",
                 "{0} multiplied by {1}", "what's {0} times {1}?", "{0} rows of {1}, how many in all"),
                lambda x, y: x * y),
    "quotient": (("divide", "quotient", "div", "ratio", "divided_by"),
                 ("{0} divided by {1}", "{0} / {1}", "divide {0} by {1}", "{0} split {1} ways",
                  "what's {0} over {1}", "how many times does {1} go into {0}"),
                 lambda x, y: round(x / y, 4)),
    "power": (("power", "pow", "raise_to", "exponent"),
              ("{0} to the power of {1}", "{0} ** {1}", "{0}^{1}", "raise {0} to the {1}", "{0} to the {1}th power"),
              lambda x, y: x ** y),
    "remainder": (("remainder", "mod", "modulo"),
                  ("{0} mod {1}", "remainder of {0} divided by {1}", "{0} % {1}",
                   "what's left over when {1} divides {0}"),
                  lambda x, y: x % y),
}
# share of composed tools named from made-up verbs and objects (``blick_tramf``) instead of COMPOSED_VERBS/OBJECTS
MADE_UP_SHARE = 0.35
PARAM_PAIRS = (("a", "b"), ("x", "y"), ("first", "second"), ("num1", "num2"), ("left", "right"), ("m", "n"),
               ("value1", "value2"), ("lhs", "rhs"), ("n1", "n2"))

# kind of thing -> (parameter names, values, nouns: (noun, result kind))
ATTRIBUTES = {
    "city": (("city", "name", "place"),
             ("Lisbon", "Osaka", "Denver", "Nairobi", "Lima", "Oslo", "Hanoi", "Perth", "Quebec", "Seville"),
             (("mayor", "person"), ("timezone", "word"), ("elevation", "number"), ("airport", "word"),
              ("founded", "number"), ("zip_code", "number"), ("area_km2", "number"), ("river", "word"),
              ("rainfall", "number"), ("nickname", "word"))),
    "person": (("person", "name", "who"),
               ("Maria", "Tom", "Aisha", "Kenji", "Lucia", "Omar", "Priya", "Sven", "Dana", "Felix"),
               (("email", "word"), ("birthday", "word"), ("manager", "person"), ("office", "word"),
                ("team", "word"), ("job_title", "word"), ("start_date", "word"), ("extension", "number"),
                ("desk", "number"), ("badge_id", "number"))),
    "country": (("country", "name", "nation"),
                ("Peru", "Kenya", "Norway", "Chile", "Ghana", "Nepal", "Portugal", "Iceland", "Laos", "Oman"),
                (("currency", "word"), ("language", "word"), ("anthem", "word"), ("continent", "word"),
                 ("dialing_code", "number"), ("gdp", "number"), ("president", "person"), ("flag_colors", "word"),
                 ("national_dish", "word"), ("area", "number"))),
    "item": (("item", "product", "name"),
             ("kettle", "desk lamp", "bike helmet", "backpack", "toaster", "office chair", "headphones", "blender"),
             (("weight", "number"), ("color", "word"), ("rating", "number"), ("warranty", "word"),
              ("brand", "word"), ("size", "word"), ("material", "word"), ("sku", "number"), ("discount", "number"),
              ("reviews", "number"))),
    "title": (("title", "book", "name"),
              ("Dune", "Emma", "Beloved", "Matilda", "Rebecca", "Persuasion", "Ivanhoe", "Kindred"),
              (("genre", "word"), ("pages", "number"), ("publisher", "word"), ("year_published", "number"),
               ("isbn", "number"), ("sequel", "word"), ("language_of", "word"), ("chapters", "number"))),
    "word": (("word", "term", "text"),
             ("bright", "swift", "calm", "ancient", "brave", "fragile", "humble", "vivid"),
             (("synonym", "word"), ("antonym", "word"), ("rhyme", "word"), ("plural", "word"),
              ("syllables", "number"), ("origin", "word"), ("vowel_count", "number"))),
}
ATTRIBUTE_NAMES = ("get_{n}", "{n}_of", "lookup_{n}", "{n}", "find_{n}", "{k}_{n}", "fetch_{n}")
ATTRIBUTE_ASKS = ("what's the {n} of {0}?", "{n} of {0}", "what is {0}'s {n}", "tell me the {n} for {0}",
                  "look up the {n} of {0}", "{0} {n}?", "find the {n} of {0} please", "do you know the {n} of {0}",
                  "I need the {n} for {0}", "get me {0}'s {n}")
COMPOSED_VERBS = ("count", "reverse", "check", "find", "send", "book", "cancel", "track", "list", "update",
                  "delete", "create", "summarize", "estimate", "measure", "compare", "rate", "validate", "encode",
                  "decode", "format", "sort", "rank", "search", "fetch", "schedule", "compute", "start", "stop",
                  "open", "close", "share", "print", "play", "pause", "archive", "restore", "verify", "renew", "split")
COMPOSED_OBJECTS = ("words", "letters", "order", "flight", "invoice", "ticket", "playlist", "song", "meeting",
                    "password", "file", "photo", "recipe", "budget", "route", "parcel", "score", "balance",
                    "message", "reminder", "alarm", "document", "payment", "account", "review", "booking", "refund",
                    "vowels", "deadline", "timer", "subscription", "coupon", "lesson", "shift", "report", "backup",
                    "server", "sentence", "url", "license", "vote", "poll", "survey", "badge", "locker", "bill",
                    "list", "draft", "queue", "label")
COMPOSED_PARAMS = ("text", "name", "id", "query", "value", "ref", "target", "input", "code", "key")
COMPOSED_VALUES = ("A-1042", "blue sky", "ZX81", "monday plan", "hello world", "x7k2", "Q3 notes", "room 12",
                   "alpha", "order 5521", "the red one", "TK-330", "my notes", "kitchen", "P-77", "orbit")
COMPOSED_ASKS = ("{verb} the {obj} {0}", "can you {verb} {obj} {0}", "please {verb} my {obj}: {0}",
                 "I need to {verb} the {obj} for {0}", "{verb} {obj} {0} please", "{obj} {0} - {verb} it",
                 "could you {verb} the {obj} called {0}?", "{verb} {obj} {0}", "time to {verb} {obj} {0}")
COMPOSED_RESULTS = ("done", "ok", "3", "17", "none found", "true", "false", "queued", "42", "updated")
_WORD_RESULTS = ("north", "blue", "Ana", "level 3", "B-12", "ok", "UTC+1", "green and white", "fiction", "2019-04-02")


def holds_name(name: str, heldout: frozenset[str]) -> bool:
    """Whether ``name`` holds one of ``heldout`` as whole ``_``-separated words (``add_numbers`` holds ``add``,
    ``address`` does not)."""
    words = name.split("_")
    for h in heldout:
        hw = h.split("_")
        if any(words[i:i + len(hw)] == hw for i in range(len(words) - len(hw) + 1)):
            return True
    return False


def _tool(name: str, params: list[tuple[str, str, str]], asks: tuple[str, ...], result, concept) -> dict:
    schema = {"type": "object", "properties": {p: {"type": t} for p, t, _ in params},
              "required": [p for p, _, _ in params]}
    return {"name": name, "description": "", "parameters": schema, "_params": params, "_asks": asks,
            "_result": result, "_concept": concept}


def arithmetic_tool(r: random.Random, op: str | None = None, params: tuple[str, str] | None = None) -> dict:
    op = op or r.choice(sorted(ARITHMETIC))
    names, asks, fn = ARITHMETIC[op]
    p1, p2 = params or r.choice(PARAM_PAIRS)
    jtype = r.choice(("number", "integer"))

    def result(args: dict):
        return fn(*args.values())

    return _tool(r.choice(names), [(p1, jtype, f"arith:{op}:0"), (p2, jtype, f"arith:{op}:1")], asks, result,
                 ("arith", op))


def arithmetic_value(r: random.Random, op: str, position: int) -> int:
    if op == "power":
        return r.randint(2, 12) if position == 0 else r.randint(2, 4)
    if op in ("quotient", "remainder") and position == 1:
        return r.randint(2, 40)
    return open_number(r, decimals=False) if r.random() < OPEN_SHARE else r.randint(2, 999)


def attribute_tool(r: random.Random, kind: str | None = None, avoid_nouns: frozenset[str] = frozenset()) -> dict:
    kind = kind or r.choice(sorted(ATTRIBUTES))
    pnames, _, nouns = ATTRIBUTES[kind]
    noun, result_kind = r.choice([n for n in nouns if n[0] not in avoid_nouns])
    name = r.choice(ATTRIBUTE_NAMES).format(n=noun, k=kind)
    asks = tuple(a.replace("{n}", noun.replace("_", " ")) for a in ATTRIBUTE_ASKS)

    def result(args: dict, _r=random.Random(f"{name}/{noun}")):
        if result_kind == "number":
            return _r.randint(1, 9999)
        if result_kind == "person":
            return _r.choice(ATTRIBUTES["person"][1])
        return _r.choice(_WORD_RESULTS)

    return _tool(name, [(r.choice(pnames), "string", f"attr:{kind}")], asks, result, ("attr", noun))


def composed_tool(r: random.Random, verb: str, obj: str) -> dict:
    param = r.choice(COMPOSED_PARAMS)
    asks = tuple(a.replace("{verb}", verb).replace("{obj}", obj) for a in COMPOSED_ASKS)
    return _tool(f"{verb}_{obj}", [(param, "string", "composed")], asks,
                 lambda args, _r=random.Random(f"{verb}_{obj}"): _r.choice(COMPOSED_RESULTS), ("composed", verb, obj))


def family_value(r: random.Random, vkind: str):
    """A value for a family tool's parameter of value kind ``vkind`` (``arith:<op>:<position>``, ``attr:<kind>`` or
    ``composed``)."""
    family, *rest = vkind.split(":")
    if family == "arith":
        return arithmetic_value(r, rest[0], int(rest[1]))
    kind = "composed" if family == "composed" else rest[0]
    if r.random() < OPEN_SHARE:
        return open_value(r, kind)
    return r.choice(COMPOSED_VALUES) if family == "composed" else r.choice(ATTRIBUTES[kind][1])


def family_tools(r: random.Random, heldout: frozenset[str], siblings: int) -> list[dict]:
    """One family tool (first) and ``siblings`` other tools of its family with other names and concepts."""
    while True:
        pick = r.random()
        if pick < 0.4:  # siblings share the verb or the object
            verbs, objects = COMPOSED_VERBS, COMPOSED_OBJECTS
            if r.random() < MADE_UP_SHARE:  # words no request has used before: only matching them picks the tool
                verbs, objects = tuple(pseudo_word(r) for _ in range(4)), tuple(pseudo_word(r) for _ in range(4))
            verb, obj = r.choice(verbs), r.choice(objects)
            pairs = [(verb, obj)]
            while len(pairs) < 1 + siblings:
                q = (verb, r.choice(objects)) if r.random() < 0.5 else (r.choice(verbs), obj)
                if q not in pairs:
                    pairs.append(q)
            tools = [composed_tool(r, v, o) for v, o in pairs]
        elif pick < 0.7:
            pair = r.choice(PARAM_PAIRS)
            ops = r.sample(sorted(ARITHMETIC), 1 + min(siblings, len(ARITHMETIC) - 1))
            tools = [arithmetic_tool(r, op, pair if r.random() < 0.7 else None) for op in ops]
        else:
            kind = r.choice(sorted(ATTRIBUTES))
            tools, used = [], set()
            for _ in range(1 + siblings):
                t = attribute_tool(r, kind, frozenset(used))
                used.add(t["_concept"][1])
                tools.append(t)
        names = [t["name"] for t in tools]
        if len(set(names)) == len(names) and not any(holds_name(n, heldout) for n in names):
            return tools
