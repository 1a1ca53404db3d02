"""CLIP BPE tokenizer on the `tokenizers` library, as Stable Diffusion 1.x uses it.

A model folder may carry a `tokenizer.json` (what transformers 5 saves) or only the classic
`vocab.json` + `merges.txt` pair (what ACertainThing's repository has); both load here.

Text is cleaned first as the A1111 web UI's tokenizer cleans it: the web UI runs transformers 4's
slow `CLIPTokenizer`, which (ftfy being in the web UI's requirements) repairs every text with
ftfy's `fix_text` and folds whitespace before BPE. So `it’s`, `“quoted”`, `ﬁ`, `ＦＵＬＬ`, `&amp;`
and mojibake such as `itâ€™s` give the ids they give there. HTML entities are unescaped by
`fix_text` itself, once, and only in text without `<` or `>` (ftfy's "auto" rule): transformers
does not apply the original CLIP's double `html.unescape`, so neither do we. The literal
`<|endoftext|>` in a prompt, in any case, is the end token (49407), as there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ftfy
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import ModelFolderError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context: BOS + 75 tokens + EOS

# CLIP's own split pattern: special tokens, English contractions, letter runs, single digits and
# runs of other non-space characters.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """transformers' slow CLIPTokenizer cleaning: ftfy's fix_text, runs of whitespace folded to one
    space, the ends stripped, then Python's lower(). The tokenizer's own Lowercase normalizer
    (kept for tokenizer.json files used alone) folds one character at a time; Python's lower()
    knows context: a word-final `Σ` becomes `ς`, as in the web UI. Lower-casing before the
    special tokens are matched also makes `<|ENDOFTEXT|>` the end token, as CLIP's split pattern
    matches it there after the slow tokenizer lower-cased it."""
    return _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip().lower()


def build_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """Assemble CLIP's pipeline: NFC + whitespace folding + lowercase, CLIP's split, byte-level BPE
    with an end-of-word suffix, and BOS/EOS added around every encoding."""
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=EOS_TOKEN,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Positional arguments: the keyword for the second one changed name across tokenizers releases.
    tokenizer.post_processor = processors.RobertaProcessing(
        (EOS_TOKEN, vocab[EOS_TOKEN]), (BOS_TOKEN, vocab[BOS_TOKEN]), False, False
    )
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in (BOS_TOKEN, EOS_TOKEN)])
    return tokenizer


def read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional `#version` header, then one `left right` pair per line."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        left, right = line.split()
        pairs.append((left, right))
    return pairs


def load_tokenizer_files(folder: Path) -> Tokenizer:
    """Load `tokenizer.json` if the folder has one, else build it from `vocab.json` + `merges.txt`."""
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        return Tokenizer.from_file(str(tokenizer_json))
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        return build_clip_tokenizer(vocab, read_merges(merges_file))
    raise ModelFolderError(f"{folder} has no tokenizer: expected tokenizer.json, or vocab.json with merges.txt")


class ClipTokenizer:
    """Token ids for prompts. Text is split into weighted pieces before tokenizing (A1111 syntax),
    so the main entry point returns ids without BOS/EOS; `encode_padded` gives SD's 77-id rows."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.bos_id = self._required_id(BOS_TOKEN)
        self.eos_id = self._required_id(EOS_TOKEN)
        # SD1 pads with the end token (its tokenizer config says pad_token=<|endoftext|>).
        self.pad_id = self.eos_id
        self.comma_id = self._tokenizer.token_to_id(",</w>")

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClipTokenizer:
        return cls(load_tokenizer_files(Path(folder)))

    def _required_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelFolderError(f"tokenizer has no {token} token: not a CLIP tokenizer")
        return token_id

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text without BOS/EOS and without truncation, after A1111's text cleaning."""
        encodings = self._tokenizer.encode_batch([clean_text(text) for text in texts], add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def encode_padded(self, text: str, max_length: int = MAX_LENGTH) -> list[int]:
        """The plain SD encoding: BOS, ids truncated to fit, EOS, padded to max_length."""
        ids = self.tokenize([text])[0][: max_length - 2]
        row = [self.bos_id, *ids, self.eos_id]
        return row + [self.pad_id] * (max_length - len(row))
