"""Procedural agent episodes for training and evaluating a tiny tool-using model, and the tools they use.

An episode is a chat (``{"role": "system"|"user"|"assistant"|"tool", "content": str}`` messages): the system prompt
lists the tool schemas as JSON, the user asks, the assistant calls tools Hermes/Qwen style
(``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), each result comes back as a ``tool`` message, and a
final assistant message answers. The three tools are real (``calculator``, ``convert_units``, ``memory_lookup``) and are
executed to produce the tool messages, so a runtime can import them and run the same loop (see ``run_tool``).

Design choices for a few-million-parameter model (see the recipe notes): every argument is copyable, i.e. the numbers,
units and memory keys of a call appear verbatim in the request or in an earlier tool result; the tokenizer keeps
digits and spaces as their own tokens; held-out tasks use other seeds *and* other request phrasings than training.

Task kinds: single-tool (``calc``, ``convert``, ``lookup``), chains (``calc>convert``, ``lookup>calc``,
``lookup>convert``, ``lookup>calc>convert``), long-context retrieval (``long_lookup``, ``long_lookup>calc``: the fact,
and sometimes the role -> name binding needed to form the key, sit far back among filler sentences), and error recovery
(``retry``: the tool fails once and the call is repeated; ``bad_key``/``bad_unit``/``bad_expr``: a wrong call gets an
error and is corrected; the wrong call carries no training loss). A chain's first assistant turn states a short plan
before its call (``chain_plan``), so that later calls copy their own operands from nearby.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .tools import (TOOL_CALL_CLOSE, UNIT_NAMES, UNIT_PAIRS, _num_value, _UNIT_ALIASES, calculator,
                          convert_units, fmt_num, format_tool_call, normalize_key, run_tool, system_prompt)

# ----------------------------------------------------------------------------------------------------------------------
# Chat format

# ChatML with Hermes/Qwen-style tool calls, rendered by jinja2 in the runtime (runtime/chat.py). Two ways in, one text:
# * training/eval form: every message has a plain ``content`` string (the system message holds the tool prompt, an
#   assistant call is the ``<tool_call>...</tool_call>`` text) -> exactly ``render_chat`` below;
# * runtime Agent form: ``tools`` (OpenAI-style schemas) and assistant ``tool_calls`` -> the same text, because the
#   template writes the tool prompt of ``system_prompt`` and the calls as ``format_tool_call`` does (with a JSON
#   ``tojson`` that does not escape or sort, as runtime/chat.py installs). A first system message given together
#   with ``tools`` goes before the tool prompt (a form the model never saw in training); later ones are turns of
#   their own, as Qwen's templates show them.
# Newlines never follow a ``%}`` directly, so jinja2's trim_blocks/lstrip_blocks settings do not change the output.
CHAT_TEMPLATE = (
    "{% set nl = '\\n' %}"
    "{% for message in messages %}"
    "{% if loop.first and tools %}"
    "<|im_start|>system{{ nl }}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}{{ nl }}{{ nl }}{% endif %}"
    "You are a helpful assistant with tools. Call one with "
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call>. Tools:'
    "{% for tool in tools %}"
    "{% if tool['function'] is defined %}{% set f = tool['function'] %}{% else %}{% set f = tool %}{% endif %}"
    "{{ nl }}{{ '{' }}\"name\": {{ f['name'] | tojson }}, \"parameters\": {{ '{' }}"
    "{% set params = f['parameters'] if f['parameters'] is mapping else {} %}"
    "{% for k, v in (params['properties'] if params['properties'] is mapping else {}).items() %}"
    "{% if not loop.first %}, {% endif %}{{ k | tojson }}: "
    "{{ (v['type'] if v is mapping and v['type'] is defined else 'any') | tojson }}"
    "{% endfor %}{{ '}}' }}"
    "{% endfor %}"
    "<|im_end|>{{ nl }}"
    "{% endif %}"
    "{% if not (loop.first and message['role'] == 'system' and tools) %}"
    "<|im_start|>{{ message['role'] }}{{ nl }}{{ message['content'] or '' }}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "<tool_call>{{ '{' }}\"name\": {{ fn['name'] | tojson }}, \"arguments\": "
    "{% if fn['arguments'] is string %}{{ fn['arguments'] }}{% else %}{{ fn['arguments'] | tojson }}{% endif %}"
    "{{ '}' }}</tool_call>"
    "{% endfor %}{% endif %}"
    "<|im_end|>{{ nl }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ nl }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")
EOS_TOKEN = "<|im_end|>"
STOP_STRINGS = (TOOL_CALL_CLOSE, EOS_TOKEN)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template in plain Python (same output as jinja2 rendering CHAT_TEMPLATE)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_with_loss_spans(messages: list[dict], no_loss: frozenset[int] | set[int] = frozenset()
                           ) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the character spans that get training loss: each assistant message's content plus its
    ``<|im_end|>`` (what the model generates after ``<|im_start|>assistant\\n``), except messages in ``no_loss``."""
    parts, spans, pos = [], [], 0
    for i, m in enumerate(messages):
        head = f"<|im_start|>{m['role']}\n"
        body = f"{m['content']}<|im_end|>"
        parts += [head, body, "\n"]
        start = pos + len(head)
        if m["role"] == "assistant" and i not in no_loss:
            spans.append((start, start + len(body)))
        pos = start + len(body) + 1
    return "".join(parts), spans


# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary for the generator

NAMES = ("Maria", "Omar", "Lena", "Yuki", "Carlos", "Priya", "Tom", "Aisha", "Ivan", "Sofia", "Kenji", "Nora", "Diego",
         "Fatima", "Liam", "Mei", "Hugo", "Zara", "Pablo", "Anna", "Ravi", "Elena", "Jonas", "Chloe", "Ahmed", "Greta",
         "Felix", "Hana", "Marco", "Olga", "Sam", "Lucia", "Noah", "Ingrid", "Tariq", "Rosa", "Victor", "Amara", "Leo",
         "Maya")
CITIES = ("Lisbon", "Oslo", "Cairo", "Lima", "Osaka", "Denver", "Porto", "Nairobi", "Dublin", "Seoul", "Quito",
          "Madrid", "Austin", "Hanoi", "Zurich", "Perth", "Accra", "Riga", "Tunis", "Bergen")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "teal", "black", "white", "pink", "gray", "brown")
FRUITS = ("mango", "apple", "banana", "cherry", "peach", "plum", "kiwi", "grape", "lemon", "pear", "fig", "melon")
PETS = ("Biscuit", "Luna", "Pepper", "Milo", "Ziggy", "Coco", "Bruno", "Nala", "Otis", "Maple", "Rex", "Juno")
ROLES = ("project lead", "treasurer", "team captain", "landlord", "neighbor", "dentist", "coach", "tutor", "manager",
         "pilot", "chef", "editor")
PLACES = ("library", "station", "market", "harbor", "bakery", "museum", "park", "office", "garage", "school")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# attribute -> (value kind, unit or None); "int" values can feed the calculator
NUM_ATTRS = {"locker code": (1000, 9999), "age": (18, 90), "apartment number": (1, 999), "score": (10, 999),
             "badge number": (100, 9999), "savings": (50, 9000)}
UNIT_ATTRS = {"commute distance": "km", "running distance": "miles", "suitcase weight": "kg", "parcel weight": "lb",
              "garden length": "m", "boat length": "ft", "fish tank volume": "l", "fuel tank size": "gal",
              "room temperature": "C", "oven temperature": "F"}
WORD_ATTRS = {"favorite color": COLORS, "home city": CITIES, "favorite fruit": FRUITS, "cat's name": PETS}
_UNIT_RANGES = {"km": (2, 300), "miles": (2, 200), "kg": (1, 150), "lb": (1, 300), "m": (2, 500), "ft": (3, 900),
                "l": (1, 400), "gal": (1, 90), "C": (-20, 45), "F": (-10, 450)}

# ----------------------------------------------------------------------------------------------------------------------
# Phrasing templates: TRAIN and HELDOUT sets never share a template.

TEMPLATES: dict[str, dict[str, list[str]]] = {
    "calc": {
        "train": ["What is {expr}?", "Compute {expr}.", "Please calculate {expr}.", "Can you work out {expr}?",
                  "Calculate {expr} for me.", "How much is {expr}?", "I need the value of {expr}.",
                  "Evaluate {expr}, please.", "Quick math: {expr}", "What do you get for {expr}?",
                  "Use the calculator on {expr}.", "Find {expr}.",
                  "{expr} = ?", "Work out {expr} and tell me.", "The value of {expr}, please.",
                  "Run {expr} through the calculator.", "Give me the result of {expr}.", "Do the sum {expr}.",
                  # the expression inside a polite frame with a trailing clause: the 2-hour run of commit 2b9e08a
                  # (model card) miscopied the second operand of such held-out requests (the frame's words differ
                  # from the held-out one's)
                  "Work out {expr} for me, thank you.", "Can you do {expr} when you get a chance?",
                  "I'd appreciate the value of {expr}, cheers.", "Sort out {expr} for me if you would.",
                  "Assist me with {expr}, much appreciated."],
        "heldout": ["Could you figure out {expr}?", "What's the result of {expr}?", "Solve {expr}.",
                    "Tell me what {expr} comes to.", "Help me with {expr}, thanks."],
    },
    "convert": {
        "train": ["Convert {v} {fu} to {tu}.", "How many {tu} is {v} {fu}?", "What is {v} {fu} in {tu}?",
                  "Please express {v} {fu} in {tu}.", "I have {v} {fu}. How much is that in {tu}?",
                  "Turn {v} {fu} into {tu}.", "{v} {fu} equals how many {tu}?", "Change {v} {fu} to {tu}, please.",
                  "Give me {v} {fu} in {tu}.",
                  "Express {v} {fu} as {tu}.", "{v} {fu} in {tu}, please.",
                  "How much is {v} {fu} when measured in {tu}?", "Convert {v} {fu} over to {tu}.",
                  "What would {v} {fu} be in {tu}?",
                  # one quantity and no operation, phrased like calc>convert's "how many {tu} are ..." and "come to":
                  # run words2's weights sent such held-out conversions through the calculator first (x8 in 400 tasks)
                  "How many {tu} does {v} {fu} make?", "{v} {fu} comes to how many {tu}?", "In {tu}, what is {v} {fu}?",
                  "How many {tu} fit in {v} {fu}?",
                  # hedged conversions ("about", "approximately"): the same run sent a hedged held-out conversion
                  # through the calculator first
                  "Approximately what is {v} {fu} in {tu}?", "About how much is {v} {fu} in {tu}?",
                  "Give me {v} {fu} in {tu}, approximately.", "Estimate {v} {fu} in {tu}."],
        "heldout": ["What does {v} {fu} come to in {tu}?", "Could you convert {v} {fu} into {tu}?",
                    "I'd like {v} {fu} expressed as {tu}.", "Roughly how many {tu} are {v} {fu}?"],
    },
    "lookup": {
        "train": ["What is {key}?", "Look up {key}.", "Can you check {key} for me?", "Please find {key}.",
                  "Remind me of {key}.", "I forgot {key}. What is it?", "Check memory for {key}.",
                  "What did I say {key} was?",
                  "What was {key} again?", "{key}: what was it?", "Look in memory for {key}.",
                  "I'd like to know {key}.", "Can you recall {key}?", "Get {key} for me.",
                  # twins of lookup>convert phrasings without a target unit: run 4's weights converted looked-up
                  # quantities nobody asked to convert (5 of its 6 failed held-out lookups)
                  "{key}, please.", "Give me {key}.", "Show me {key}.", "How much is {key}?",
                  "What would {key} be?", "Look up {key} and tell me what it is.", "Find {key} and report it.",
                  "Say what {key} is.",
                  # a lookup that names memory and nothing else: run words2's weights planned a second call on such a
                  # held-out request
                  "Retrieve {key} from your memory.", "Pull up {key}.", "Read back {key}.",
                  "Bring up {key} from the notes."],
        "heldout": ["Do you remember {key}?", "Tell me {key}, please.", "I need {key} again.",
                    "Fetch {key} from memory."],
    },
    "calc>convert": {
        "train": ["I walked {a} {fu} and then {b} {fu}. How many {tu} is that in total?",
                  "Add {a} {fu} and {b} {fu} and give the total in {tu}.",
                  "One crate is {a} {fu}. How many {tu} are {b} crates?",
                  "What is {a} {fu} times {b}, in {tu}?",
                  "Take {a} {fu} plus {b} {fu} and convert the sum to {tu}.",
                  "A lap is {a} {fu}. Express {b} laps in {tu}.",
                  "A step is {a} {fu}. What do {b} steps come to in {tu}?",
                  "Sum {a} {fu} and {b} {fu}, then give it in {tu}.",
                  # requests that open with a quantity or name two quantities before the target unit: run 3's
                  # weights converted the first quantity straight away on such phrasings (held-out calc>convert: 0%)
                  "{a} {fu} plus {b} {fu} is how many {tu}?",
                  "Put {a} {fu} together with {b} {fu}. How much is it in {tu}?",
                  "If I have {a} {fu} and add {b} {fu}, how many {tu} do I have?",
                  "Every bag holds {a} {fu}. How much do {b} bags hold in {tu}?",
                  "{b} pieces of {a} {fu} each: how many {tu} is that?",
                  "The total of {a} {fu} and {b} {fu} in {tu}, please.",
                  "{a} {fu} and another {b} {fu}: how many {tu} altogether?",
                  "How many {tu} are {b} times {a} {fu}?",
                  "A trip is {a} {fu}. How many {tu} do {b} trips cover?",
                  "First add {a} {fu} and {b} {fu}, then convert to {tu}.",
                  "I need {a} {fu} times {b} in {tu}.",
                  "Join {a} {fu} and {b} {fu}. What is the sum in {tu}?"],
        "heldout": ["Combine {a} {fu} with {b} {fu}; what is that in {tu}?",
                    "Each box is {a} {fu}. How many {tu} do {b} boxes make?"],
    },
    "lookup>calc": {
        "train": ["What is {key} plus {n}?", "Add {n} to {key}.", "What is {key} times {n}?",
                  "Multiply {key} by {n}.", "What is {key} minus {n}?", "Subtract {n} from {key}.",
                  "Increase {key} by {n}.", "What is {key} multiplied by {n}?", "Decrease {key} by {n}.",
                  "What is {n} more than {key}?", "Compute {key} times {n}.", "What is {n} less than {key}?",
                  "Suppose {key} went up by {n}. What is it now?", "{key} times {n} is what?",
                  "Take {key} and subtract {n}."],
        "heldout": ["If you add {n} to {key}, what do you get?", "What do you get when {key} is multiplied by {n}?",
                    "Take away {n} from {key}. What remains?"],
    },
    "lookup>convert": {
        "train": ["What is {key} in {tu}?", "Convert {key} to {tu}.", "How many {tu} is {key}?",
                  "Express {key} in {tu}, please.",
                  "What would {key} be in {tu}?", "Give me {key} expressed in {tu}.",
                  # run 3's weights answered with the looked-up value and skipped the conversion (missing_call)
                  "Tell me {key} in {tu}.", "{key} in {tu}, please.", "Look up {key} and convert it to {tu}.",
                  "I need {key} as {tu}.", "How much is {key} in {tu}?", "Please change {key} into {tu}.",
                  "Can you show {key} in {tu}?", "Find {key}, then express it in {tu}."],
        "heldout": ["Could you give me {key} in {tu}?", "I want {key} converted into {tu}."],
    },
    "lookup>calc>convert": {
        "train": ["What is {key} times {n}, in {tu}?", "Multiply {key} by {n} and convert it to {tu}.",
                  "What is {key} plus {n}, expressed in {tu}?", "Add {n} to {key} and give the result in {tu}.",
                  "Increase {key} by {n} and express that in {tu}.", "Compute {key} times {n}, then give it in {tu}.",
                  "Look up {key}, multiply it by {n}, then convert to {tu}.", "{key} plus {n}, in {tu}, please.",
                  "What would {key} times {n} be in {tu}?", "Find {key}, add {n}, and express the sum in {tu}.",
                  "Suppose {key} went up by {n}. How much is that in {tu}?",
                  "I need {key} times {n} converted to {tu}."],
        "heldout": ["Take {key}, multiply it by {n}, and tell me that in {tu}.",
                    "If {key} grew by {n}, how much would that be in {tu}?"],
    },
    "fact": {
        "train": ["{key} is {value}.", "Note that {key} is {value}.", "For the record, {key} is {value}.",
                  "Remember: {key} is {value}.", "Just so you know, {key} is {value}.",
                  "Write down that {key} is {value}.", "Noting that {key} is {value}."],
        "heldout": ["Please keep in mind that {key} is {value}.", "FYI, {key} is {value}."],
    },
    "notes_intro": {
        "train": ["Here are some notes.", "Please remember the following.", "Some facts for you.",
                  "Keep these in mind.", "Some things to remember.", "Here is some background.",
                  "Take note of these.", "Facts first."],
        "heldout": ["A few things to store.", "Background information follows."],
    },
    "alias": {
        "train": ["The {role} is {name}.", "Our {role} is {name}.", "{name} serves as our {role}.",
                  "The {role}? That is {name}."],
        "heldout": ["{name} works as the {role}.", "{name} is the {role}."],
    },
}
REQUEST_GROUPS = frozenset({"calc", "convert", "lookup", "calc>convert", "lookup>calc", "lookup>convert",
                            "lookup>calc>convert"})
TRAIN_OPENERS = ("Okay. ", "Hi! ", "Next question: ", "One more thing. ", "Hello again. ", "Quick one: ",
                 "Another task. ", "Thanks for that. ", "New request: ", "Alright. ", "Hey. ", "Please help. ")
TRAIN_CLOSERS = (" Thanks.", " Thank you!", " Use a tool.", " Be exact.", " I need it soon.", " Cheers.",
                 " That is all.")
# lookup>calc ops by template: the phrase decides the operator (train and heldout templates are in the same order).
_LOOKUP_CALC_OPS = {"train": ["+", "+", "*", "*", "-", "-", "+", "*", "-", "+", "*", "-", "+", "*", "-"],
                    "heldout": ["+", "*", "-"]}
_LCC_OPS = {"train": ["*", "*", "+", "+", "+", "*", "*", "+", "*", "+", "+", "*"], "heldout": ["*", "+"]}
_CALC_CONVERT_OPS = {"train": ["+", "+", "*", "*", "+", "*", "*", "+", "+", "+", "+", "*", "*", "+", "+", "*", "*",
                               "+", "*", "+"], "heldout": ["+", "*"]}

FILLER = (
    "{name} went to {city} last {day}.", "The {color} bike was left near the {place}.",
    "It rained for {n} hours in {city}.", "{name} bought {n} {fruit}s at the market.",
    "The {place} opens at {h} o'clock on {day}.", "{name} painted the fence {color}.",
    "There were {n} people at the {place} on {day}.", "{name} likes to read at the {place}.",
    "A {color} kite flew over {city}.", "The bus to {city} was {n} minutes late.",
    "{name} called {name2} on {day}.", "The {place} in {city} is very old.",
    "{name} has never been to {city}.", "On {day}, {name} cooked {fruit} jam.",
)

ANSWERS = {
    "calc": "{expr} = {result}.",
    "convert": "{v} {fu} is {result} {tu}.",
    "lookup": "{key_cap} is {result}.",
    "lookup_unit": "{key_cap} is {result}.",
    "chain": "The answer is {result} {unit}.",
    "chain_nounit": "The answer is {result}.",
}

SINGLE_KINDS = ("calc", "convert", "lookup")
MULTI_KINDS = ("calc>convert", "lookup>calc", "lookup>convert", "lookup>calc>convert")
LONG_KINDS = ("long_lookup", "long_lookup>calc")
RECOVERY_KINDS = ("retry", "bad_key", "bad_unit", "bad_expr")
ALL_KINDS = SINGLE_KINDS + MULTI_KINDS + LONG_KINDS + RECOVERY_KINDS


def category_of(kind: str) -> str:
    if kind.startswith("say_") or kind == "new_tool":
        return "everyday"
    if kind in SINGLE_KINDS:
        return "single"
    if kind in MULTI_KINDS:
        return "multi"
    if kind in LONG_KINDS:
        return "long_context"
    return "recovery"


# ----------------------------------------------------------------------------------------------------------------------
# Tasks and episodes

@dataclass
class Task:
    """One agent task: the prompt conversation, the memory the lookup tool reads, the gold calls and answer.

    ``messages`` ends with the user's request; ``episode`` is the full gold conversation (with tool calls, tool
    results and the final answer) used for training; ``no_loss`` holds indices of episode messages that must not be
    trained on (deliberately wrong calls in error-recovery episodes). ``fail_first`` makes ``run_tool`` answers for the
    first N calls a transient error (the ``retry`` kind)."""

    kind: str
    split: str
    messages: list[dict]
    memory: dict[str, str]
    calls: list[tuple[str, dict]]
    answer: str
    episode: list[dict] = field(default_factory=list)
    no_loss: set[int] = field(default_factory=set)
    fail_first: int = 0

    @property
    def category(self) -> str:
        return category_of(self.kind)

    def check(self, final_text: str) -> bool:
        """True when the final answer states the expected value (numbers compared numerically, 2-decimal tolerance)."""
        return answer_matches(self.answer, final_text)

    def tool(self, name: str, arguments: dict) -> str:
        return run_tool(name, arguments, self.memory)


def answer_matches(expected: str, text: str) -> bool:
    if re.fullmatch(r"-?\d+(\.\d+)?", expected):
        want = float(expected)
        for tok in re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", "")):
            if abs(float(tok) - want) < 0.005 + 1e-9:
                return True
        return False
    return re.search(r"\b" + re.escape(expected.lower()) + r"\b", text.lower()) is not None


TRANSIENT_ERROR = json.dumps({"error": "tool temporarily unavailable, please retry"})


class _Gen:
    def __init__(self, rng: random.Random, split: str):
        self.r, self.split = rng, split

    def tpl(self, group: str) -> tuple[int, str]:
        options = TEMPLATES[group][self.split]
        i = self.r.randrange(len(options))
        if self.split != "train" or group not in REQUEST_GROUPS:
            return i, options[i]
        # Training requests also get an opener, a closer or an unrelated sentence around the phrasing, so the model
        # learns to find the arguments by their content, not by their offset in a few fixed phrasings (the shipped
        # model copied the wrong name on phrasings it had not seen). The held-out split is never wrapped.
        r, t = self.r, options[i]
        if r.random() < 0.35:
            t = r.choice(TRAIN_OPENERS) + t
        if r.random() < 0.25:
            t += r.choice(TRAIN_CLOSERS)
        if r.random() < 0.15:
            t = self.filler(1)[0] + " " + t
        return i, t

    # --- values -------------------------------------------------------------------------------------------------
    def expr(self) -> str:
        r = self.r
        a, b, c = r.randint(2, 999), r.randint(2, 999), r.randint(2, 99)
        small = r.randint(2, 99)
        forms = [f"{a} + {b}", f"{a} - {b}", f"{small} * {b}", f"{a} + {b} + {c}", f"{small} * {c} + {a}",
                 f"({a} + {b}) * {c}", f"{a} - {small} * {c}", f"{a} * {c} - {b}", f"({a} - {b}) * {c}"]
        return r.choice(forms)

    def number_text(self, lo: int, hi: int, decimals: bool = True) -> str:
        v = self.r.randint(lo, hi)
        if decimals and self.r.random() < 0.4:
            frac = self.r.randint(1, 99)
            s = f"{v}.{frac:02d}".rstrip("0")
            return s
        return str(v)

    def unit_text(self, unit: str) -> str:
        # requests mostly use the canonical code (copyable), sometimes the spelled-out name
        return UNIT_NAMES[unit] if self.r.random() < 0.25 else unit

    def pair(self) -> tuple[str, str]:
        a, b = self.r.choice(UNIT_PAIRS)
        return (a, b) if self.r.random() < 0.5 else (b, a)

    def facts(self, k: int, need: list[tuple[str, str, str]] = ()) -> tuple[dict[str, str], list[str]]:
        """Memory with ``need`` facts (key, value) plus distractors; returns (memory, fact sentences shuffled)."""
        memory: dict[str, str] = {}
        for key, value, _ in need:
            memory[key] = value
        tries = 0
        while len(memory) < k + len(need) and tries < 50:
            tries += 1
            key, value, _ = self.random_fact()
            if key not in memory:
                memory[key] = value
        keys = list(memory)
        self.r.shuffle(keys)
        sentences = []
        for key in keys:
            _, t = self.tpl("fact")
            s = t.format(key=key, value=memory[key])
            sentences.append(s[0].upper() + s[1:])
        return memory, sentences

    def random_fact(self, kind: str | None = None, name: str | None = None) -> tuple[str, str, str]:
        """(key, value text, attr kind) with kind in num / unit / word."""
        r = self.r
        kind = kind or r.choice(["num", "unit", "word"])
        name = name or r.choice(NAMES)
        if kind == "num":
            attr = r.choice(list(NUM_ATTRS))
            value = str(r.randint(*NUM_ATTRS[attr]))
        elif kind == "unit":
            attr = r.choice(list(UNIT_ATTRS))
            unit = UNIT_ATTRS[attr]
            value = f"{r.randint(*_UNIT_RANGES[unit])} {unit}"
        else:
            attr = r.choice(list(WORD_ATTRS))
            value = r.choice(WORD_ATTRS[attr])
            # Training: half the word values are made up. With only 12-20 values per attribute the model learned a
            # prior ("cat's name is Biscuit") instead of copying the observation's value ({"value": "Rex"} ->
            # "Biscuit"); a value it cannot guess has to be copied, as digits are. (Held-out values stay real.)
            if self.split == "train" and r.random() < 0.5:
                value = self.made_up_word(capitalized=attr in ("cat's name", "home city"))
        return f"{name}'s {attr}", value, kind

    def made_up_word(self, capitalized: bool) -> str:
        """A pronounceable nonsense word of 2-3 syllables ("kavori", "Tesumo"): about 4.4 million possible."""
        r = self.r
        word = "".join(r.choice(_ONSETS) + r.choice("aeiou") for _ in range(r.randint(2, 3))) + r.choice(_CODAS)
        return word.capitalize() if capitalized else word

    def filler(self, n: int) -> list[str]:
        r = self.r
        out = []
        for _ in range(n):
            name, name2 = r.sample(NAMES, 2)
            out.append(r.choice(FILLER).format(name=name, name2=name2, city=r.choice(CITIES), day=r.choice(DAYS),
                                               color=r.choice(COLORS), place=r.choice(PLACES),
                                               fruit=r.choice(FRUITS), n=r.randint(2, 90), h=r.randint(6, 11)))
        return out


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "sh", "ch")
_CODAS = ("", "", "", "n", "r", "s", "l", "x")
_OTHER_UNIT = dict(UNIT_PAIRS + tuple((b, a) for a, b in UNIT_PAIRS))  # unit -> the one it converts to


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _chain_answer(result: str, unit: str | None) -> str:
    return (ANSWERS["chain"].format(result=result, unit=unit) if unit
            else ANSWERS["chain_nounit"].format(result=result))


def make_task(kind: str, rng: random.Random, split: str = "train") -> Task:
    """Build one task (with its gold episode) of the given kind."""
    g = _Gen(rng, split)
    r = rng
    system = {"role": "system", "content": system_prompt()}
    pre: list[dict] = []  # conversation before the request (memory statements)
    memory: dict[str, str] = {}
    calls: list[tuple[str, dict]] = []
    wrong: list[tuple[int, tuple[str, dict]]] = []  # (before call index, wrong call) for recovery episodes
    fail_first = 0
    base = kind

    if kind == "retry":
        base = r.choice(SINGLE_KINDS)
        fail_first = 1
    elif kind == "bad_key":
        base = "lookup"
    elif kind == "bad_unit":
        base = "convert"
    elif kind == "bad_expr":
        base = "calc"

    def memory_prefix(need, k_distract, long: bool, aliases: list[tuple[str, str]] = ()):
        nonlocal memory
        memory, sentences = g.facts(k_distract, need)
        if long:
            alias_sents = [TEMPLATES["alias"][split][r.randrange(len(TEMPLATES["alias"][split]))].format(
                role=role, name=name) for role, name in aliases]
            alias_sents = [_cap(s) for s in alias_sents]
            fill = g.filler(r.randint(10, 22))
            body = list(sentences)
            for s in body:
                fill.insert(r.randint(0, len(fill)), s)
            text = " ".join(alias_sents + fill)
        else:
            text = " ".join(sentences)
        _, intro = g.tpl("notes_intro")
        pre.append({"role": "user", "content": f"{intro} {text}"})
        pre.append({"role": "assistant", "content": "Noted."})

    def remembered_quantity():
        """A fact with a unit ("Ana's commute distance" = "12 km") put in memory; (key, number, unit, the unit to
        convert it to)."""
        key, value, _ = g.random_fact("unit")
        memory_prefix([(key, value, "")], r.randint(1, 4), long=False)
        num, fu = value.split(" ")
        return key, num, fu, _OTHER_UNIT[fu]

    if base == "calc":
        expr = g.expr()
        if kind == "bad_expr":
            shown = expr.replace("*", "x") if "*" in expr else expr
            _, t = g.tpl("calc")
            request = t.format(expr=shown)
            if shown != expr:
                wrong.append((0, ("calculator", {"expression": shown})))
        else:
            _, t = g.tpl("calc")
            request = t.format(expr=expr)
        calls = [("calculator", {"expression": expr})]
        answer = str(calculator(expr))
        final = ANSWERS["calc"].format(expr=expr, result=answer)
    elif base == "convert":
        fu, tu = g.pair()
        lo, hi = _UNIT_RANGES[fu]
        v = g.number_text(lo, hi)
        _, t = g.tpl("convert")
        request = t.format(v=v, fu=g.unit_text(fu), tu=g.unit_text(tu))
        calls = [("convert_units", {"value": _num_value(v), "from_unit": fu, "to_unit": tu})]
        answer = fmt_num(convert_units(_num_value(v), fu, tu))
        final = ANSWERS["convert"].format(v=v, fu=fu, tu=tu, result=answer)
        if kind == "bad_unit":
            bad = r.choice([fu.upper() + "s", fu + "_unit", fu[:1] + "." + fu[1:], "unit_" + fu])
            if bad.strip().lower() in _UNIT_ALIASES:
                bad = "unit_" + fu
            wrong.append((0, ("convert_units", {"value": _num_value(v), "from_unit": bad, "to_unit": tu})))
    elif base == "lookup":
        # training: half the looked-up facts are quantities (a third before), so "what is X?" after a quantity
        # is answered as is as often as lookup>convert converts one. And about half are words: a word is copied
        # nowhere else (numbers are copied in every chain), and with a third words two 2-hour runs answered held-out
        # lookups right only 58% of the time, all failures a made-up-looking word ("Rex" -> "Ru"). (The held-out
        # stream stays as it was.)
        fact_kind = None
        if split == "train" and kind == "lookup":
            u = r.random()
            fact_kind = "unit" if u < 0.25 else "word" if u < 0.7 else None
        key, value, _ = g.random_fact(fact_kind)
        memory_prefix([(key, value, "")], r.randint(1, 4), long=False)
        _, t = g.tpl("lookup")
        request = t.format(key=key)
        calls = [("memory_lookup", {"key": key})]
        answer = value.split(" ")[0] if re.match(r"-?\d", value) else value
        final = ANSWERS["lookup"].format(key_cap=_cap(key), result=value)
        if kind == "bad_key":
            name, attr = key.split("'s ", 1)
            # malformed keys, and well-formed keys of someone or something not in memory (the error lists the
            # known keys; the fix is read from that list)
            options = [f"{name} {attr}", f"{attr} of {name}", f"{name}'s {attr.split(' ')[-1]}",
                       f"{name.lower()}s {attr}"]
            if split == "train":  # (the held-out split stays as it was first generated)
                other_name = r.choice([n for n in NAMES if n != name])
                other_attr = r.choice([a for a in [*NUM_ATTRS, *UNIT_ATTRS, *WORD_ATTRS] if a != attr])
                options += [f"{other_name}'s {attr}", f"{other_name}'s {attr}", f"{name}'s {other_attr}"]
            bad = r.choice(options)
            if normalize_key(bad) == normalize_key(key) or any(normalize_key(bad) == normalize_key(k)
                                                               for k in memory):
                bad = f"{attr} of {name}"
            wrong.append((0, ("memory_lookup", {"key": bad})))
    elif kind == "calc>convert":
        fu, tu = g.pair()
        while fu in ("C", "F"):  # sums of temperatures make no sense
            fu, tu = g.pair()
        lo, hi = _UNIT_RANGES[fu]
        i, t = g.tpl("calc>convert")
        op = _CALC_CONVERT_OPS[split][i]
        a = r.randint(max(lo, 1), max(hi // 2, 2))
        b = r.randint(2, 40) if op == "*" else r.randint(max(lo, 1), max(hi // 2, 2))
        request = t.format(a=a, b=b, fu=g.unit_text(fu), tu=g.unit_text(tu))
        expr = f"{a} {op} {b}"
        mid = calculator(expr)
        calls = [("calculator", {"expression": expr}), ("convert_units", {"value": mid, "from_unit": fu,
                                                                          "to_unit": tu})]
        answer = fmt_num(convert_units(mid, fu, tu))
        final = _chain_answer(answer, tu)
    elif kind in ("lookup>calc", "long_lookup>calc"):
        key, value, _ = g.random_fact("num")
        long = kind.startswith("long")
        aliases, asked = _aliases(g, key) if long and r.random() < 0.5 else ([], key)
        memory_prefix([(key, value, "")], r.randint(1, 4), long=long, aliases=aliases)
        i, t = g.tpl("lookup>calc")
        op = _LOOKUP_CALC_OPS[split][i]
        n = r.randint(2, 99) if op == "*" else r.randint(2, 999)
        request = t.format(key=asked, n=n)
        expr = f"{value} {op} {n}"
        calls = [("memory_lookup", {"key": key}), ("calculator", {"expression": expr})]
        answer = str(calculator(expr))
        final = _chain_answer(answer, None)
    elif kind == "lookup>convert":
        key, num, fu, tu = remembered_quantity()
        _, t = g.tpl("lookup>convert")
        request = t.format(key=key, tu=g.unit_text(tu))
        calls = [("memory_lookup", {"key": key}), ("convert_units", {"value": int(num), "from_unit": fu,
                                                                     "to_unit": tu})]
        answer = fmt_num(convert_units(int(num), fu, tu))
        final = _chain_answer(answer, tu)
    elif kind == "lookup>calc>convert":
        key, num, fu, tu = remembered_quantity()
        i, t = g.tpl("lookup>calc>convert")
        op = _LCC_OPS[split][i]
        n = r.randint(2, 20) if op == "*" else r.randint(2, 99)
        request = t.format(key=key, n=n, tu=g.unit_text(tu))
        expr = f"{num} {op} {n}"
        mid = calculator(expr)
        calls = [("memory_lookup", {"key": key}), ("calculator", {"expression": expr}),
                 ("convert_units", {"value": mid, "from_unit": fu, "to_unit": tu})]
        answer = fmt_num(convert_units(mid, fu, tu))
        final = _chain_answer(answer, tu)
    elif kind == "long_lookup":
        key, value, _ = g.random_fact()
        aliases, asked = _aliases(g, key) if r.random() < 0.5 else ([], key)
        memory_prefix([(key, value, "")], r.randint(2, 5), long=True, aliases=aliases)
        _, t = g.tpl("lookup")
        request = t.format(key=asked)
        calls = [("memory_lookup", {"key": key})]
        answer = value.split(" ")[0] if re.match(r"-?\d", value) else value
        final = ANSWERS["lookup"].format(key_cap=_cap(key), result=value)
    else:
        raise ValueError(f"unknown task kind {kind!r}; kinds: {', '.join(ALL_KINDS)}")

    messages = [system] + pre + [{"role": "user", "content": request}]
    task = Task(kind, split, messages, memory, calls, answer, fail_first=fail_first)
    plan = chain_plan(calls) if kind in CHAIN_KINDS else ""
    episode = list(messages)
    no_loss: set[int] = set()
    wrong_at = dict(wrong)
    fails = fail_first
    for ci, (name, args) in enumerate(calls):
        if ci in wrong_at:
            wname, wargs = wrong_at[ci]
            no_loss.add(len(episode))
            episode.append({"role": "assistant", "content": format_tool_call(wname, wargs)})
            episode.append({"role": "tool", "content": run_tool(wname, wargs, memory)})
        episode.append({"role": "assistant", "content": (plan if ci == 0 else "") + format_tool_call(name, args)})
        if fails:
            fails -= 1
            episode.append({"role": "tool", "content": TRANSIENT_ERROR})
            episode.append({"role": "assistant", "content": format_tool_call(name, args)})
        result = run_tool(name, args, memory)
        assert "error" not in json.loads(result), (kind, name, args, result)
        episode.append({"role": "tool", "content": result})
    episode.append({"role": "assistant", "content": final})
    task.episode, task.no_loss = episode, no_loss
    return task


CHAIN_KINDS = MULTI_KINDS + ("long_lookup>calc",)


def chain_plan(calls: list[tuple[str, dict]]) -> str:
    """The plan a chain's first assistant turn states before its first call, e.g.
    ``Plan: memory_lookup, then calculator: value * 58.`` for "Ana's age multiplied by 58".

    Why: a later call's own operands (the ``58``, the target unit) come from the request, which the observations of
    the earlier calls push far back; a small model copied them wrongly there ("58" -> "85": lookup>calc solved 6-17%
    after 2 hours of training, every other copy right). Written in the first turn, right after the request, the copy
    is short; the later call then copies from the plan's own ``* 58`` / ``to km``, the same token pattern it writes.
    The value a later call gets from an earlier call's result is ``value`` here."""
    steps = []
    for name, args in calls:
        if name == "calculator" and steps:
            op, n = args["expression"].split(" ")[1:]
            steps.append(f"calculator: value {op} {n}")
        elif name == "convert_units" and steps:
            steps.append(f"convert_units to {args['to_unit']}")
        else:
            steps.append(name)
    return "Plan: " + ", then ".join(steps) + "."


def _aliases(g: _Gen, key: str) -> tuple[list[tuple[str, str]], str]:
    """Role bindings stated at the very start of a long context; the request names the role, not the person."""
    name, attr = key.split("'s ", 1)
    roles = g.r.sample(ROLES, 3)
    others = g.r.sample([n for n in NAMES if n != name], 2)
    bindings = [(roles[0], name), (roles[1], others[0]), (roles[2], others[1])]
    g.r.shuffle(bindings)
    return bindings, f"the {roles[0]}'s {attr}"


DEFAULT_MIX = {"calc": 1.0, "convert": 1.0, "lookup": 1.0, "calc>convert": 0.7, "lookup>calc": 0.7,
               "lookup>convert": 0.7, "lookup>calc>convert": 0.7, "long_lookup": 0.4, "long_lookup>calc": 0.3,
               "retry": 0.2, "bad_key": 0.2, "bad_unit": 0.15, "bad_expr": 0.15}


def _rng(split: str, seed: int, i: int) -> random.Random:
    # string seeds are hashed deterministically (sha512); train and heldout streams never coincide
    return random.Random(f"agent-tasks/{split}/{seed}/{i}")


def generate_tasks(n: int, split: str = "train", seed: int = 0, mix: dict[str, float] | None = None,
                   start: int = 0) -> list[Task]:
    """``n`` seeded tasks; ``split`` "heldout" uses its own seed stream and its own phrasing templates.

    ``mix`` maps kinds to sampling weights (default: all kinds, ``DEFAULT_MIX``); ``start`` offsets the stream so
    consecutive chunks of one run do not repeat."""
    if split not in ("train", "heldout"):
        raise ValueError("split must be 'train' or 'heldout'")
    mix = mix or DEFAULT_MIX
    kinds, weights = list(mix), [mix[k] for k in mix]
    out = []
    for i in range(start, start + n):
        r = _rng(split, seed, i)
        kind = r.choices(kinds, weights)[0]
        if kind.startswith("say_") or kind == "new_tool":  # stage 2's everyday phrasings and generated tools
            if split != "train":
                raise ValueError(f"task kind {kind!r} is for training only; its held-out set is written by hand "
                                 "(agent_tiny/data/)")
            from .everyday import make_everyday_task
            out.append(make_everyday_task(kind, r))
        else:
            out.append(make_task(kind, r, split))
    return out


def episode_text(task: Task) -> tuple[str, list[tuple[int, int]]]:
    return render_with_loss_spans(task.episode, task.no_loss)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer

def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """Byte-level BPE with digits and spaces as their own tokens (digits never merge) and the ChatML/tool specials."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" "), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, special_tokens=list(SPECIAL_TOKENS[:3]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_strip_specials(texts), trainer=trainer)
    # <tool_call> tags are ordinary added tokens (not special) so decoding keeps them, as in Qwen's tokenizer
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in SPECIAL_TOKENS[3:]])
    return tok


def _strip_specials(texts):
    pat = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    for t in texts:
        yield from (p for p in pat.split(t) if p)


def save_tokenizer(tok, folder: Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"chat_template": CHAT_TEMPLATE, "eos_token": EOS_TOKEN, "bos_token": None, "pad_token": "<|endoftext|>",
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024,
              "additional_special_tokens": list(SPECIAL_TOKENS[1:])}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return [folder / "tokenizer.json", folder / "tokenizer_config.json"]


def tokenize_episode(tok, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether it is inside a loss span (by its character offset)."""
    enc = tok.encode(text)
    return enc.ids, _loss_flags(enc.offsets, spans)


def _loss_flags(offsets, spans) -> list[bool]:
    flags, j = [], 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        flags.append(j < len(spans) and spans[j][0] <= start < spans[j][1])
    return flags
