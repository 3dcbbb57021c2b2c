"""Look-alike (confusable) and invisible characters, after Unicode UTS #39.

A small, dependency-free take on the UTS #39 *skeleton*: each character is
folded by NFKC (fullwidth and mathematical letters, ligatures) and then by a
table of the common cross-script homoglyphs of ASCII letters and digits
(Cyrillic, Greek, Armenian, Cherokee and Latin look-alikes such as the dotless
i, U+0131). Two strings with the same skeleton look the same to a reader; a string
whose skeleton differs from itself contains a look-alike. Invisible characters
(format controls such as zero-width spaces and bidi overrides) are reported as
such, and a string that mixes letters of several scripts is flagged as a whole.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

__all__ = ["Finding", "describe", "findings", "scripts", "skeleton"]

# Cross-script homoglyphs of ASCII letters and digits (after Unicode confusables.txt).
_TABLE: dict[str, str] = {}
for _ascii, _lookalikes in {
    "a": "\u0430\u0251\u03b1\u237a",
    "b": "\u042c\u13cf",
    "c": "\u0441\u03f2\u217d\u1d04",
    "d": "\u0501\u217e",
    "e": "\u0435\u04bd\u212e\u1971",
    "g": "\u0261\u0581",
    "h": "\u04bb\u0570",
    "i": "\u0456\u0131\u03b9\u04cf\u2170\u0269",
    "j": "\u0458\u03f3",
    "k": "\u03ba",
    "l": "\u217c\u04c0\u01c0",
    "m": "\u217f",
    "n": "\u0578\u057c",
    "o": "\u043e\u03bf\u0585\u03c3\u1d0f",
    "p": "\u0440\u03c1",
    "q": "\u051b\u0566",
    "r": "\u0433\u1d26",
    "s": "\u0455\ua731",
    "u": "\u057d\u03c5",
    "v": "\u03bd\u0475\u1d20\u2174",
    "w": "\u051d\u0461\u1d21",
    "x": "\u0445\u03c7\u2179",
    "y": "\u0443\u04af\u03b3",
    "z": "\u1d22",
    "A": "\u0410\u0391\u13aa",
    "B": "\u0412\u0392\u13f4",
    "C": "\u0421\u03f9\u13df\u216d",
    "D": "\u13a0\u216e",
    "E": "\u0415\u0395\u13ac",
    "H": "\u041d\u0397\u13bb",
    "I": "\u0406\u0399\u04c0\u2160",
    "J": "\u0408\u13ab",
    "K": "\u041a\u039a\u13e6",
    "M": "\u041c\u039c\u13b7\u216f",
    "N": "\u039d",
    "O": "\u041e\u039f\u0555",
    "P": "\u0420\u03a1\u13e2",
    "S": "\u0405\u13da",
    "T": "\u0422\u03a4\u13a2",
    "V": "\u13d9\u2164",
    "X": "\u0425\u03a7\u2169",
    "Y": "\u04ae\u03a5",
    "Z": "\u0396\u13c3",
    "3": "\u0417\u0292",
}.items():
    for _char in _lookalikes:
        if not _char.isascii():
            _TABLE[_char] = _ascii


@dataclass(frozen=True)
class Finding:
    """One suspicious character: where, which, and what it looks like (or why it matters)."""

    index: int
    char: str
    looks_like: str | None

    def __str__(self) -> str:
        what = f"U+{ord(self.char):04X} {unicodedata.name(self.char, 'UNNAMED')}"
        if self.looks_like is None:
            return f"invisible {what} at character {self.index + 1}"
        return f"{what} at character {self.index + 1}, which looks like '{self.looks_like}'"


def _fold(char: str) -> str:
    folded = unicodedata.normalize("NFKC", char)
    return "".join(_TABLE.get(c, c) for c in folded)


def skeleton(text: str) -> str:
    """``text`` with each look-alike replaced by the ASCII character it imitates."""
    return "".join(_fold(c) for c in unicodedata.normalize("NFD", text) if not _invisible(c))


def _invisible(char: str) -> bool:
    return unicodedata.category(char) in ("Cf", "Cc", "Co", "Cn", "Zl", "Zp") or (
        unicodedata.category(char) == "Zs" and char != " "
    )


def findings(text: str) -> list[Finding]:
    """Every non-ASCII character of ``text`` that imitates ASCII or is invisible."""
    out: list[Finding] = []
    for i, char in enumerate(text):
        if char.isascii():
            continue
        if _invisible(char):
            out.append(Finding(i, char, None))
            continue
        folded = _fold(char)
        if folded != char and folded.isascii() and folded.strip():
            out.append(Finding(i, char, folded))
    return out


def scripts(text: str) -> set[str]:
    """The scripts of the letters in ``text``, by the first word of their Unicode names."""
    out: set[str] = set()
    for char in text:
        if char.isalpha():
            out.add(unicodedata.name(char, "UNKNOWN").split(" ", 1)[0])
    return out


def describe(text: str) -> str | None:
    """Why ``text`` could deceive a reader, or None: look-alikes, invisibles, mixed scripts."""
    found = findings(text)
    mixed = scripts(text)
    if found and len(mixed) > 1:
        return f"letters from several scripts ({', '.join(sorted(mixed))}): {_list(found, text)}"
    if found:
        return _list(found, text)
    if len(mixed) > 1:
        return f"letters from several scripts ({', '.join(sorted(mixed))})"
    return None


def _list(found: list[Finding], text: str) -> str:
    shown = "; ".join(str(f) for f in found[:3])
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return f"{shown}{more}; it reads like '{skeleton(text)}'"
