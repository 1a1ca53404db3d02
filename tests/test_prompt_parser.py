"""parse_prompt_attention against AUTOMATIC1111's documented behaviour and its quirks."""

from __future__ import annotations

import itertools
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.text.prompt_parser import BREAK_TEXT, BREAK_WEIGHT, is_break, parse_prompt_attention

B = (BREAK_TEXT, BREAK_WEIGHT)

# Input -> pieces. The first six are the web UI's docstring examples (modules/prompt_parser.py)
# and docs/reference a1111-compat.md; the rest pin details of the same algorithm.
CASES: list[tuple[str, list[tuple[str, float]]]] = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.573),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641),
            (".", 1.1),
        ],
    ),
    # explicit weights, whitespace around the number, signs
    ("(cat:1.3)", [("cat", 1.3)]),
    ("a (cat: 1.3 ) b", [("a ", 1.0), ("cat", 1.3), (" b", 1.0)]),
    ("(cat:\t0.5\n)", [("cat", 0.5)]),
    ("(cat:+2)", [("cat", 2.0)]),
    ("(cat:.5)", [("cat", 0.5)]),
    ("(cat:2.)", [("cat", 2.0)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("(cat:0)", [("cat", 0.0)]),
    # nesting multiplies
    ("((cat))", [("cat", 1.21)]),
    ("[[cat]]", [("cat", 1 / 1.21)]),
    ("[cat]", [("cat", 1 / 1.1)]),
    ("((cat:1.5))", [("cat", 1.65)]),
    ("[(cat:2)]", [("cat", 2 / 1.1)]),
    ("a (b [c] d) e", [("a ", 1.0), ("b ", 1.1), ("c", 1.0), (" d", 1.1), (" e", 1.0)]),
    # escapes; a backslash before anything else vanishes
    (r"\\", [("\\", 1.0)]),
    (r"\(cat\)", [("(cat)", 1.0)]),
    (r"\[cat\]", [("[cat]", 1.0)]),
    (r"(\(cat\))", [("(cat)", 1.1)]),
    (r"a\b", [("ab", 1.0)]),
    ("a\\", [("a", 1.0)]),
    # unbalanced openers apply to the end; stray closers and weights stay text
    ("a (b", [("a ", 1.0), ("b", 1.1)]),
    ("a [b", [("a ", 1.0), ("b", 1 / 1.1)]),
    ("a (b [c", [("a ", 1.0), ("b ", 1.1), ("c", 1.0)]),
    ("a) b]", [("a) b]", 1.0)]),
    ("x:1.3) y", [("x:1.3) y", 1.0)]),
    ("[x:1.3)]", [("x:1.3)", 1 / 1.1)]),
    ("time: 12:30", [("time: 12:30", 1.0)]),
    # what the weight pattern does not accept is text; the `)` still closes
    ("(cat:)", [("cat:", 1.1)]),
    ("(cat:1e3)", [("cat:1e3", 1.1)]),
    ("(cat:abc)", [("cat:abc", 1.1)]),
    # digits and dots that are not a number: the web UI raises here, we read text
    ("(cat:1.2.3)", [("cat:1.2.3", 1.1)]),
    ("(cat:.)", [("cat:.", 1.1)]),
    ("(cat: - )", [("cat: - ", 1.1)]),
    # nothing but syntax
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("[]", [("", 1.0)]),
    # BREAK: a whole upper-case word, taking the whitespace around it
    ("a BREAK b", [("a", 1.0), B, ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), B, ("b", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), B, (",b", 1.0)]),
    ("BREAK", [("", 1.0), B, ("", 1.0)]),
    ("BREAK a", [("", 1.0), B, ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), B, ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), B, ("", 1.0), B, ("b", 1.0)]),
    ("(a) BREAK b", [("a", 1.1), ("", 1.0), B, ("b", 1.0)]),
    ("a BREAK (b)", [("a", 1.0), B, ("", 1.0), ("b", 1.1)]),
    ("BREAKFAST break Break", [("BREAKFAST break Break", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    # inside brackets the marker's weight is multiplied too: it becomes the word with that weight
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("[BREAK]", [("", 1 / 1.1), ("BREAK", -1 / 1.1), ("", 1 / 1.1)]),
]


def _assert_pieces(actual: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [text for text, _ in actual] == [text for text, _ in expected]
    assert [weight for _, weight in actual] == pytest.approx([weight for _, weight in expected])


@pytest.mark.parametrize(("prompt", "expected"), CASES, ids=[repr(prompt) for prompt, _ in CASES])
def test_pieces(prompt: str, expected: list[tuple[str, float]]) -> None:
    _assert_pieces(parse_prompt_attention(prompt), expected)


def test_docstring_example_has_the_web_uis_exact_floats() -> None:
    # Same multiplication order as the web UI, so even the last bits agree with its docstring.
    weights = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert weights["house"] == 1.5730000000000004
    assert weights["sky"] == 1.4641000000000006


def test_equal_weights_merge_only_when_exactly_equal() -> None:
    assert parse_prompt_attention("a ((b:0.5):2)") == [("a b", 1.0)]  # 1.1 * 0.5 * 2 is exactly 1
    # Three times 1/1.1 then three times 1.1 is 1.0000000000000002: no merge, as in the web UI.
    assert parse_prompt_attention("a [[[(((b)))]]]") == [("a ", 1.0), ("b", 1.0000000000000002)]
    assert parse_prompt_attention("(a)(b)(c)") == [("abc", 1.1)]


def test_huge_weight_is_infinite_as_in_the_web_ui() -> None:
    [(text, weight)] = parse_prompt_attention("(cat:" + "9" * 400 + ")")
    assert text == "cat"
    assert math.isinf(weight)


def test_result_types() -> None:
    pieces = parse_prompt_attention("a (b) BREAK c")
    assert all(isinstance(text, str) and isinstance(weight, float) for text, weight in pieces)
    assert [is_break(*piece) for piece in pieces] == [False, False, False, True, False]


def test_is_break_only_for_the_marker() -> None:
    assert is_break("BREAK", -1.0)
    assert not is_break("BREAK", -1.1)
    assert not is_break("BREAK", 1.0)
    assert not is_break("break", -1.0)


_SYNTAX_ALPHABET = st.sampled_from(
    ["(", ")", "[", "]", ":", "\\", "a", "b", " ", "1", ".", "-", "+", "e", ",", "\n", "BREAK", ":1.3)"]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_SYNTAX_ALPHABET, max_size=30).map("".join))
def test_fuzz_never_raises_and_merges(prompt: str) -> None:
    pieces = parse_prompt_attention(prompt)
    assert pieces
    for (_, left), (_, right) in itertools.pairwise(pieces):
        assert left != right  # neighbours with equal weights were merged


_PLAIN = st.text(alphabet=st.characters(blacklist_characters="()[]\\", blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_PLAIN, st.just(" BREAK "), st.just("BREAK")), max_size=6).map("".join))
def test_fuzz_text_without_brackets_is_preserved(prompt: str) -> None:
    pieces = parse_prompt_attention(prompt)
    texts = [text for text, weight in pieces if not is_break(text, weight)]
    # Only BREAK (with its surrounding whitespace) is taken out; everything else is kept verbatim.
    assert "".join(texts) == re.sub(r"\s*\bBREAK\b\s*", "", prompt)
    assert all(weight == 1.0 for text, weight in pieces if not is_break(text, weight))
    breaks = sum(is_break(*piece) for piece in pieces)
    assert breaks == len(re.findall(r"\bBREAK\b", prompt))
