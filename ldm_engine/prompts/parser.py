"""AUTOMATIC1111's prompt-attention syntax: text -> runs of (text, weight).

    (x)        weight x 1.1            [x]        weight / 1.1
    (x:1.5)    weight x 1.5            nesting    multiplies: ((x)) = 1.21
    \\( \\) \\[ \\] \\\\   the literal characters
    an unclosed ( or [ applies to the rest of the prompt
    BREAK      (a whole word, upper case) ends the current 75-token chunk

Adjacent runs of equal weight are merged, so a prompt without brackets is one run holding the
prompt's exact text. The rules are those of A1111's `parse_prompt_attention`, with one exception:
A1111 multiplies its BREAK marker by the enclosing brackets' weights, after which the marker is read
as the word "BREAK" with a negative weight; here BREAK always ends the chunk.
"""
from __future__ import annotations

import re

ROUND = 1.1  # (x)
SQUARE = 1 / 1.1  # [x]

# The chunk separator in parse_prompt_attention's output (A1111 writes ["BREAK", -1] as well).
BREAK = ("BREAK", -1.0)

# One lexical item of the syntax, in priority order: an escape, an opening bracket, a ':weight)' closer,
# a closing bracket, a run of plain text, or a lone ':' (plain text too).
_ITEM = re.compile(r"""
    \\\( | \\\) | \\\[ | \\] | \\\\ | \\     # escapes (a lone backslash escapes nothing and is dropped)
  | \( | \[                                  # openers
  | :([+-]?[.\d]+)\)                         # (text:1.5) closer, with its weight
  | \) | ]                                   # closers
  | [^\\()\[\]:]+                            # plain text
  | :                                        # a colon that closes nothing
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Runs of (text, weight) in prompt order; a chunk break is the `BREAK` pair.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []  # index in `runs` where each open bracket starts
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            if not run[2]:
                run[1] *= factor

    for m in _ITEM.finditer(text):
        item, weight = m.group(0), m.group(1)
        if item.startswith("\\"):
            runs.append([item[1:], 1.0, False])
        elif item == "(":
            round_open.append(len(runs))
        elif item == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"prompt weight {weight!r} in {item!r} is not a number; write (text:1.2), or "
                                 f"escape the bracket as \\( to use it literally") from None
            multiply(round_open.pop(), factor)
        elif item == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif item == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:  # plain text, or a closer / ':weight)' that closes nothing: literal text
            for i, part in enumerate(_BREAK.split(item)):
                if i:
                    runs.append(["BREAK", -1.0, True])
                runs.append([part, 1.0, False])
    # unclosed brackets weigh everything after them (innermost first, as A1111)
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    if not runs:
        runs = [["", 1.0, False]]
    merged: list[list] = [runs[0]]
    for run in runs[1:]:
        last = merged[-1]
        if not run[2] and not last[2] and run[1] == last[1]:
            last[0] += run[0]
        else:
            merged.append(run)
    return [BREAK if brk else (t, w) for t, w, brk in merged]


def parse_prompt(text: str, syntax: str = "a1111") -> list[tuple[str, float]]:
    """`syntax` "a1111": the weighted runs above; "plain": the whole text at weight 1.0 (brackets and
    BREAK are ordinary text)."""
    if syntax == "a1111":
        return parse_prompt_attention(text)
    if syntax == "plain":
        return [(text, 1.0)]
    raise ValueError(f"prompt_syntax must be 'a1111' or 'plain', got {syntax!r}")
