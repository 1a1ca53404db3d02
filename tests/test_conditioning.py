"""Chunking and emphasis, with ids from the real CLIP tokenizer in models/tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.text.conditioning import (
    CHUNK_IDS,
    PromptChunks,
    apply_emphasis,
    empty_chunks,
    pad_to_chunk_count,
    prompt_to_chunks,
    unet_contexts,
)
from runtime.text.prompt_parser import is_break, parse_prompt_attention
from runtime.text.tokenizer import ClipTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "models" / "tokenizer"

BOS, EOS, COMMA = 49406, 49407, 267
A, CAT, DOG, BREAK_WORD = 320, 2368, 1929, 2568  # "a", "cat", "dog", "break" (lower-cased)


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer.from_folder(TOKENIZER_DIR)


def row(tokens: list[int]) -> list[int]:
    """The expected 77 ids of one chunk: BOS, tokens, EOS padding (SD1 pads with EOS)."""
    assert len(tokens) <= 75
    return [BOS, *tokens] + [EOS] * (76 - len(tokens))


def ids(chunks: PromptChunks) -> list[list[int]]:
    return chunks.token_ids.tolist()


def words(word: str, count: int) -> str:
    return " ".join([word] * count)


def test_tokenizer_ids_used_here(tokenizer: ClipTokenizer) -> None:
    special = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.comma_id)
    assert special == (BOS, EOS, EOS, COMMA)
    assert tokenizer.tokenize(["a", "cat", "dog", "BREAK", ","]) == [[A], [CAT], [DOG], [BREAK_WORD], [COMMA]]


def test_short_prompt(tokenizer: ClipTokenizer) -> None:
    chunks = prompt_to_chunks(tokenizer, "a cat")
    assert chunks.token_ids.dtype == np.int64 and chunks.weights.dtype == np.float32
    assert chunks.token_ids.shape == chunks.weights.shape == (1, CHUNK_IDS)
    assert ids(chunks) == [row([A, CAT])]
    assert np.all(chunks.weights == 1.0)


@pytest.mark.parametrize("prompt", ["", " ", "()", "[]"])
def test_empty_prompt_is_one_chunk_of_bos_and_76_eos(tokenizer: ClipTokenizer, prompt: str) -> None:
    chunks = prompt_to_chunks(tokenizer, prompt)
    assert ids(chunks) == [[BOS] + [EOS] * 76]
    assert np.all(chunks.weights == 1.0)


def test_exactly_75_tokens_fill_one_chunk(tokenizer: ClipTokenizer) -> None:
    assert ids(prompt_to_chunks(tokenizer, words("cat", 75))) == [[BOS] + [CAT] * 75 + [EOS]]


def test_76_tokens_spill_into_a_second_chunk(tokenizer: ClipTokenizer) -> None:
    assert ids(prompt_to_chunks(tokenizer, words("cat", 76))) == [[BOS] + [CAT] * 75 + [EOS], row([CAT])]


def test_150_and_151_tokens(tokenizer: ClipTokenizer) -> None:
    full = [BOS] + [CAT] * 75 + [EOS]
    assert ids(prompt_to_chunks(tokenizer, words("cat", 150))) == [full, full]
    assert ids(prompt_to_chunks(tokenizer, words("cat", 151))) == [full, full, row([CAT])]


def comma_prompt(cats: int, dogs: int) -> str:
    """`cats` cat tokens, one comma, then `dogs` dog tokens: the comma is token number `cats`."""
    return words("cat", cats) + ", " + words("dog", dogs)


def test_comma_backtrack_moves_the_words_after_the_last_comma(tokenizer: ClipTokenizer) -> None:
    # Comma at index 60 of a full chunk: 75 - 60 = 15 <= 20, so the 14 dogs after it move on.
    chunks = prompt_to_chunks(tokenizer, comma_prompt(60, 20))
    assert ids(chunks) == [row([CAT] * 60 + [COMMA]), row([DOG] * 20)]


def test_comma_backtrack_reach_is_inclusive(tokenizer: ClipTokenizer) -> None:
    # Comma at index 55: 75 - 55 = 20, just within reach: the 19 tokens after it move.
    assert ids(prompt_to_chunks(tokenizer, comma_prompt(55, 25))) == [
        row([CAT] * 55 + [COMMA]),
        row([DOG] * 25),
    ]
    # Comma at index 54: 21 back is out of reach; the chunk is cut at 75 tokens instead.
    assert ids(prompt_to_chunks(tokenizer, comma_prompt(54, 25))) == [
        [BOS] + [CAT] * 54 + [COMMA] + [DOG] * 20 + [EOS],
        row([DOG] * 5),
    ]


def test_comma_backtrack_option(tokenizer: ClipTokenizer) -> None:
    prompt = comma_prompt(60, 20)
    cut_at_75 = [[BOS] + [CAT] * 60 + [COMMA] + [DOG] * 14 + [EOS], row([DOG] * 6)]
    assert ids(prompt_to_chunks(tokenizer, prompt, comma_padding_backtrack=0)) == cut_at_75
    assert ids(prompt_to_chunks(tokenizer, prompt, comma_padding_backtrack=14)) == cut_at_75
    assert ids(prompt_to_chunks(tokenizer, prompt, comma_padding_backtrack=15)) == [
        row([CAT] * 60 + [COMMA]),
        row([DOG] * 20),
    ]


def test_comma_backtrack_needs_a_token_after_the_full_chunk(tokenizer: ClipTokenizer) -> None:
    # A chunk that ends full with nothing after it is left alone, comma or not.
    assert ids(prompt_to_chunks(tokenizer, comma_prompt(60, 14))) == [[BOS] + [CAT] * 60 + [COMMA] + [DOG] * 14 + [EOS]]


def test_comma_backtrack_uses_the_last_comma(tokenizer: ClipTokenizer) -> None:
    prompt = words("cat", 50) + ", " + words("cat", 10) + ", " + words("dog", 30)
    # Commas at 50 and 61; the later one wins: 13 dogs move.
    assert ids(prompt_to_chunks(tokenizer, prompt)) == [
        row([CAT] * 50 + [COMMA] + [CAT] * 10 + [COMMA]),
        row([DOG] * 30),
    ]


def test_comma_as_the_last_token_of_a_full_chunk(tokenizer: ClipTokenizer) -> None:
    # Comma at index 74: nothing to move, the next chunk starts with the next word.
    assert ids(prompt_to_chunks(tokenizer, comma_prompt(74, 3))) == [
        [BOS] + [CAT] * 74 + [COMMA] + [EOS],
        row([DOG] * 3),
    ]


def test_comma_that_overflows_opens_the_next_chunk(tokenizer: ClipTokenizer) -> None:
    assert ids(prompt_to_chunks(tokenizer, comma_prompt(75, 2))) == [
        [BOS] + [CAT] * 75 + [EOS],
        row([COMMA, DOG, DOG]),
    ]


def test_moved_tokens_keep_their_weights(tokenizer: ClipTokenizer) -> None:
    prompt = words("cat", 60) + ", " + "(" + words("dog", 20) + ":1.3)"
    chunks = prompt_to_chunks(tokenizer, prompt)
    assert ids(chunks) == [row([CAT] * 60 + [COMMA]), row([DOG] * 20)]
    assert np.all(chunks.weights[0] == 1.0)
    np.testing.assert_allclose(chunks.weights[1, 1:21], 1.3, rtol=1e-6)
    assert np.all(chunks.weights[1, 21:] == 1.0) and chunks.weights[1, 0] == 1.0


def test_break_ends_the_chunk(tokenizer: ClipTokenizer) -> None:
    assert ids(prompt_to_chunks(tokenizer, "a BREAK cat")) == [row([A]), row([CAT])]


def test_break_cases(tokenizer: ClipTokenizer) -> None:
    empty = row([])
    # A leading BREAK closes the (empty) first chunk.
    assert ids(prompt_to_chunks(tokenizer, "BREAK cat")) == [empty, row([CAT])]
    # Two BREAKs in a row leave an empty chunk between them.
    assert ids(prompt_to_chunks(tokenizer, "a BREAK BREAK cat")) == [row([A]), empty, row([CAT])]
    # A trailing BREAK adds nothing after it.
    assert ids(prompt_to_chunks(tokenizer, "a BREAK")) == [row([A])]
    assert ids(prompt_to_chunks(tokenizer, "BREAK")) == [empty]
    assert ids(prompt_to_chunks(tokenizer, "BREAK BREAK")) == [empty, empty]


def test_break_after_a_full_chunk_adds_no_empty_chunk(tokenizer: ClipTokenizer) -> None:
    assert ids(prompt_to_chunks(tokenizer, words("cat", 75) + " BREAK dog")) == [
        [BOS] + [CAT] * 75 + [EOS],
        row([DOG]),
    ]


def test_break_resets_the_comma_backtrack(tokenizer: ClipTokenizer) -> None:
    prompt = "cat, BREAK " + words("dog", 80)
    assert ids(prompt_to_chunks(tokenizer, prompt)) == [
        row([CAT, COMMA]),
        [BOS] + [DOG] * 75 + [EOS],
        row([DOG] * 5),
    ]


def test_break_inside_brackets_is_the_word_with_a_negative_weight(tokenizer: ClipTokenizer) -> None:
    # The web UI's quirk: brackets multiply the marker's weight, so it is no longer a marker.
    chunks = prompt_to_chunks(tokenizer, "(a BREAK cat)")
    assert ids(chunks) == [row([A, BREAK_WORD, CAT])]
    np.testing.assert_allclose(chunks.weights[0, 1:4], [1.1, -1.1, 1.1], rtol=1e-6)


def test_weight_lands_on_its_token(tokenizer: ClipTokenizer) -> None:
    chunks = prompt_to_chunks(tokenizer, "a (cat:1.3) [dog]")
    assert ids(chunks) == [row([A, CAT, DOG])]
    assert chunks.token_ids[0, 2] == CAT
    assert chunks.weights[0, 2] == np.float32(1.3)
    np.testing.assert_allclose(chunks.weights[0, :4], [1.0, 1.0, 1.3, 1 / 1.1], rtol=1e-6)
    assert np.all(chunks.weights[0, 4:] == 1.0)


def test_pieces_are_tokenized_separately(tokenizer: ClipTokenizer) -> None:
    # "cat(dog)" is the pieces "cat" and "dog", two words, never the one word "catdog".
    assert tokenizer.tokenize(["catdog"])[0] != [CAT, DOG]
    chunks = prompt_to_chunks(tokenizer, "cat(dog)")
    assert ids(chunks) == [row([CAT, DOG])]
    np.testing.assert_allclose(chunks.weights[0, 1:3], [1.0, 1.1], rtol=1e-6)


def test_escaped_brackets_are_tokenized(tokenizer: ClipTokenizer) -> None:
    [expected] = tokenizer.tokenize(["(cat)"])
    assert ids(prompt_to_chunks(tokenizer, r"\(cat\)")) == [row(expected)]


def test_empty_chunks_and_padding(tokenizer: ClipTokenizer) -> None:
    chunks = prompt_to_chunks(tokenizer, "a cat")
    padded = pad_to_chunk_count(chunks, 3, tokenizer)
    assert ids(padded) == [row([A, CAT]), row([]), row([])]
    assert padded.weights.dtype == np.float32 and np.all(padded.weights == 1.0)
    assert pad_to_chunk_count(chunks, 1, tokenizer) is chunks
    with pytest.raises(ValueError, match="cannot pad"):
        pad_to_chunk_count(padded, 2, tokenizer)
    assert ids(empty_chunks(2, tokenizer)) == [row([]), row([])]
    assert empty_chunks(0, tokenizer).token_ids.shape == (0, CHUNK_IDS)


_PROMPT_PARTS = st.sampled_from(
    ["cat", "dog", ",", "(", ")", "[", "]", ":1.2)", "BREAK", "masterpiece", "best quality", "1girl", "\\("]
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_PROMPT_PARTS, max_size=200).map(" ".join), st.sampled_from([0, 1, 20, 74]))
def test_fuzz_every_token_lands_once_in_order(tokenizer: ClipTokenizer, prompt: str, backtrack: int) -> None:
    chunks = prompt_to_chunks(tokenizer, prompt, backtrack)
    assert chunks.token_ids.shape == chunks.weights.shape == (chunks.count, CHUNK_IDS)
    assert np.all(chunks.token_ids[:, 0] == BOS) and np.all(chunks.token_ids[:, -1] == EOS)
    pieces = parse_prompt_attention(prompt)
    token_lists = tokenizer.tokenize([text for text, _ in pieces])
    kept = [(ts, weight) for ts, (text, weight) in zip(token_lists, pieces, strict=True) if not is_break(text, weight)]
    expected_tokens = [t for ts, _ in kept for t in ts]
    expected_weights = [weight for ts, weight in kept for _ in ts]
    body = chunks.token_ids[:, 1:-1]
    real = body != EOS  # these prompts never contain the end token itself
    assert body[real].tolist() == expected_tokens
    np.testing.assert_allclose(chunks.weights[:, 1:-1][real], np.float32(expected_weights), rtol=1e-6)
    assert np.all(chunks.weights[:, 1:-1][~real] == 1.0)
    breaks = sum(is_break(*piece) for piece in pieces)
    assert chunks.count >= breaks


# --- emphasis -------------------------------------------------------------------------------


def random_hidden(chunks: int, channels: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((chunks, CHUNK_IDS, channels)) + 0.3).astype(np.float32)


def test_emphasis_with_weights_one_is_identity() -> None:
    hidden = random_hidden(2)
    out = apply_emphasis(hidden, np.ones((2, CHUNK_IDS), np.float32))
    assert out.dtype == np.float32
    assert np.array_equal(out, hidden)


def test_emphasis_keeps_each_chunks_mean() -> None:
    hidden = random_hidden(3, seed=1)
    rng = np.random.default_rng(2)
    weights = rng.uniform(0.5, 1.6, size=(3, CHUNK_IDS)).astype(np.float32)
    out = apply_emphasis(hidden, weights)
    np.testing.assert_allclose(out.mean(axis=(1, 2), dtype=np.float64), hidden.mean(axis=(1, 2)), rtol=1e-5)


def test_emphasis_matches_the_formula() -> None:
    hidden = random_hidden(2, seed=3)
    weights = np.ones((2, CHUNK_IDS), np.float32)
    weights[0, 3] = 1.3
    weights[1, 5:9] = 1 / 1.1
    h = hidden.astype(np.float64)
    w = weights.astype(np.float64)[:, :, None]
    expected = h * w * (h.mean(axis=(1, 2)) / (h * w).mean(axis=(1, 2)))[:, None, None]
    np.testing.assert_allclose(apply_emphasis(hidden, weights), expected, rtol=1e-5, atol=1e-6)
    # Token 3 of chunk 0 is 1.3 times its neighbours' scale; chunk 1 is rescaled on its own.
    out = apply_emphasis(hidden, weights)
    scale = out[0, 0] / hidden[0, 0]
    np.testing.assert_allclose(out[0, 3] / hidden[0, 3], 1.3 * scale, rtol=1e-5)


def test_emphasis_chunks_are_independent() -> None:
    hidden = random_hidden(2, seed=4)
    weights = np.ones((2, CHUNK_IDS), np.float32)
    weights[1, 10] = 2.0
    out = apply_emphasis(hidden, weights)
    assert np.array_equal(out[0], hidden[0])
    assert not np.array_equal(out[1], hidden[1])


def test_emphasis_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        apply_emphasis(random_hidden(2), np.ones((1, CHUNK_IDS), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        apply_emphasis(np.zeros((CHUNK_IDS, 8), np.float32), np.ones((1, CHUNK_IDS), np.float32))


def test_emphasis_accepts_float16_and_returns_float32() -> None:
    hidden = random_hidden(1).astype(np.float16)
    out = apply_emphasis(hidden, np.ones((1, CHUNK_IDS), np.float32))
    assert out.dtype == np.float32
    assert np.array_equal(out, hidden.astype(np.float32))


def test_emphasis_on_real_chunk_weights(tokenizer: ClipTokenizer) -> None:
    chunks = prompt_to_chunks(tokenizer, "a (cat:1.3), " + words("dog", 90))
    hidden = random_hidden(chunks.count, seed=5)
    out = apply_emphasis(hidden, chunks.weights)
    assert out.shape == hidden.shape
    np.testing.assert_allclose(out.mean(axis=(1, 2)), hidden.mean(axis=(1, 2)), rtol=1e-5)
    assert np.array_equal(out[1], hidden[1])  # the second chunk has no emphasis at all


def test_unet_contexts_follow_a1111s_cfg_denoiser() -> None:
    """Shapes and order only (the images are checked against diffusers in test_prompt_conditioning):
    uncond first; parts stacked with the last vector repeated; two calls or padding by length."""
    one, two = np.full((77, 4), 1.0, np.float32), np.arange(154 * 4, dtype=np.float32).reshape(154, 4)
    empty = np.full((77, 4), -1.0, np.float32)
    [same] = unet_contexts([one], one * 2, pad=False, empty=None)
    assert same.shape == (2, 77, 4) and (same[0] == 2).all() and (same[1] == 1).all()
    uncond, conds = unet_contexts([one, two], one * 2, pad=False, empty=None)
    assert uncond.shape == (1, 77, 4) and conds.shape == (2, 154, 4)
    assert (conds[0, 77:] == one[-1]).all() and (conds[1] == two).all()  # stack_conds: last vector repeated
    [padded] = unet_contexts([one], two, pad=True, empty=empty)
    assert padded.shape == (2, 154, 4) and (padded[0] == two).all() and (padded[1, 77:] == -1).all()
    [padded] = unet_contexts([two], one, pad=True, empty=empty)
    assert (padded[0, :77] == 1).all() and (padded[0, 77:] == -1).all() and (padded[1] == two).all()
    [alone] = unet_contexts([one, two], None, pad=False, empty=None)
    assert alone.shape == (2, 154, 4)
