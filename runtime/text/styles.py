"""A1111's prompt styles (`styles.csv`, the `styles` request field): named prompt and negative
prompt pieces merged into a request's prompts before anything reads them, as modules/styles.py does.

A style's text either holds `{prompt}` (the prompt is put there) or is appended after ", ". Styles
apply in the order named, each to the result of the one before, to the prompt, the negative
prompt and the hires prompts; `#` comments are stripped afterwards (A1111's comments script runs
after setup_prompts applied the styles), so a style may carry comments too.

One difference, on purpose: A1111 applies an unknown style name as no style, so a typo gives a
silently different image. Here it is refused (the caller names the field); "None" (A1111's name
for no style, which AIYA sends) and "" stay no style unless the file defines them.
"""

from __future__ import annotations

import csv
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequestError, UserError

log = logging.getLogger(__name__)
NO_STYLE_NAMES = ("None", "")  # A1111's PromptStyle("None", "", ""), and what a cleared dropdown sends
PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """One style's text applied to a prompt: into its `{prompt}`, else appended after ", " (empty
    sides left out, both stripped), as A1111's merge_prompts."""
    if PLACEHOLDER in style_prompt:
        return style_prompt.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, style_prompts: list[str]) -> str:
    """Each style's text applied in turn, to the result of the one before (A1111's order)."""
    for style_prompt in style_prompts:
        prompt = merge_prompts(style_prompt, prompt)
    return prompt


def read_styles(path: Path) -> dict[str, Style]:
    """A1111's styles.csv: a header with `name`, `prompt` (or the old `text`) and optionally
    `negative_prompt`; a BOM and spaces after commas are allowed, rows named "#..." are comments,
    a later row of the same name wins. A file that cannot be read is a UserError naming it."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, skipinitialspace=True)
            columns = set(reader.fieldnames or ())
            text_column = "prompt" if "prompt" in columns else "text"
            if "name" not in columns or text_column not in columns:
                raise UserError(f"--styles-file {path}: needs a header with the columns name and prompt")
            styles = {}
            for row in reader:
                name = row.get("name") or ""
                if not name or name.startswith("#"):
                    continue
                styles[name] = Style(name, row.get(text_column) or "", row.get("negative_prompt") or "")
            return styles
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"--styles-file {path}: {error}") from None


class StyleLibrary:
    """The styles of one file (none without one), read again when the file changes, so that an
    edited styles.csv needs no restart (A1111's web UI has a reload button for the same)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._styles: dict[str, Style] = {}
        self._reload(strict=True)  # a missing or unreadable file is the operator's error now, not a request's

    def styles(self) -> dict[str, Style]:
        self._reload(strict=False)
        return self._styles

    def _reload(self, strict: bool) -> None:
        """Read the file again if it changed. Once serving, a file gone or half-written keeps the
        styles read last (logged): requests should not fail for an edit in progress."""
        if self.path is None:
            return
        with self._lock:
            try:
                info = self.path.stat()
            except OSError as error:
                failure = UserError(f"--styles-file {self.path}: {error.strerror or error}")
            else:
                stamp = (info.st_mtime_ns, info.st_size)
                if stamp == self._stamp:
                    return
                try:
                    self._styles, self._stamp = read_styles(self.path), stamp
                    return
                except UserError as error:
                    failure = error
            if strict:
                raise failure
            log.warning("keeping the styles read before: %s", failure)

    def find(self, names: list[str], field: str = "styles") -> list[Style]:
        """The named styles in order; A1111's no-style names are skipped, an unknown name is refused."""
        known = self.styles()
        found = []
        for name in names:
            if name in known:
                found.append(known[name])
            elif name not in NO_STYLE_NAMES:
                listed = ", ".join(repr(key) for key in known) or "none (start the server with --styles-file)"
                raise InvalidRequestError(field, f"unknown style {name!r}; the styles are: {listed}")
        return found


def styled(prompt: str, negative_prompt: str, styles: list[Style]) -> tuple[str, str]:
    """The prompt and negative prompt with the styles applied (A1111's apply_styles_to_prompt and
    apply_negative_styles_to_prompt)."""
    return (
        apply_styles(prompt, [style.prompt for style in styles]),
        apply_styles(negative_prompt, [style.negative_prompt for style in styles]),
    )
