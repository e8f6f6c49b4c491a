"""AUTOMATIC1111's prompt syntax against hand-written parses: the examples of A1111's own
``parse_prompt_attention`` docstring, its edge cases (unbalanced brackets, ``(a:b)`` with a
non-number, nested weights multiplying, escapes, BREAK), and where this parser differs on purpose
(BREAK inside brackets; a weight that is not a number). Weights are compared exactly: they are the
same float products, in the same order, as A1111's."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ldm.modules.encoders.prompt_parser import parse_prompt
from ldm.modules.encoders.prompts import literal_prompt

A1111_DOCSTRING = {
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    "\\(literal\\]": [("(literal]", 1.0)],
    "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
    ],
}

EDGE_CASES = {
    "": [],
    "(word)": [("word", 1.1)],
    "[word]": [("word", 1 / 1.1)],
    "(word:1.3)": [("word", 1.3)],
    "(word: 0.5 )": [("word", 0.5)],
    "(word:-1)": [("word", -1.0)],
    "((word))": [("word", 1.1 * 1.1)],
    "[[word]]": [("word", 1 / 1.1 / 1.1)],
    "((word:1.5))": [("word", 1.5 * 1.1)],
    "([word])": [("word", 1 / 1.1 * 1.1)],
    "(a:b)": [("a:b", 1.1)],  # not a number: text, and the bracket closes as ( )
    "a:1.2)": [("a:1.2)", 1.0)],  # a weight with nothing open is text
    "a) b] c": [("a) b] c", 1.0)],  # closing brackets with nothing open are text
    "((a)": [("a", 1.1 * 1.1)],  # the unclosed one weighs to the end
    "[(a": [("a", 1.1 / 1.1)],  # unclosed: round brackets first, then square (A1111's order)
    "(a [b) c]": [("a ", 1.1), ("b", 1 / 1.1 * 1.1), (" c", 1 / 1.1)],  # ( ) and [ ] close independently
    "[a:1.5]": [("a:1.5", 1 / 1.1)],  # prompt editing is not supported: text in [ ]
    "\\\\": [("\\", 1.0)],
    "a\\b": [("ab", 1.0)],  # a lone backslash is dropped, as in A1111
    "\\(a\\):1.2": [("(a):1.2", 1.0)],
    "(a)(b:1.1)": [("ab", 1.1)],  # equal weights join into one text
    "photo: a cat, 4k": [("photo: a cat, 4k", 1.0)],
}

BREAKS = {
    "a BREAK b": [[("a", 1.0)], [("b", 1.0)]],
    "a  BREAK  b BREAK c": [[("a", 1.0)], [("b", 1.0)], [("c", 1.0)]],
    "BREAK a": [[], [("a", 1.0)]],  # an empty first chunk, as in A1111
    "a BREAK": [[("a", 1.0)], []],
    "a BREAKFAST break": [[("a BREAKFAST break", 1.0)]],  # upper case, a word of its own
    "(a BREAK b)": [[("a", 1.1)], [("b", 1.1)]],  # differs from A1111 (the word "BREAK" at -1.1)
    "(a BREAK b:1.5) c": [[("a", 1.5)], [("b", 1.5), (" c", 1.0)]],
}


@pytest.mark.parametrize("text", list(A1111_DOCSTRING))
def test_a1111s_own_examples(text):
    assert parse_prompt(text) == [A1111_DOCSTRING[text]]


@pytest.mark.parametrize("text", list(EDGE_CASES))
def test_edge_cases(text):
    assert parse_prompt(text) == [EDGE_CASES[text]]


@pytest.mark.parametrize("text", list(BREAKS))
def test_break_starts_a_section(text):
    assert parse_prompt(text) == BREAKS[text]


@pytest.mark.parametrize("weight", ["1.2.3", ".", "-."])
def test_a_weight_that_is_not_a_number_is_an_error_naming_it(weight):
    with pytest.raises(ValueError, match=rf"{weight!r}.*not a number.*\\\("):
        parse_prompt(f"a (cat:{weight}) b")


@given(st.text(alphabet=st.characters(blacklist_characters="()[]\\"), min_size=1))
def test_text_without_brackets_or_break_is_one_run_of_weight_one(text):
    """Fidelity: such a prompt is tokenized whole, as the original tokenizes it."""
    if "BREAK" in text:
        return
    assert parse_prompt(text) == [[(text, 1.0)]]


def test_no_syntax_keeps_brackets_and_break_as_text():
    text = "a (red:1.3) \\(cube\\) BREAK [x]"
    assert literal_prompt(text) == [[(text, 1.0)]]
