"""`#` prompt comments, stripped as A1111 1.8+ strips them (modules/processing_scripts/comments.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime import InvalidRequestError, Pipeline
from runtime.text.comments import strip_comments

SMALL = {"width": 64, "height": 64, "num_inference_steps": 3, "seed": 5}


def a1111_strip_comments(text: str) -> str:
    """The reference: A1111's strip_comments, its two re.sub calls as written there."""
    text = re.sub("(^|\n)#[^\n]*(\n|$)", "\n", text)
    return re.sub("#[^\n]*(\n|$)", "\n", text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1girl, cat ears", "1girl, cat ears"),
        ("# a whole line\n1girl", "\n1girl"),
        ("1girl, # the rest of the line\ncat ears", "1girl, \ncat ears"),
        ("1girl\n# last line", "1girl\n"),
        ("#a\n#b\nc", "\n\nc"),  # the first regex skips the second line (non-overlapping), the second gets it
        ("(red:1.2) #", "(red:1.2) \n"),
    ],
)
def test_a1111_examples(text: str, expected: str) -> None:
    assert a1111_strip_comments(text) == expected
    assert strip_comments(text) == expected


@given(st.text(alphabet="#\n ab\r", max_size=40))
def test_same_as_a1111_on_any_text(text: str) -> None:
    assert strip_comments(text) == a1111_strip_comments(text)


@pytest.fixture(scope="module")
def pipe(tiny_fp32) -> Pipeline:
    return Pipeline.from_pretrained(tiny_fp32, provider="cpu")


def test_a_commented_prompt_gives_the_image_of_the_prompt_without_comments(pipe: Pipeline) -> None:
    commented = {"prompt": "# style notes\n1girl, # cat ears\nsmile", "negative_prompt": "lowres # and more"}
    plain = {"prompt": a1111_strip_comments(commented["prompt"]), "negative_prompt": "lowres \n"}
    out = pipe(**commented, output_type="np", **SMALL)
    expected = pipe(**plain, output_type="np", **SMALL)
    assert np.array_equal(out.images[0], expected.images[0])
    assert out.infotexts == expected.infotexts  # the infotext carries the prompts without comments
    kept = pipe(**commented, output_type="np", prompt_comments=False, **SMALL)  # the comment text is read
    assert np.abs(kept.images[0] - expected.images[0]).max() > 1e-3


def test_hires_prompts_lose_their_comments_too(pipe: Pipeline) -> None:
    hires = {"hr_scale": 1.5, "hr_second_pass_steps": 2, "denoising_strength": 0.5}
    commented = pipe.prepare(prompt="1girl", enable_hr=True, hires_options={**hires, "hr_prompt": "cat # hidden"},
                             **SMALL)  # fmt: skip
    assert commented.hires is not None and commented.hires.prompt == "cat \n"
    assert "cat" in commented.hires_chunks and not any("hidden" in text for text in commented.hires_chunks)
    assert commented.hires.infotext["Hires prompt"] == "cat \n"


def test_prompt_comments_must_be_a_bool(pipe: Pipeline) -> None:
    with pytest.raises(InvalidRequestError) as error:
        pipe.prepare(prompt="1girl", prompt_comments="yes", **SMALL)
    assert error.value.field == "prompt_comments"


def test_cli_turns_comments_off_with_a_flag() -> None:
    from runtime.__main__ import parse_args

    assert parse_args(["--model", "m", "--prompt", "p"]).prompt_comments is True
    assert parse_args(["--model", "m", "--prompt", "p", "--no-prompt-comments"]).prompt_comments is False
