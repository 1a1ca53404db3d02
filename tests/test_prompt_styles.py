"""A1111's prompt styles (modules/styles.py): merging, applying in order, and reading styles.csv."""

from __future__ import annotations

import csv
import os
import typing
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.errors import InvalidRequestError, UserError
from runtime.text.styles import StyleLibrary, apply_styles, merge_prompts, read_styles, styled


# The reference: A1111's functions as written in modules/styles.py (stable-diffusion-webui 1.10).
def a1111_merge_prompts(style_prompt: str, prompt: str) -> str:
    if "{prompt}" in style_prompt:
        res = style_prompt.replace("{prompt}", prompt)
    else:
        parts = filter(None, (prompt.strip(), style_prompt.strip()))
        res = ", ".join(parts)
    return res


def a1111_apply_styles_to_prompt(prompt, styles):
    for style in styles:
        prompt = a1111_merge_prompts(style, prompt)
    return prompt


class A1111PromptStyle(typing.NamedTuple):
    name: str
    prompt: str
    negative_prompt: str


def a1111_load_from_csv(path) -> dict[str, A1111PromptStyle]:
    """StyleDatabase.load_from_csv, less the `path` field."""
    styles = {}
    with open(path, encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file, skipinitialspace=True)
        for row in reader:
            if not row or row["name"].startswith("#"):
                continue
            prompt = row["prompt"] if "prompt" in row else row["text"]
            negative_prompt = row.get("negative_prompt", "")
            styles[row["name"]] = A1111PromptStyle(row["name"], prompt, negative_prompt)
    return styles


PIECES = st.text(alphabet=" ,ab{}prompt", max_size=16)


@given(st.lists(PIECES, max_size=4), PIECES)
def test_applying_styles_is_a1111s(style_prompts: list[str], prompt: str) -> None:
    assert apply_styles(prompt, style_prompts) == a1111_apply_styles_to_prompt(prompt, style_prompts)
    if style_prompts:
        assert merge_prompts(style_prompts[0], prompt) == a1111_merge_prompts(style_prompts[0], prompt)


@pytest.mark.parametrize(
    "content",
    [
        '\ufeffname,prompt,negative_prompt\ncats, "cat ears, {prompt}", "lowres, dogs"\n'
        "# comment,x,y\nplain,masterpiece,\n",
        "name,text\nold,best quality\nold,later row wins\n",  # A1111's old two-column format
        'name, prompt, negative_prompt\n"a, b","x",""\n',
    ],
)
def test_styles_csv_is_read_as_a1111(tmp_path: Path, content: str) -> None:
    path = tmp_path / "styles.csv"
    path.write_text(content, encoding="utf-8")
    ours = {name: (s.name, s.prompt, s.negative_prompt) for name, s in read_styles(path).items()}
    assert ours == {name: tuple(style) for name, style in a1111_load_from_csv(path).items()}
    assert ours


def test_library_finds_styles_refuses_unknown_names_and_rereads(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    path.write_text("name,prompt,negative_prompt\ncats,{prompt} with cats,lowres\n", encoding="utf-8")
    library = StyleLibrary(path)
    found = library.find(["None", "cats", ""])  # "None" and "": A1111's no style
    assert styled("a girl", "", found) == ("a girl with cats", "lowres")
    with pytest.raises(InvalidRequestError) as error:
        library.find(["dogs"])
    assert error.value.field == "styles" and "'cats'" in error.value.message
    path.write_text("name,prompt\ndogs,dog\n", encoding="utf-8")
    os.utime(path, ns=(1, 1))  # a different modification time even on a coarse clock
    assert list(library.styles()) == ["dogs"]
    path.unlink()
    assert list(library.styles()) == ["dogs"]  # gone while serving: the styles read last stay
    with pytest.raises(UserError, match=r"styles\.csv"):
        StyleLibrary(path)
    path.write_text("title,prompt\nx,y\n", encoding="utf-8")
    with pytest.raises(UserError, match="name and prompt"):
        StyleLibrary(path)
    assert StyleLibrary(None).find(["None"]) == []
