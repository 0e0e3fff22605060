"""Answer matching: SQuAD-style normalization, exact match, token F1 and whole-token substring match.

Every score is the max over the gold answer and its aliases, so an alias is as good as the gold.

Normalization choices beyond SQuAD's, each because the model and the gold write the same answer
differently:
- NFKC first, so full-width letters and digits ("Ｐａｒｉｓ", "１０００") read as their ASCII forms;
  then casefold rather than lower, so "STRASSE" = "Straße".
- Accents are dropped from Latin letters only ("Zürich" = "Zurich"): models often leave them out.
  Other scripts keep their marks, since there they tell letters apart (Japanese が vs か).
- Numbers: a comma followed by exactly three digits is a thousands separator and is dropped, so
  "1,000" = "1000" ("1,000,000" = "1000000"). A decimal point between digits is kept, so "3.5" does
  not become "35" (which SQuAD's punctuation stripping would do); any other comma between digits is
  a decimal comma ("3,5" = "3.5"). A period is never a thousands separator ("1.000" stays 1.000).
  Digits of any script become ASCII digits ("٣" = "3").
- Dashes become spaces ("Jean-Paul" = "Jean Paul"); other punctuation and symbols are deleted, as in
  SQuAD ("U.S." = "US", "$5" = "5").
- Han and kana characters are separate tokens: those scripts put no spaces between words, so this
  makes token F1 and substring match meaningful there (as MLQA does for Chinese).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

_ARTICLES = frozenset({"a", "an", "the"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_DECIMAL_COMMA = re.compile(r"(?<=\d),(?=\d)")
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff])")


@lru_cache(maxsize=4096)
def _is_latin(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith("LATIN")


def _fold_latin_accents(text: str) -> str:
    out: list[str] = []
    for ch in unicodedata.normalize("NFD", text):
        if unicodedata.combining(ch) and out and _is_latin(out[-1]):
            continue
        out.append(ch)
    return unicodedata.normalize("NFC", "".join(out))


def _is_decimal_point(text: str, i: int) -> bool:
    return text[i] == "." and 0 < i < len(text) - 1 and text[i - 1].isdecimal() and text[i + 1].isdecimal()


def _strip_punctuation(text: str) -> str:
    out: list[str] = []
    for i, ch in enumerate(text):
        category = unicodedata.category(ch)
        if ch.isdecimal():
            out.append(str(unicodedata.decimal(ch)))
        elif category[0] not in "PS" or _is_decimal_point(text, i):
            out.append(ch)
        elif category == "Pd":
            out.append(" ")
    return "".join(out)


def normalize_answer(s: str) -> str:
    """The canonical form answers are compared in (see the module docstring for each choice)."""
    text = _fold_latin_accents(unicodedata.normalize("NFKC", s).casefold())
    text = _DECIMAL_COMMA.sub(".", _THOUSANDS.sub("", text))
    text = _CJK.sub(r" \1 ", _strip_punctuation(text))
    return " ".join(t for t in text.split() if t not in _ARTICLES)


def _best(pred: str, golds: Sequence[str], score) -> float:
    pred_tokens = normalize_answer(pred).split()
    return max((score(pred_tokens, normalize_answer(g).split()) for g in golds), default=0.0)


def _exact(pred: list[str], gold: list[str]) -> float:
    return float(pred == gold)


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)  # an answer that normalizes to nothing only matches nothing
    overlap = sum((Counter(pred) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def _contains(pred: list[str], gold: list[str]) -> float:
    if not gold:
        return float(not pred)  # an empty gold would otherwise be inside every prediction
    n = len(gold)
    return float(any(pred[i : i + n] == gold for i in range(len(pred) - n + 1)))


def exact_match(pred: str, golds: Sequence[str]) -> float:
    return _best(pred, golds, _exact)


def token_f1(pred: str, golds: Sequence[str]) -> float:
    return _best(pred, golds, _f1)


def substring_match(pred: str, golds: Sequence[str]) -> float:
    """1.0 when a gold's tokens appear contiguously in the prediction's, so "paris" is not in "parisian"."""
    return _best(pred, golds, _contains)


def score_answer(pred: str | None, golds: Sequence[str]) -> dict[str, float]:
    if pred is None:  # the policy never answered (or its answer turn was invalid)
        return {"exact_match": 0.0, "f1": 0.0, "substring": 0.0}
    return {
        "exact_match": exact_match(pred, golds),
        "f1": token_f1(pred, golds),
        "substring": substring_match(pred, golds),
    }
