"""English glue for generated sentences."""

from __future__ import annotations

import re

_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiou])")


def fix_articles(text: str) -> str:
    """Templates say "a {word}"; this turns "a orange" into "an orange"."""
    return _A_BEFORE_VOWEL.sub(r"\1n ", text)


def join_and(items: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def capitalise(text: str) -> str:
    return text[0].upper() + text[1:]
