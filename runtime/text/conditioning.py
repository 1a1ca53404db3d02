"""Prompts as 75-token chunks with per-token weights, and A1111's "Original" emphasis.

This mirrors the web UI's modules/sd_hijack_clip.py (FrozenCLIPEmbedderWithCustomWordsBase:
tokenize_line, empty_chunk, process_tokens) and modules/sd_emphasis.py (EmphasisOriginal), so
that long and weighted prompts condition the UNet exactly as they do there:

- the prompt is parsed into weighted pieces (prompt_parser), every piece is tokenized on its own
  without BOS/EOS, and each token carries its piece's weight;
- tokens fill chunks of 75; when a chunk is full and a comma sits at most
  `comma_padding_backtrack` tokens back, the tokens after that comma move to the next chunk;
- a BREAK marker closes the current chunk, even an empty one;
- each chunk is padded to 75 and wrapped as BOS + 75 + EOS = 77 ids, with weight 1.0 on every
  added id; each chunk is encoded by CLIP on its own and the results are concatenated.

Textual-inversion embeddings are spliced in here too (runtime/text/embeddings.py): a name found in a
piece's tokens takes as many positions as the embedding has vectors, in the next chunk if it does
not fit in this one, with the piece's weight on each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .prompt_parser import is_break, parse_prompt_attention
from .tokenizer import ClipTokenizer

CHUNK_LENGTH = 75  # prompt tokens per chunk
CHUNK_IDS = CHUNK_LENGTH + 2  # with BOS and EOS: CLIP's 77


class EmbeddingFinder(Protocol):
    def find(self, tokens: list[int], position: int) -> tuple[list[int], int] | None:
        """(ids that stand for the embedding's vectors, prompt tokens its name took), or None."""


@dataclass(frozen=True, eq=False)
class PromptChunks:
    """One prompt as k chunks of 77 ids. (eq=False: numpy arrays have no single truth value.)"""

    token_ids: np.ndarray  # (k, 77) int64: BOS + 75 tokens or padding + EOS per chunk
    weights: np.ndarray  # (k, 77) float32: each token's emphasis, 1.0 on BOS/EOS/padding

    @property
    def count(self) -> int:
        return int(self.token_ids.shape[0])


def _split_into_chunks(
    token_lists: list[list[int]],
    pieces: list[tuple[str, float]],
    comma_id: int | None,
    comma_padding_backtrack: int,
    embeddings: EmbeddingFinder | None = None,
) -> list[tuple[list[int], list[float]]]:
    """The web UI's tokenize_line loop: distribute weighted tokens over chunks of at most 75."""
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in `tokens` of the latest comma of the open chunk, -1 if none

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for ids, (text, weight) in zip(token_lists, pieces, strict=True):
        if is_break(text, weight):
            close_chunk()  # unconditionally: "BREAK BREAK" or a leading BREAK gives empty chunks
            continue
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma_id:
                # Where the comma is about to go. If the chunk is full this is 75 and the
                # close_chunk() below forgets it, so a comma that opens a chunk is never a
                # backtrack point: the web UI behaves the same way.
                last_comma = len(tokens)
            elif (
                comma_padding_backtrack != 0
                and len(tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(tokens) - last_comma <= comma_padding_backtrack
            ):
                # The chunk is full and the next token is not a comma: end the chunk at the last
                # comma (within reach) and carry what followed it over, weights included.
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK_LENGTH:
                close_chunk()
            found = embeddings.find(ids, position) if embeddings is not None else None
            if found is None:
                tokens.append(token)
                weights.append(weight)
                position += 1
                continue
            vector_ids, consumed = found
            if len(tokens) + len(vector_ids) > CHUNK_LENGTH:
                close_chunk()  # an embedding is never split across chunks
            tokens.extend(vector_ids)
            weights.extend([weight] * len(vector_ids))
            position += consumed

    # A trailing partial chunk, or the single empty chunk of a prompt without tokens; not an
    # empty chunk after a final BREAK ("a BREAK" is one chunk).
    if tokens or not chunks:
        close_chunk()
    return chunks


def _chunk_row(tokens: list[int], weights: list[float], tokenizer: ClipTokenizer) -> tuple[list[int], list[float]]:
    """BOS + tokens + EOS, then padding to 77.

    The web UI pads with the end id and, where a model's pad id differs (SD2), turns everything
    after the first end id into pad ids (process_tokens); both give this layout. For SD1, where
    pad == eos, that is BOS, the tokens, then EOS up to the 77th id.
    """
    fill = CHUNK_LENGTH - len(tokens)
    ids = [tokenizer.bos_id, *tokens, tokenizer.eos_id] + [tokenizer.pad_id] * fill
    return ids, [1.0, *weights, 1.0] + [1.0] * fill


def _to_chunks(rows: list[tuple[list[int], list[float]]]) -> PromptChunks:
    return PromptChunks(
        token_ids=np.array([ids for ids, _ in rows], dtype=np.int64).reshape(len(rows), CHUNK_IDS),
        weights=np.array([weights for _, weights in rows], dtype=np.float32).reshape(len(rows), CHUNK_IDS),
    )


def prompt_to_chunks(
    tokenizer: ClipTokenizer,
    prompt: str,
    comma_padding_backtrack: int = 20,
    embeddings: EmbeddingFinder | None = None,
) -> PromptChunks:
    """Token ids and weights of one prompt, as many 77-id chunks as it needs (at least one).

    `comma_padding_backtrack` is the web UI's option of that name (default 20, 0 turns it off).
    """
    pieces = parse_prompt_attention(prompt)
    # One batch call, one text per piece: pieces are tokenized separately, as in the web UI, so
    # "cat(dog)" gives the tokens of "cat" and "dog", not those of the word "catdog".
    token_lists = tokenizer.tokenize([text for text, _ in pieces])
    chunks = _split_into_chunks(token_lists, pieces, tokenizer.comma_id, comma_padding_backtrack, embeddings)
    return _to_chunks([_chunk_row(tokens, weights, tokenizer) for tokens, weights in chunks])


def empty_chunks(count: int, tokenizer: ClipTokenizer) -> PromptChunks:
    """`count` empty chunks (BOS, EOS, padding; SD1: BOS + 76 x EOS), all weights 1."""
    return _to_chunks([_chunk_row([], [], tokenizer) for _ in range(count)])


def pad_to_chunk_count(chunks: PromptChunks, count: int, tokenizer: ClipTokenizer) -> PromptChunks:
    """Append empty chunks up to `count`; an empty chunk encodes to the empty prompt's states."""
    if count < chunks.count:
        raise ValueError(f"cannot pad {chunks.count} chunks down to {count}")
    if count == chunks.count:
        return chunks
    extra = empty_chunks(count - chunks.count, tokenizer)
    return PromptChunks(
        token_ids=np.concatenate([chunks.token_ids, extra.token_ids]),
        weights=np.concatenate([chunks.weights, extra.weights]),
    )


def apply_emphasis(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The web UI's "Original" emphasis on one prompt's encoder states (k, 77, C) -> float32.

    Per chunk: remember the mean of all its values, multiply each token's vector by its weight,
    then rescale the chunk so its mean is the remembered one. The web UI does this on the batch
    tensor of a chunk (batch, 77, C), taking one mean over the whole batch; for a batch of one
    prompt repeated (the only case here: one prompt per call), that mean is the mean of this
    chunk's (77, C) values.

    Elementwise products are in float32 as in torch; the two means are accumulated in float64,
    which only removes summation-order rounding. All weights 1 returns the input unchanged.
    """
    hidden = np.asarray(hidden, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float32)
    if hidden.ndim != 3 or weights.shape != hidden.shape[:2]:
        raise ValueError(f"hidden states {hidden.shape} and weights {weights.shape} do not match")
    weighted = hidden * weights[:, :, None]
    original_mean = hidden.mean(axis=(1, 2), dtype=np.float64)
    new_mean = weighted.mean(axis=(1, 2), dtype=np.float64)
    # The ratio is a float32 scalar in torch; a zero new mean gives inf/NaN there and here alike.
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (original_mean / new_mean).astype(np.float32)
    return (weighted * scale[:, None, None]).astype(np.float32, copy=False)


def encode_chunks(
    run_encoder: Callable[[np.ndarray], np.ndarray], chunks: dict[str, PromptChunks], tokenizer: ClipTokenizer
) -> dict[str, np.ndarray]:
    """Encoder states (77*k, C) of each text, k its own chunk count: all chunks through the text
    encoder in one batch, A1111's emphasis per text, chunks joined on the token axis.

    The batch needs one chunk count, so shorter texts ride along padded with empty chunks; CLIP
    encodes each chunk on its own and emphasis works per chunk, so dropping those rows again
    leaves exactly the states the text has alone."""
    items = list(chunks.items())
    count = max(item.count for _, item in items)
    padded = [pad_to_chunk_count(item, count, tokenizer) for _, item in items]
    hidden = run_encoder(np.concatenate([item.token_ids for item in padded]))
    states = {}
    for index, ((text, item), rows) in enumerate(zip(items, padded, strict=True)):
        emphasized = apply_emphasis(hidden[index * count : (index + 1) * count], rows.weights)
        states[text] = emphasized[: item.count].reshape(-1, emphasized.shape[-1])
    return states


def stack_parts(parts: list[np.ndarray]) -> np.ndarray:
    """The AND parts' states (n, L, C) for one UNet batch, L the longest part's length: shorter
    parts repeat their last token vector, as A1111's stack_conds does (not empty chunks)."""
    length = max(len(part) for part in parts)
    return np.stack([np.concatenate([part, np.repeat(part[-1:], length - len(part), axis=0)]) for part in parts])


def unet_contexts(
    parts: list[np.ndarray], uncond: np.ndarray | None, pad: bool, empty: np.ndarray | None
) -> list[np.ndarray]:
    """The UNet calls of one sampler step, as A1111's CFGDenoiser makes them: each (halves, L, C),
    the uncond half first when there is one.

    Parts and uncond of one length share one call. Otherwise A1111 (its default) runs the parts
    and the uncond as separate UNet calls, each attending over its own tokens; with its "Pad
    prompt/negative prompt" option (`pad`) the shorter side gets `empty` (one empty chunk's
    states, 77 x C) repeated instead, and one call serves both."""
    conds = stack_parts(parts)
    if uncond is None:
        return [conds]
    if pad and len(uncond) != conds.shape[1]:
        if empty is None:
            raise ValueError("padding needs the empty chunk's states")
        repeats = abs(conds.shape[1] - len(uncond)) // len(empty)
        if len(uncond) < conds.shape[1]:
            uncond = np.concatenate([uncond, np.tile(empty, (repeats, 1))])
        else:
            conds = np.concatenate([conds, np.tile(empty[None], (len(conds), repeats, 1))], axis=1)
    if len(uncond) == conds.shape[1]:
        return [np.concatenate([uncond[None], conds])]
    return [uncond[None], conds]
