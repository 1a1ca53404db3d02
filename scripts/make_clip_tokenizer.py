"""Write CLIP's tokenizer files (vocab.json, merges.txt, tokenizer.json and configs) into models/.

No machine here can download them, but the open-clip-torch wheel ships CLIP's BPE merge list
(`open_clip/bpe_simple_vocab_16e6.txt.gz`). CLIP derives its vocabulary from that list: the 256
byte symbols, the same with an end-of-word mark, every merge result in order, then the two special
tokens (49408 ids in all).

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    python scripts/make_clip_tokenizer.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.text.tokenizer import BOS_TOKEN, EOS_TOKEN, build_clip_tokenizer

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the list
KNOWN_IDS = {"a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407]}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def read_bpe_list(source: Path) -> list[str]:
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = gzip.decompress(wheel.read(BPE_MEMBER))
    else:
        raw = gzip.decompress(source.read_bytes())
    lines = raw.decode("utf-8").split("\n")
    return lines[1 : MERGE_COUNT + 1]  # line 0 is a version header


def clip_vocab(merge_lines: list[str]) -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(line.split()) for line in merge_lines]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer_folder(source: Path, out: Path) -> None:
    merge_lines = read_bpe_list(source)
    vocab = clip_vocab(merge_lines)
    merges = [tuple(line.split()) for line in merge_lines]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")
    tokenizer = build_clip_tokenizer(vocab, merges)
    tokenizer.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for text, expected in KNOWN_IDS.items():
        got = tokenizer.encode(text).ids
        if got != expected:
            raise SystemExit(f"tokenizer check failed for {text!r}: {got} != {expected}")
    print(f"wrote {out} ({len(vocab)} tokens, {len(merges)} merges); known ids check passed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="open-clip-torch wheel, or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "tokenizer")
    args = parser.parse_args()
    write_tokenizer_folder(args.source, args.out)


if __name__ == "__main__":
    main()
