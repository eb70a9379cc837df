"""Tools that appear in no training episode of agent-tiny: the unseen-tool evaluation set
(data/heldout_unseen_tools.jsonl) calls them, and ``agentopt run --tools agentopt_compiler.agent_tiny.heldout_tools:add``
loads them. ``add`` is the README's example tool. everyday.HELDOUT_TOOL_NAMES keeps these names out of training.
"""

from __future__ import annotations

import datetime


def add(a: int, b: int) -> int:
    return a + b


def multiply(a: float, b: float) -> float:
    return a * b


_RATES = {("USD", "EUR"): 0.92, ("EUR", "USD"): 1.09, ("GBP", "USD"): 1.27, ("USD", "JPY"): 151.3,
          ("EUR", "GBP"): 0.86, ("CHF", "EUR"): 1.04}


def get_exchange_rate(base: str, quote: str) -> float:
    """Units of ``quote`` per unit of ``base``."""
    key = (base.strip().upper(), quote.strip().upper())
    if key not in _RATES:
        raise ValueError(f"no rate for {key[0]}/{key[1]}")
    return _RATES[key]


def word_count(text: str) -> int:
    return len(text.split())


def reverse_text(text: str) -> str:
    return text[::-1]


def days_between(start: str, end: str) -> int:
    """Days from ``start`` to ``end`` (YYYY-MM-DD)."""
    return (datetime.date.fromisoformat(end.strip()) - datetime.date.fromisoformat(start.strip())).days


def bmi(weight_kg: float, height_m: float) -> float:
    return round(weight_kg / height_m ** 2, 1)


_PRICES = {"ACME": 182.4, "GLOBEX": 47.15, "INITECH": 9.8, "UMBRELLA": 311.0, "HOOLI": 1204.5}


def stock_price(ticker: str) -> float:
    return _PRICES[ticker.strip().upper()]


_FLIGHTS = {"BA117": "on time", "LH400": "delayed 40 minutes", "AF22": "boarding", "UA90": "cancelled",
            "QF1": "landed"}


def flight_status(flight: str) -> str:
    return _FLIGHTS[flight.strip().upper().replace(" ", "")]


def shipping_cost(weight_kg: float, country: str) -> float:
    rate = {"germany": 4.5, "japan": 11.0, "brazil": 9.0, "canada": 7.5}.get(country.strip().lower(), 8.0)
    return round(5 + rate * weight_kg, 2)


def password_strength(password: str) -> str:
    kinds = sum(any(f(c) for c in password) for f in (str.islower, str.isupper, str.isdigit,
                                                      lambda c: not c.isalnum()))
    return "strong" if len(password) >= 12 and kinds >= 3 else "medium" if len(password) >= 8 else "weak"


def tip_amount(bill: float, percent: float) -> float:
    return round(bill * percent / 100, 2)


def area_of_circle(radius: float) -> float:
    return round(3.141592653589793 * radius ** 2, 2)


_WORDS = {("cat", "spanish"): "gato", ("dog", "french"): "chien", ("house", "german"): "Haus",
          ("water", "italian"): "acqua", ("bread", "portuguese"): "pão", ("book", "spanish"): "libro",
          ("apple", "french"): "pomme", ("moon", "italian"): "luna"}


def translate_word(word: str, language: str) -> str:
    return _WORDS[(word.strip().lower(), language.strip().lower())]


_POPULATION = {"reykjavik": 139875, "tallinn": 454000, "valletta": 5157, "ljubljana": 295504, "windhoek": 486169}


def population_of(city: str) -> int:
    return _POPULATION[city.strip().lower()]


_AUTHORS = {"dune": "Frank Herbert", "emma": "Jane Austen", "ulysses": "James Joyce", "beloved": "Toni Morrison",
            "dracula": "Bram Stoker", "matilda": "Roald Dahl"}


def book_author(title: str) -> str:
    return _AUTHORS[title.strip().lower()]
