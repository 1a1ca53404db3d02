"""AUTOMATIC1111's prompt attention syntax: `(x)`, `[x]`, `(x:1.3)`, escapes and `BREAK`.

`parse_prompt_attention` splits a prompt into (text, weight) pieces with the web UI's semantics
(modules/prompt_parser.py, parse_prompt_attention), quirks included, because the same prompt has to
give the same conditioning here as there:

- `(x)` multiplies x's weight by 1.1, `[x]` divides it by 1.1, `(x:1.3)` multiplies it by 1.3
  (whitespace allowed around the number); nesting multiplies.
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; a backslash before anything else vanishes
  (`a\\b` reads as `ab`), as in the web UI.
- An opener that never closes applies its factor to everything after it; a closer without an
  opener, and `:1.3)` outside round brackets, are plain text.
- `BREAK` as a whole upper-case word (with the whitespace around it) becomes the marker piece
  ("BREAK", -1.0). The marker sits in the piece list like any other piece, so brackets around it
  multiply its weight too: inside brackets `BREAK` is no longer a marker but the word "BREAK"
  with a negative weight. That is what the web UI does, so it is what we do.
- Neighbouring pieces with exactly equal weights merge.

The number in `(x:N)` is what the web UI's pattern accepts: an optional sign, then digits and dots.
So `(x:-1)` is a weight of -1 and a long run of digits is a weight of `inf`, as there; `(x:1e3)` is
not a number at all (the `e`), so it reads as the text "x:1e3" with a weight of 1.1.
"""

from __future__ import annotations

import re

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

BREAK_TEXT = "BREAK"
BREAK_WEIGHT = -1.0

# One lexical token per match. The order of the alternatives matters: escapes before brackets,
# and an explicit weight (`:1.3)`) before the lone `:` and `)` it would otherwise split into.
_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]?             # an escape, or a lone backslash (which vanishes)
    | [(\[]                     # an opener
    | :\s*([+-]?[.\d]+)\s*\)    # `:N)`: the weight that closes a round bracket
    | [)\]]                     # a closer
    | [^\\()\[\]:]+             # plain text
    | :                         # a colon that does not start a weight
    """,
    re.VERBOSE,
)

_BREAK = re.compile(r"\s*\bBREAK\b\s*")

Piece = tuple[str, float]


def is_break(text: str, weight: float) -> bool:
    """Whether a parsed piece is the chunk-ending marker (and not the word BREAK with a weight)."""
    return text == BREAK_TEXT and weight == BREAK_WEIGHT


def _parse_weight(number: str) -> float | None:
    """The weight of `(x:N)`, or None where the digits-and-dots run is not a number (`1.2.3`, `.`).

    The web UI raises there (float() fails and the generation errors out); we read such a weight as
    ordinary text instead, the same as a weight the pattern does not accept at all, like `1e3`.
    """
    try:
        return float(number)
    except ValueError:
        return None


def parse_prompt_attention(text: str) -> list[Piece]:
    """Split a prompt into (text, weight) pieces, A1111 style; never raises.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # [text, weight], mutable while brackets are resolved
    round_starts: list[int] = []  # index into pieces where each open `(` began
    square_starts: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    def add_text(chunk: str) -> None:
        for i, part in enumerate(_BREAK.split(chunk)):
            if i > 0:
                pieces.append([BREAK_TEXT, BREAK_WEIGHT])
            pieces.append([part, 1.0])

    for match in _TOKEN.finditer(text):
        token, number = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_starts.append(len(pieces))
        elif token == "[":
            square_starts.append(len(pieces))
        elif number is not None and round_starts:
            weight = _parse_weight(number)
            if weight is not None:
                multiply_from(round_starts.pop(), weight)
            else:
                # Not a number: the `:...` part is text and the `)` still closes the bracket.
                add_text(token[:-1])
                multiply_from(round_starts.pop(), ROUND_FACTOR)
        elif token == ")" and round_starts:
            multiply_from(round_starts.pop(), ROUND_FACTOR)
        elif token == "]" and square_starts:
            multiply_from(square_starts.pop(), SQUARE_FACTOR)
        else:
            add_text(token)

    # Unclosed openers apply to the end of the prompt (all round ones first, as the web UI does;
    # the order only matters for the last bit of floating-point rounding).
    for start in round_starts:
        multiply_from(start, ROUND_FACTOR)
    for start in square_starts:
        multiply_from(start, SQUARE_FACTOR)

    if not pieces:
        return [("", 1.0)]
    return _merge_equal_neighbours(pieces)


def _merge_equal_neighbours(pieces: list[list]) -> list[Piece]:
    """Join runs of pieces whose weights are exactly equal (`==`, so NaN weights never merge)."""
    merged: list[list] = [list(pieces[0])]
    for text, weight in pieces[1:]:
        if merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, float(weight)) for text, weight in merged]
