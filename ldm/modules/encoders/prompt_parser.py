"""AUTOMATIC1111's prompt syntax: attention weights and ``BREAK``.

``(text)`` multiplies the attention of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)``
sets the factor, brackets nest (factors multiply), ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the
literal characters, and ``BREAK`` (upper case, a word of its own) starts a new 75-token chunk. The
rules are those of A1111's ``prompt_parser.parse_prompt_attention``: an unclosed bracket weighs to
the end of the prompt, a closing bracket with nothing open is text, ``(a:b)`` with ``b`` not a
number is the text ``a:b`` at 1.1, and neighbouring runs of equal weight are joined (so that the
tokenizer sees them as one text). Unlike A1111, ``BREAK`` inside brackets breaks too, the
brackets' weight going on after it (A1111 turned it into the word "BREAK" with weight -1.1), and a
weight that looks like a number but is not one (``(a:1.2.3)``) is a ``ValueError`` naming it, where
A1111 failed with Python's own message.
"""

from __future__ import annotations

import re

ROUND = 1.1  # the factor of ``( )``
SQUARE = 1 / 1.1  # the factor of ``[ ]``

Run = tuple[str, float]
"""A piece of prompt text and its attention weight."""

_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]            # an escaped bracket or backslash
    | \\                    # a lone backslash: text
    | \(                    # open round
    | \[                    # open square
    | :\s*([+-]?[.\d]+)\s*\)  # a weight closing round brackets
    | \)                    # close round
    | \]                    # close square
    | [^\\()\[\]:]+         # text
    | :                     # a colon that is not a weight: text
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt(text: str) -> list[list[Run]]:
    """``text``'s ``BREAK``-separated sections, each a list of (text, weight) runs, neighbouring runs
    of equal weight joined (a section may be empty: ``"BREAK a"`` starts with an empty chunk)."""
    sections: list[list[list]] = [[]]  # runs as [text, weight] lists: brackets scale them when closed
    opened: list[tuple[int, int, float]] = []  # (section, run) where each open bracket began, its factor

    def scale(start: tuple[int, int], factor: float) -> None:
        first_section, first_run = start
        for s in range(first_section, len(sections)):
            for run in sections[s][first_run if s == first_section else 0 :]:
                run[1] *= factor

    def is_open(kind: float) -> bool:
        return any(factor == kind for _, _, factor in opened)

    def close(kind: float, factor: float) -> None:
        """Scale from the innermost open bracket of ``kind`` on, by ``factor``."""
        i = max(i for i, (_, _, k) in enumerate(opened) if k == kind)
        section, run, _ = opened.pop(i)
        scale((section, run), factor)

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):  # an escape gives its character; a lone backslash is dropped, as in A1111
            sections[-1].append([token[1:], 1.0])
        elif token == "(":
            opened.append((len(sections) - 1, len(sections[-1]), ROUND))
        elif token == "[":
            opened.append((len(sections) - 1, len(sections[-1]), SQUARE))
        elif weight is not None and is_open(ROUND):
            close(ROUND, _number(weight, token))
        elif token == ")" and is_open(ROUND):
            close(ROUND, ROUND)
        elif token == "]" and is_open(SQUARE):
            close(SQUARE, SQUARE)
        else:
            pieces = _BREAK.split(token)
            sections[-1].append([pieces[0], 1.0])
            for piece in pieces[1:]:
                sections.append([[piece, 1.0]])
    # Unclosed brackets weigh to the end: the round ones first, then the square ones, as A1111 (the
    # order of the float products).
    for kind in (ROUND, SQUARE):
        for section, run, factor in opened:
            if factor == kind:
                scale((section, run), factor)
    return [_joined(section) for section in sections]


def _number(weight: str, token: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise ValueError(f"prompt weight {token.rstrip(')').lstrip(':').strip()!r} in {token!r} is not a number "
                         "(escape the brackets as \\( \\) for literal text)") from None


def _joined(runs: list[list]) -> list[Run]:
    """Neighbouring runs of equal weight joined, then the empty ones dropped (A1111's order: an empty
    run of another weight keeps its neighbours apart)."""
    out: list[list] = []
    for text, weight in runs:
        if out and out[-1][1] == weight:
            out[-1][0] += text
        else:
            out.append([text, weight])
    return [(text, weight) for text, weight in out if text]
