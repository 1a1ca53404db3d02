"""A1111's prompt comments (1.8+, option `enable_prompt_comments`, on by default): `#` hides the
rest of its line from the generation. Stripped before anything reads the prompt (LoRA tags,
embeddings, token counting), as A1111's comments script does in `process`, after styles apply."""

from __future__ import annotations

import re

# A1111's two substitutions, in its order: a whole-line comment (its newline goes with it), then a
# comment that starts mid-line. Each leaves one newline where the comment ended.
_WHOLE_LINE = re.compile("(^|\n)#[^\n]*(\n|$)")
_MID_LINE = re.compile("#[^\n]*(\n|$)")


def strip_comments(text: str) -> str:
    """`text` without its `#` comments, as modules/processing_scripts/comments.py strips them."""
    return _MID_LINE.sub("\n", _WHOLE_LINE.sub("\n", text))
