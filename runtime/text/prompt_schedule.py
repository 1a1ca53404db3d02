"""AUTOMATIC1111's prompt editing, alternation and `AND`: which text conditions which step.

The web UI (modules/prompt_parser.py) turns one prompt into a schedule before any attention
parsing: a list of (end_at_step, text) pairs, where each text is the prompt with every
`[from:to:when]` and `[a|b]` resolved for the steps up to end_at_step. Then, per sampler call,
the first pair with `call <= end_at_step` gives the conditioning. This module is that, in plain
Python (the web UI uses a lark grammar; the rules below are the grammar's, written out):

- `[from:to:when]` is `from` up to step `when`, then `to`; `[to:when]` adds `to` after `when`;
  `[from::when]` removes `from` after `when`. `when` is a number: with a decimal point (`0.5`,
  `.25`, `1.5`) a fraction of the steps, without one (`10`) a step number, truncated towards zero
  and capped at the step count. (A1111's "use old prompt editing timelines" option reads any
  `when < 1` as a fraction and anything else as a step: `old_scheduling=True` here.)
- `[a|b|c]` cycles through its options, one per step (step 1 `a`, step 2 `b`, ...); empty options
  are empty text.
- Brackets nest; `(x)`, `(x:w)` and `[x]` are attention syntax and stay in the text as written,
  with any editing inside them resolved.
- What the grammar does not accept is left alone: the whole prompt is one text for all steps.
  That covers a `|` outside square brackets, a lone backslash at the end, and more. A `when`
  too large to be a step (`1e999`) fails the web UI's whole generation when read as editing, so
  such a bracket is not editing here (read as the grammar's other constructs, or plain text). Unbalanced
  brackets and colons at the top level are just text, while editing elsewhere in the prompt still
  works (`((a][:b:c [d:3]`).
- Hires fix second passes: a fraction above 1 reaches into the second pass (`1.5`: half-way
  through it) and a step number counts on from the first pass's steps; `0.5` or a step number
  inside the first pass means the second pass only sees the final text.

`AND` (get_multicond_prompt_list) splits the prompt before all that, on the whole word `AND`;
each part may end with `:weight` (`a cat:1.2 AND a dog`), which is taken off its text. Each part
gets its own schedule; the negative prompt is never split.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# lark's SIGNED_NUMBER: an integer, a decimal with a point, either with an exponent.
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+(?:[eE][+-]?\d+)?))\s*")
_SPECIAL = "\\[]():|"
_AND = re.compile(r"\bAND\b")
# A part's trailing weight: the web UI's pattern (text lazily, then `:number` and whitespace).
_PART_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


class _NoParse(Exception):
    """The text at this position is not what the grammar accepts."""


class _TooDeep(Exception):
    """Nesting beyond _MAX_DEPTH: give up on editing rather than recurse without bound."""


@dataclass(frozen=True)
class _Scheduled:
    before: _Seq | None
    after: _Seq
    number: str


@dataclass(frozen=True)
class _Alternate:
    options: tuple[_Seq, ...]


_Node = str | _Scheduled | _Alternate
_Seq = tuple[_Node, ...]
_MAX_DEPTH = 100  # brackets nested deeper than this: the prompt is read without editing


class _Parser:
    """Backtracking descent over the grammar: inside brackets everything must parse; at the top
    level an opening bracket whose construct does not parse is a literal character instead."""

    def __init__(self, text: str, timeline: _Timeline) -> None:
        self.text = text
        self.timeline = timeline
        self.depth = 0
        # A construct parses the same wherever it is reached from, so each opener is tried once
        # (without this, a run of stray top-level openers would be re-parsed quadratically).
        self.brackets: dict[int, tuple[_Seq, int] | None] = {}

    def parse(self) -> _Seq:
        nodes, pos = self._sequence(0, top=True)
        assert pos == len(self.text)
        return nodes

    def _sequence(self, pos: int, top: bool) -> tuple[_Seq, int]:
        text, nodes, plain = self.text, [], []
        while pos < len(text):
            char = text[pos]
            if char == "\\":
                # An escape takes the next character (not a newline: lark's `.`); a lone one fails.
                if pos + 1 >= len(text) or text[pos + 1] == "\n":
                    raise _NoParse
                plain.append(text[pos : pos + 2])
                pos += 2
            elif char not in _SPECIAL:
                plain.append(char)
                pos += 1
            elif char in "[(":
                try:
                    node, end = self._bracket(pos)
                except _NoParse:
                    if not top:
                        raise
                    plain.append(char)  # a stray opener: text
                    pos += 1
                    continue
                if plain:
                    nodes.append("".join(plain))
                    plain = []
                nodes.extend(node)
                pos = end
            elif top and char != "|":
                plain.append(char)  # stray `]`, `)` or `:` at the top level: text
                pos += 1
            elif top:
                raise _NoParse  # `|` outside an alternation: the whole prompt stays as it is
            else:
                break  # `]`, `)`, `:` or `|` ends this inner sequence
        if plain:
            nodes.append("".join(plain))
        return tuple(nodes), pos

    def _bracket(self, pos: int) -> tuple[_Seq, int]:
        """The construct opened at `pos`: attention brackets (kept as text), scheduling or
        alternation. Returns the nodes it stands for and the position after it."""
        if pos not in self.brackets:
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise _TooDeep
            try:
                self.brackets[pos] = self._parse_bracket(pos)
            except _NoParse:
                self.brackets[pos] = None
            finally:
                self.depth -= 1
        result = self.brackets[pos]
        if result is None:
            raise _NoParse
        return result

    def _parse_bracket(self, pos: int) -> tuple[_Seq, int]:
        text, opener = self.text, self.text[pos]
        closer = "]" if opener == "[" else ")"
        segments: list[_Seq] = []
        spans: list[tuple[int, int]] = []
        separators: list[str] = []
        pos += 1
        while True:
            start = pos
            seq, pos = self._sequence(pos, top=False)
            segments.append(seq)
            spans.append((start, pos))
            if pos >= len(text):
                raise _NoParse
            char = text[pos]
            pos += 1
            if char == closer:
                break
            if char not in ":|" or (char == "|" and opener == "("):
                raise _NoParse
            separators.append(char)
        if opener == "(" or not separators:
            if len(separators) > 1:
                raise _NoParse
            # `(x)`, `(x:w)`, `[x]`: attention syntax, kept as written around the resolved inside.
            inner: list[_Node] = [opener, *segments[0]]
            if separators:
                inner += [":", *segments[1]]
            return (*inner, closer), pos
        if set(separators) == {"|"}:
            return (_Alternate(tuple(segments)),), pos
        if "|" in separators or len(separators) > 2:
            raise _NoParse
        number = _NUMBER.fullmatch(text, *spans[-1])
        if number is None or not self.timeline.usable(number.group(1)):
            raise _NoParse
        before = segments[0] if len(separators) == 2 else None
        return (_Scheduled(before, segments[-2], number.group(1)),), pos


@dataclass(frozen=True)
class _Timeline:
    """How `when` numbers map onto the steps of one sampling pass."""

    steps: int
    int_offset: int = 0
    fraction_offset: float = 0.0
    old: bool = False

    def _value(self, number: str) -> float:
        value = float(number)
        if self.old:
            return value * self.steps if value < 1 else value
        if "." in number:
            return (value - self.fraction_offset) * self.steps
        return value - self.int_offset

    def usable(self, number: str) -> bool:
        """Whether the web UI can make a step of `number`. Its int() fails on an infinite value
        (`1e999`, or a fraction that overflows once multiplied by the steps), and with it the whole
        generation, whenever its parser reads that bracket as editing; where the grammar allows
        another reading (literal brackets) that is the only one the web UI gives a result for, so
        such a bracket is not editing here."""
        return math.isfinite(self._value(number))

    def when(self, number: str) -> int:
        return min(self.steps, int(self._value(number)))


def _boundaries(nodes: _Seq, timeline: _Timeline, found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = timeline.when(node.number)
            if when >= 1:
                found.add(when)
            for part in (node.before, node.after):
                if part is not None:
                    _boundaries(part, timeline, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, timeline.steps + 1))
            for option in node.options:
                _boundaries(option, timeline, found)


def _text_at(nodes: _Seq, step: int, timeline: _Timeline) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            chosen = node.before if step <= timeline.when(node.number) else node.after
            if chosen is not None:
                out.append(_text_at(chosen, step, timeline))
        else:
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, timeline))
    return "".join(out)


Schedule = list[tuple[int, str]]


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None, old_scheduling: bool = False) -> Schedule:
    """(end_at_step, text) pairs of one prompt over a pass of `steps` steps, as the web UI's
    get_learned_conditioning_prompt_schedules: the last pair ends at the step count.

    For a hires fix second pass give the first pass's step count as `steps` and the second pass's
    as `hires_steps`; the schedule is then over the second pass's steps.

    >>> prompt_schedule("a [b:3]", 10)
    [(3, 'a '), (10, 'a b')]
    """
    if hires_steps is None or old_scheduling:
        timeline = _Timeline(steps, old=old_scheduling)
    else:
        timeline = _Timeline(hires_steps, int_offset=steps, fraction_offset=1.0)
    try:
        nodes = _Parser(prompt, timeline).parse()
    except (_NoParse, _TooDeep):
        return [(timeline.steps, prompt)]
    found = {timeline.steps}
    _boundaries(nodes, timeline, found)
    return [(step, _text_at(nodes, step, timeline)) for step in sorted(found)]


def text_for_call(schedule: Schedule, call: int) -> str:
    """The text conditioning sampler call `call` (0-based, counted like the web UI's
    CFGDenoiser.step): the first pair with call <= end_at_step, else the first pair."""
    for end_at_step, text in schedule:
        if call <= end_at_step:
            return text
    return schedule[0][1]


def split_and(prompt: str) -> list[tuple[str, float]]:
    """The `AND` parts of a positive prompt with their weights (get_multicond_prompt_list):
    `a cat:1.2 AND a dog` -> [('a cat', 1.2), (' a dog', 1.0)]."""
    parts = []
    for part in _AND.split(prompt):
        text, weight = _PART_WEIGHT.match(part).groups()
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


@dataclass(frozen=True)
class ConditioningPlan:
    """Which texts condition each sampler call of one pass: the positive prompt's `AND` parts
    (each a schedule and a weight) and the negative prompt's schedule."""

    parts: tuple[tuple[tuple[tuple[int, str], ...], float], ...]
    negative: tuple[tuple[int, str], ...]

    @classmethod
    def build(
        cls,
        prompt: str,
        negative_prompt: str,
        steps: int,
        hires_steps: int | None = None,
        old_scheduling: bool = False,
    ) -> ConditioningPlan:
        def schedule(text: str) -> tuple[tuple[int, str], ...]:
            return tuple(prompt_schedule(text, steps, hires_steps, old_scheduling))

        parts = tuple((schedule(text), weight) for text, weight in split_and(prompt))
        return cls(parts, schedule(negative_prompt))

    @property
    def is_static(self) -> bool:
        """One positive text of weight 1 and one negative text for every step: the plain case,
        one text-encoder run and the usual CFG."""
        return (
            len(self.parts) == 1 and self.parts[0][1] == 1.0 and len(self.parts[0][0]) == 1 and len(self.negative) == 1
        )

    @property
    def composable(self) -> bool:
        """`AND` or a part weight: the web UI's composable combination around the uncond."""
        return len(self.parts) > 1 or self.parts[0][1] != 1.0

    def positive_texts(self) -> list[str]:
        return _distinct(text for schedule, _ in self.parts for _, text in schedule)

    def negative_texts(self) -> list[str]:
        return _distinct(text for _, text in self.negative)

    def boundaries(self) -> list[int]:
        """The calls after which some text changes (each schedule's end_at_step), ascending."""
        ends = {end for schedule, _ in self.parts for end, _ in schedule} | {end for end, _ in self.negative}
        return sorted(ends)

    def at_call(self, call: int) -> tuple[tuple[tuple[str, float], ...], str]:
        """((text, weight) per part, negative text) for sampler call `call` (0-based)."""
        parts = tuple((text_for_call(list(schedule), call), weight) for schedule, weight in self.parts)
        return parts, text_for_call(list(self.negative), call)


def _distinct(texts) -> list[str]:
    return list(dict.fromkeys(texts))
