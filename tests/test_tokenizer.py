"""Our tokenizer (the `tokenizers` library on tokenizer.json, or on vocab.json + merges.txt) gives
the ids of transformers' CLIPTokenizer, the tokenizer diffusers uses, on a corpus of prompts."""

from __future__ import annotations

import shutil

import pytest

from conftest import REPO
from runtime.errors import ModelFolderError
from runtime.tokenizer import ClipTokenizer

transformers = pytest.importorskip("transformers")

TOKENIZER_DIR = REPO / "models" / "tokenizer"
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
    "ﬁligature ＦＵＬＬＷＩＤＴＨ",
    "<|startoftext|> special <|endoftext|> tokens",
    "word " * 100,  # far past 77 tokens: truncation
    "a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q,r,s,t,u,v,w,x,y,z," * 4,
    "http://example.com/path?query=1&x=y",
]


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


def test_known_clip_ids(ours):
    assert ours.encode_padded("a photo of a cat")[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.comma_id) == (49406, 49407, 49407, 267)


def test_folder_without_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFolderError, match="no tokenizer"):
        ClipTokenizer.from_folder(tmp_path)
