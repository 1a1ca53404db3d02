"""Our tokenizer (the `tokenizers` library on tokenizer.json, or on vocab.json + merges.txt) gives
the ids of transformers' CLIPTokenizer, the tokenizer diffusers uses, on a corpus of prompts, and
the ids of the A1111 web UI's tokenizer (transformers 4's slow CLIPTokenizer with ftfy) on text
that ftfy repairs: curly quotes, ligatures, full-width characters, HTML entities, mojibake."""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest

from conftest import REPO
from runtime.errors import ModelFolderError
from runtime.text.tokenizer import ClipTokenizer, clean_text

transformers = pytest.importorskip("transformers")

TOKENIZER_DIR = REPO / "models" / "tokenizer"
# Written by scripts/clip_slow_reference_ids.py with transformers 4.46.3's slow CLIPTokenizer and
# ftfy (transformers 5, installed here, no longer has the slow tokenizer).
SLOW_REFERENCE = json.loads((REPO / "tests" / "data" / "clip_slow_tokenizer_ids.json").read_text(encoding="utf-8"))
# Plain text, on which ftfy changes nothing: transformers 5's CLIPTokenizer is the reference.
CORPUS = [
    "a photo of a cat",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile",
    "",
    "   leading and trailing spaces   ",
    "Tabs\tand\nnew\r\nlines",
    "UPPER lower MiXeD",
    "punctuation!!! ??? ... ,,, ;;; :: -- __ ++ == ## @@",
    "(emphasis:1.3), [de-emphasis], {braces}, <lora:name:0.8>",
    "numbers 1234567890 3.14159 1e10 2nd 21st",
    "it's can't we're they've I'm you'll he'd",
    "Café naïve résumé Ångström façade",
    "日本語のプロンプト、少女、桜",
    "한국어 프롬프트",
    "emoji 😀🎨🌸 and ❤️ hearts",
    "combining e\u0301 vs precomposed é",  # NFC folds them together
    "<|startoftext|> special <|endoftext|> tokens",
    "word " * 100,  # far past 77 tokens: truncation
    "a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q,r,s,t,u,v,w,x,y,z," * 4,
    "http://example.com/path?query=1&x=y",
]
for text in CORPUS:
    assert clean_text(text) == unicodedata.normalize("NFC", " ".join(text.split())).lower(), f"not plain: {text!r}"


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab+merges"])
def ours(request, tmp_path_factory) -> ClipTokenizer:
    folder = tmp_path_factory.mktemp("tok")
    names = ["tokenizer.json"] if request.param == "tokenizer.json" else ["vocab.json", "merges.txt"]
    for name in names:
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    return ClipTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' CLIPTokenizer from vocab.json + merges.txt only, as ACertainThing ships it."""
    folder = tmp_path_factory.mktemp("ref")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("text", CORPUS)
def test_ids_equal_transformers_clip_tokenizer(ours, reference, text):
    expected = reference(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours.encode_padded(text) == list(expected)


@pytest.mark.parametrize("case", SLOW_REFERENCE["cases"], ids=lambda case: repr(case["text"][:40]))
def test_ids_equal_the_web_uis_slow_tokenizer_with_ftfy(ours, case):
    assert ours.tokenize([case["text"]])[0] == case["ids"]


def test_reference_covers_what_ftfy_repairs():
    """The recorded corpus holds text that the fast tokenizer alone would get wrong."""
    fast = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    differing = [
        case["text"] for case in SLOW_REFERENCE["cases"]
        if fast(case["text"], add_special_tokens=False).input_ids != case["ids"]
    ]  # fmt: skip
    assert len(differing) >= 8, differing
    for marker in ("’", "ﬁ", "ＦＵＬＬ", "&amp;", "â€™", "😀", "<|endoftext|>", "<|ENDOFTEXT|>", "ΟΔΥΣΣΕΥΣ"):
        assert any(marker in case["text"] for case in SLOW_REFERENCE["cases"]), marker


def test_literal_end_token_is_the_end_id(ours):
    assert ours.tokenize(["a<|endoftext|>b"])[0] == [*ours.tokenize(["a"])[0], 49407, *ours.tokenize(["b"])[0]]


def test_known_clip_ids(ours):
    assert ours.encode_padded("a photo of a cat")[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.comma_id) == (49406, 49407, 49407, 267)


def test_folder_without_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFolderError, match="no tokenizer"):
        ClipTokenizer.from_folder(tmp_path)
