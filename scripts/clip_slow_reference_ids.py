"""Write tests/data/clip_slow_tokenizer_ids.json: the token ids that the A1111 web UI's tokenizer
gives for a corpus of prompts (transformers 4's slow, pure-Python CLIPTokenizer with ftfy
installed; transformers 5 no longer has it).

Run it in a separate environment, not the project's:
    python -m venv /tmp/clipref && /tmp/clipref/bin/pip install "transformers==4.46.3" "tokenizers<0.21" ftfy
    /tmp/clipref/bin/python scripts/clip_slow_reference_ids.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ftfy
import transformers

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "data" / "clip_slow_tokenizer_ids.json"

CORPUS = [
    "a photo of a cat",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile",
    "",
    "   leading and trailing spaces   ",
    "Tabs\tand\nnew\r\nlines",
    "UPPER lower MiXeD",
    "it’s a “quoted” ‘word’ — with dashes – and … ellipsis",
    "don’t can’t they’re I’m you’ll he’d",
    "ﬁligature ﬂower ﬀ ﬃ ﬆ",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３ ＃！？",
    "cats &amp; dogs, &lt;tag&gt;, &quot;hi&quot;, &#39;x&#39;, &amp;amp; twice, &nbsp;space",
    "itâ€™s mojibake, cafÃ© naÃ¯ve, â€œquotedâ€\x9d",
    "emoji 😀🎨🌸 and ❤️ hearts, 👩‍👩‍👧 family, 🇯🇵 flag",
    "combining e\u0301 vs precomposed é, Å vs A\u030a",
    "no\u00a0break\u2003em\u3000ideographic spaces and zero\u200bwidth",
    "<|endoftext|>",
    "<|ENDOFTEXT|> upper-case end token, <|EndOfText|> mixed",  # lower-cased before CLIP's split
    "ΟΔΥΣΣΕΥΣ, ΣΟΦΙΑ ΚΑΙ ΟΔΥΣΣΕΥΣ ΣΣ Σ.",  # Python's lower(): a word-final Σ becomes ς
    "before<|endoftext|>after <|startoftext|> both",
    "&lt;|endoftext|&gt; escaped",
    "Café naïve résumé Ångström façade",
    "日本語のプロンプト、少女、桜",
    "한국어 프롬프트",
    "numbers 1234567890 3.14159 1e10 2nd 21st",
    "(emphasis:1.3), [de-emphasis], {braces}, <lora:name:0.8>",
    "http://example.com/path?query=1&amp;x=y",
    "<b>bold &amp; html</b>",
    "word " * 100,
    "a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q,r,s,t,u,v,w,x,y,z," * 4,
    "masterpiece, best quality, ultra-detailed, illustration, 1girl, solo, long hair, “silver” hair, "
    "red eyes, it’s raining, ﬂowers, ＣＩＴＹ lights &amp; neon, night sky, stars, 🌙, looking at viewer, "
    "smile, school uniform, pleated skirt, thighhighs, outdoors, cherry blossoms, wind, depth of field",
]


def main() -> None:
    if not transformers.__version__.startswith("4."):
        sys.exit(f"needs transformers 4 (slow CLIPTokenizer), found {transformers.__version__}")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(REPO / "models" / "tokenizer"))
    if tokenizer.fix_text is None:
        sys.exit("the slow CLIPTokenizer did not pick up ftfy")
    # As the web UI calls it (sd_hijack_clip.py): no special tokens added, no truncation.
    ids = tokenizer(CORPUS, truncation=False, add_special_tokens=False)["input_ids"]
    record = {
        "reference": f"transformers {transformers.__version__} slow CLIPTokenizer, ftfy {ftfy.__version__}",
        "cases": [{"text": text, "ids": row} for text, row in zip(CORPUS, ids, strict=True)],
    }
    OUT.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(CORPUS)} cases to {OUT}")


if __name__ == "__main__":
    main()
