"""A1111's extra-network tags in prompts: `<lora:name>`, `<lora:name:0.8>`, `<lora:name:te:unet>`.

As the web UI's modules/extra_networks.parse_prompt: every `<kind:args>` (kind a word, args up to
the next `>`) is removed from the prompt and its args split on ':'; an arg with one '=' is named
(`te=0.5`, `unet=1`), the others positional; `<lyco:...>` is the same as `<lora:...>`. For LoRA
(extensions-builtin/Lora): the first positional is the name, the second the text-encoder
multiplier (default 1), the third the UNet multiplier (default: the text encoder's); `te=` /
`unet=` override them. Only the positive prompt
carries tags, as in the web UI. Unlike the web UI, which logs and ignores what it does not know, an
unknown kind or name is an error here: a silently different image is worse than a refusal.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import InvalidRequestError

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
KINDS = ("lora",)
ALIASES = {"lyco": "lora"}  # the web UI's built-in Lora extension registers <lyco:...> as <lora:...>
MAX_MULTIPLIER = 100.0


@dataclass(frozen=True)
class LoraUse:
    name: str
    te_multiplier: float
    unet_multiplier: float


def _number(field_name: str, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequestError(field_name, f"{what} {text!r} is not a number") from None
    if not math.isfinite(value) or abs(value) > MAX_MULTIPLIER:
        raise InvalidRequestError(field_name, f"{what} {text!r} is out of range (|x| <= {MAX_MULTIPLIER:g})")
    return value


def _lora(field_name: str, args: list[str]) -> LoraUse:
    positional, named = [], {}
    for arg in args:
        parts = arg.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(arg)
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown:
        raise InvalidRequestError(field_name, f"<lora:...> does not take {', '.join(unknown)}= (only te= and unet=)")
    if not positional or not positional[0]:
        raise InvalidRequestError(field_name, "<lora:...> needs a LoRA name")
    te = _number(field_name, positional[1], "LoRA multiplier") if len(positional) > 1 else 1.0
    te = _number(field_name, named["te"], "LoRA te multiplier") if "te" in named else te
    unet = _number(field_name, positional[2], "LoRA unet multiplier") if len(positional) > 2 else te
    unet = _number(field_name, named["unet"], "LoRA unet multiplier") if "unet" in named else unet
    if len(positional) > 3:
        raise InvalidRequestError(field_name, f"<lora:{':'.join(args)}> has too many values (name:te:unet at most)")
    return LoraUse(positional[0], te, unet)


def parse_prompt(prompt: str, field_name: str = "prompt") -> tuple[str, list[LoraUse]]:
    """(prompt without the tags, the LoRAs in the order written)."""
    found: list[tuple[str, list[str]]] = []

    def take(match: re.Match) -> str:
        found.append((match.group(1), match.group(2).split(":")))
        return ""

    text = EXTRA_NETWORK.sub(take, prompt)
    # The web UI groups tags by the kind as written, in the order each kind first appears, and
    # hands the Lora extension the <lora:...> group and the <lyco:...> group one after the other;
    # its order is the order LoRAs are applied in, so keep it (a stable sort by first appearance).
    first_seen = {kind: index for index, (kind, _) in reversed(list(enumerate(found)))}
    found.sort(key=lambda tag: first_seen[tag[0]])
    loras = []
    for kind, args in found:
        kind = ALIASES.get(kind, kind)
        if kind not in KINDS:
            raise InvalidRequestError(
                field_name, f"<{kind}:...> is not a supported extra network (supported: {', '.join(KINDS)})"
            )
        loras.append(_lora(field_name, args))
    return text, loras
