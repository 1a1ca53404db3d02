"""Record how the AUTOMATIC1111 web UI reads a large seeded corpus of prompts, for tests/test_a1111_corpus.py.

Needs a copy of the web UI's (v1.10) modules/prompt_parser.py and modules/extra_networks.py in one
folder, and lark importable (the web UI pins lark 1.1.2; lark's Earley parser picks among ambiguous
readings by its internal order, so the version matters). Neither is needed by the test, which only
reads the fixture. From the repository root:

    pip install --target /tmp/larklib lark==1.1.2
    PYTHONPATH=/tmp/larklib python scripts/make_a1111_prompt_fixture.py --a1111 /tmp/a1111

For every prompt, in the web UI's processing order:

- extra networks: modules/extra_networks.parse_prompt (the text with the tags taken out, and each
  tag's args), then, for `<lora:...>` and `<lyco:...>` (registered as an alias of lora), the values
  the built-in Lora extension reads from the args in ExtraNetworkLora.activate: name, text-encoder
  and UNet multipliers, dyn; or the error activate raises (the web UI then logs it and generates
  without the LoRAs). That extension needs torch and the whole web UI to import, so its few lines
  of reading are written out here (`_lora_activation`).
- get_multicond_prompt_list on the text: the `AND` parts and their weights.
- get_learned_conditioning_prompt_schedules for each part and for the whole text (the negative
  prompt is never split) at every step count in STEPS, the hires fix form in HIRES (first pass
  steps, second pass steps) and the old timelines at OLD_STEPS; or the error it raises.
- parse_prompt_attention on every distinct text of those schedules; or the error it raises.

The torch import at the end of prompt_parser.py is stubbed: nothing used here touches it.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import random
import subprocess
import sys
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "a1111_prompt_corpus.json.gz"
STEPS = (1, 10, 20, 28)
HIRES = ((20, 10), (10, 15))
OLD_STEPS = (20,)
AMBIGUITY_SEEDS = list(range(16))  # PYTHONHASHSEED values the schedules are recorded under


def schedule_configs() -> list[tuple[int, int | None, bool]]:
    """(steps, hires_steps, use_old_scheduling) for every schedule recorded, in fixture order."""
    plain = [(steps, None, False) for steps in STEPS]
    return plain + [(steps, hires, False) for steps, hires in HIRES] + [(steps, None, True) for steps in OLD_STEPS]


def load_web_ui(folder: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """The web UI's prompt_parser and extra_networks modules, importable without the web UI."""
    sys.modules.setdefault("torch", types.ModuleType("torch"))  # imported at prompt_parser's end, unused here
    package = types.ModuleType("modules")
    package.errors = types.ModuleType("modules.errors")  # extra_networks imports it for activate(), unused here
    sys.modules.update({"modules": package, "modules.errors": package.errors})
    loaded = []
    for name in ("prompt_parser", "extra_networks"):
        spec = importlib.util.spec_from_file_location(f"modules.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"modules.{name}"] = module
        spec.loader.exec_module(module)
        loaded.append(module)
    return loaded[0], loaded[1]


# ---- the corpus -------------------------------------------------------------------------------

WORDS = [
    "1girl", "solo", "a cat", "masterpiece", "best quality", "score_9", "it's", "red hair", "sunset",
    "mountain", "lake", "detailed eyes", "café", "naïve", "日本語", "猫", "🐱", "über", "ﬁsh", "Ｆｕｌｌ",
    "lowres", "bad hands", "smile", "frown", "BREAK", "AND", "and", "ANDROID", "BREAKfast", "x", "y",
]  # fmt: skip
SEPARATORS = [", ", " ", ",", "\n", "  ", "\t", ", ", " ", ""]
WEIGHTS = ["1.2", "0.8", "1.", ".5", "-1", "+1.3", "2", " 1.1 ", "0", "1.2.3", "1e3", "abc", "", "9" * 400, "1..2"]
WHENS = [
    "0.5", "10", "3", ".25", "1.5", "0", "-1", "100", "1.0", "2.0", " 5 ", "0.0", "1e1", "+3", "20", "25",
    "30", "0.99", "1", "-0.5", "1e999", "5.", "abc", "", "2.5e-1",
]  # fmt: skip
TAG_ARGS = [
    "name:0.8", "name:0.8:0.5", "name", "detail_tweaker:1", "name:te=0.5", "name:unet=0.2:te=1", "name:abc",
    "name:0.8:0.5:4", "name:dyn=4", ":1", "name:1e3", "name:nan", "name:inf", "a b:1", "name:-1.5",
    "name:0.8:unet=0", "name:foo=1", "name:1:2:3:4:5", "te=1", "name: 0.7", "x=y=z:1", "name:150",
]  # fmt: skip
TAG_KINDS = ["lora", "lora", "lora", "lyco", "hypernet", "foo", "LORA"]
NOISE = ["(", ")", "[", "]", ":", "|", "]::", "::", "\\", "<", ">", "[:", ":]", "(:", "|]", "[|", "\\(", "\\)"]
AND_WORDS = [" AND ", "AND", " AND", "\nAND\n"]
ESCAPES = ["\\(", "\\)", "\\[", "\\]", "\\\\", "\\n", "\\:", "\\|", "\\ "]


class _Corpus:
    """Random prompts from realistic pieces, some well formed, some hostile."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def prompt(self) -> str:
        choice = self.rng.random()
        if choice < 0.08:  # random characters, where the grammars' corner cases are
            return "".join(self.rng.choice("ab [](): |\\.05-AND<>:\n") for _ in range(self.rng.randint(1, 14)))
        pieces = [self.fragment(depth=0) for _ in range(self.rng.randint(1, 7))]
        text = "".join(piece + self.rng.choice(SEPARATORS) for piece in pieces)
        if choice < 0.3:
            text += f":{self.rng.choice(WEIGHTS)}"  # A1111's trailing weight of the (last) AND part
        return text

    def fragment(self, depth: int) -> str:
        makers: list[Callable[[int], str]] = [
            self.word, self.word, self.word, self.emphasis, self.weighted, self.deemphasis, self.edit,
            self.edit, self.alternate, self.and_join, self.lora, self.noise, self.escape, self.break_word,
        ]  # fmt: skip
        if depth >= 3:
            return self.word(depth)
        return self.rng.choice(makers)(depth + 1)

    def inner(self, depth: int) -> str:
        return "".join(self.fragment(depth) for _ in range(self.rng.randint(0, 2)))

    def word(self, depth: int) -> str:
        return self.rng.choice(WORDS)

    def emphasis(self, depth: int) -> str:
        count = self.rng.choice((1, 1, 2, 3))
        return "(" * count + self.inner(depth) + ")" * self.rng.choice((count, count, count - 1, count + 1))

    def weighted(self, depth: int) -> str:
        return f"({self.inner(depth)}:{self.rng.choice(WEIGHTS)})"

    def deemphasis(self, depth: int) -> str:
        return f"[{self.inner(depth)}]"

    def edit(self, depth: int) -> str:
        when = self.rng.choice(WHENS)
        form = self.rng.randrange(4)
        if form == 0:
            return f"[{self.inner(depth)}:{self.inner(depth)}:{when}]"
        if form == 1:
            return f"[{self.inner(depth)}:{when}]"
        if form == 2:
            return f"[{self.inner(depth)}::{when}]"
        return f"[{self.inner(depth)}:{self.inner(depth)}:{self.inner(depth)}:{when}]"  # too many colons

    def alternate(self, depth: int) -> str:
        options = [self.inner(depth) for _ in range(self.rng.randint(1, 4))]
        return "[" + "|".join(options) + ("|" if self.rng.random() < 0.2 else "") + "]"

    def and_join(self, depth: int) -> str:
        weight = f":{self.rng.choice(WEIGHTS)}" if self.rng.random() < 0.5 else ""
        return weight + self.rng.choice(AND_WORDS)

    def lora(self, depth: int) -> str:
        tag = f"<{self.rng.choice(TAG_KINDS)}:{self.rng.choice(TAG_ARGS)}>"
        if self.rng.random() < 0.1:
            return tag[: self.rng.randrange(1, len(tag))]  # cut short
        return tag

    def noise(self, depth: int) -> str:
        return self.rng.choice(NOISE)

    def escape(self, depth: int) -> str:
        return self.rng.choice(ESCAPES) + self.word(depth)

    def break_word(self, depth: int) -> str:
        return self.rng.choice((" BREAK ", "BREAK", "\nBREAK\n", " BREAK,"))


# ---- recording --------------------------------------------------------------------------------


def _error(exc: BaseException) -> dict:
    return {"error": type(exc).__name__}


def _lora_activation(params_list: list) -> list | dict:
    """What extensions-builtin/Lora/extra_networks_lora.py (v1.10) ExtraNetworkLora.activate reads
    from each tag's ExtraNetworkParams: [name, te, unet, dyn] per tag, or the error it raises.
    Name: the first positional; te: the second positional (float) else 1, `te=` overrides; unet:
    the third positional else te, `unet=` overrides; dyn: the fourth positional (int) else None,
    `dyn=` overrides."""
    read = []
    try:
        for params in params_list:
            te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te = float(params.named.get("te", te))
            unet = float(params.positional[2]) if len(params.positional) > 2 else te
            unet = float(params.named.get("unet", unet))
            dyn = int(params.positional[3]) if len(params.positional) > 3 else None
            dyn = int(params.named["dyn"]) if "dyn" in params.named else dyn
            read.append([params.positional[0], te, unet, dyn])
    except (ValueError, IndexError, OverflowError) as exc:
        return _error(exc)
    return read


class _Network:
    def __init__(self, name: str) -> None:
        self.name = name


def record_extra_networks(extra_networks: types.ModuleType, prompt: str) -> dict:
    """The text without tags, every tag (kind and args, in the web UI's order), and the LoRAs."""
    extra_networks.initialize()
    lora = _Network("lora")
    extra_networks.register_extra_network(lora)
    extra_networks.register_extra_network_alias(lora, "lyco")  # as the Lora extension registers it
    extra_networks.register_extra_network(_Network("hypernet"))  # a default network of the web UI
    text, data = extra_networks.parse_prompt(prompt)
    tags = [[kind, params.items] for kind, params_list in data.items() for params in params_list]
    found = extra_networks.lookup_extra_networks(data)
    return {"text": text, "tags": tags, "lora": _lora_activation(found.get(lora, []))}


def record_schedules(prompt_parser: types.ModuleType, text: str, configs: list) -> list:
    out = []
    for steps, hires, old in configs:
        try:
            out.append(prompt_parser.get_learned_conditioning_prompt_schedules([text], steps, hires, old)[0])
        except Exception as exc:  # the web UI fails on some input (int(inf)): record how
            out.append(_error(exc))
    return out


def run_workers(folder: Path, texts: list[str], configs: list, seeds: list[int]) -> list[list]:
    """Schedules of `texts` at `configs`, one worker process per hash seed (run side by side)."""
    command = [sys.executable, __file__, "--a1111", str(folder), "--worker", json.dumps(configs)]
    workers = [
        subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            text=True,
            encoding="utf-8",
        )
        for seed in seeds
    ]
    with ThreadPoolExecutor(len(workers)) as pool:
        outputs = list(pool.map(lambda worker: worker.communicate(json.dumps(texts))[0], workers))
    if any(worker.returncode for worker in workers):
        raise SystemExit("a schedule worker failed")
    return [json.loads(output) for output in outputs]


def web_ui_schedules(folder: Path, texts: list[str]) -> dict[str, list]:
    """Every text's schedules at every config. Where the web UI's grammar is ambiguous (stray brackets
    or colons next to editing), lark's Earley parser picks a reading by the order of hash sets, so
    the web UI's answer changes with Python's hash seed, that is from one start of the web UI to the
    next. Texts whose answer at one config differs between hash seeds are recorded at every config
    under every seed: {"any_of": [distinct answers]}."""
    configs = schedule_configs()
    probe = [configs.index((10, None, False))]
    [first] = run_workers(folder, texts, configs, [AMBIGUITY_SEEDS[0]])
    probed = run_workers(folder, texts, [configs[i] for i in probe], AMBIGUITY_SEEDS[1:])
    ambiguous = [i for i, text in enumerate(texts) if any(run[i][0] != first[i][probe[0]] for run in probed)]
    reruns = run_workers(folder, [texts[i] for i in ambiguous], configs, AMBIGUITY_SEEDS[1:])
    for k, i in enumerate(ambiguous):
        for c in range(len(configs)):
            answers = [first[i][c], *(run[k][c] for run in reruns)]
            distinct = [a for j, a in enumerate(answers) if a not in answers[:j]]
            first[i][c] = distinct[0] if len(distinct) == 1 else {"any_of": distinct}
    print(f"{len(ambiguous)} of {len(texts)} texts read differently under different hash seeds")
    return dict(zip(texts, first, strict=True))


def record_attention(prompt_parser: types.ModuleType, text: str) -> list | dict:
    try:
        return prompt_parser.parse_prompt_attention(text)
    except Exception as exc:  # `(x:1.2.3)`: float() fails there
        return _error(exc)


def record_case(prompt_parser: types.ModuleType, extra_networks: types.ModuleType, prompt: str) -> dict:
    extra = record_extra_networks(extra_networks, prompt)
    text = extra["text"]
    indexes, flat, _ = prompt_parser.get_multicond_prompt_list([text])
    parts = [[flat[index], weight] for index, weight in indexes[0]]
    return {"prompt": prompt, "extra": extra, "and": parts, "schedules": dict.fromkeys([text, *flat])}


def _scheduled_texts(answers: list) -> set[str]:
    """The texts of every schedule among one text's answers (any_of included)."""
    found = set()
    for answer in answers:
        for schedule in answer["any_of"] if isinstance(answer, dict) and "any_of" in answer else [answer]:
            if isinstance(schedule, list):
                found.update(text for _, text in schedule)
    return found


def add_schedules_and_attention(prompt_parser: types.ModuleType, folder: Path, cases: list[dict]) -> None:
    texts = sorted({text for case in cases for text in case["schedules"]})
    schedules = web_ui_schedules(folder, texts)
    for case in cases:
        case["schedules"] = {text: schedules[text] for text in case["schedules"]}
        scheduled = set().union(*(_scheduled_texts(answers) for answers in case["schedules"].values()))
        case["attention"] = {text: record_attention(prompt_parser, text) for text in sorted(scheduled)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a1111", type=Path, required=True, help="folder with prompt_parser.py, extra_networks.py")
    parser.add_argument("--count", type=int, default=3000, help="random prompts (plus the fixed ones)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON configs; texts on stdin
    args = parser.parse_args()
    import lark

    prompt_parser, extra_networks = load_web_ui(args.a1111)
    if args.worker:
        configs = json.loads(args.worker)
        print(json.dumps([record_schedules(prompt_parser, text, configs) for text in json.load(sys.stdin)]))
        return
    corpus = _Corpus(random.Random(args.seed))
    prompts = list(dict.fromkeys(corpus.prompt() for _ in range(args.count)))
    cases = [record_case(prompt_parser, extra_networks, prompt) for prompt in prompts]
    add_schedules_and_attention(prompt_parser, args.a1111, cases)
    meta = {
        "web_ui": "AUTOMATIC1111/stable-diffusion-webui v1.10 modules/prompt_parser.py, modules/extra_networks.py",
        "lark": lark.__version__,
        "seed": args.seed,
        "count": args.count,
        "schedule_configs": schedule_configs(),
        "hash_seeds": AMBIGUITY_SEEDS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out, "wt", encoding="utf-8", compresslevel=9) as file:
        json.dump({"meta": meta, "cases": cases}, file, ensure_ascii=False, separators=(",", ":"))
    print(f"wrote {args.out}: {len(cases)} prompts, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
