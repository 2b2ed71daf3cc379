"""Regenerate titan_cp's shipped training assets: a small English corpus and a tiny BPE tokenizer.

Everything is produced offline and deterministically (fixed seeds), so the
default CPU run needs no network:

    titan_cp/assets/data/tiny_corpus.jsonl     one {"text": ...} document per line
    titan_cp/assets/data/tiny_corpus_validation.jsonl  held-out documents (another seed, none
                                               equal to a training document): validation, evaluation
    titan_cp/assets/tokenizer/tokenizer.json   byte-level BPE, vocab 1024
    titan_cp/assets/tokenizer/tokenizer_config.json  bos/eos for TorchTitan's HuggingFaceTokenizer

The corpus is written by a small template grammar (stories, letters, weather
reports, recipes, arithmetic facts, lists) so it is public-domain by
construction, has document lengths spread from a few dozen to several hundred
words (packed sequences then contain real document boundaries), and enough
repeated structure for a tiny model's loss to fall in a few steps.

Usage: python -m tools.build_assets [--out titan_cp/assets] [--docs 800] [--vocab 1024]
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import tyro

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"

NAMES = ["Ada", "Bram", "Clara", "Dov", "Elsa", "Finn", "Greta", "Hugo", "Iris", "Jonas", "Kira", "Lars",
         "Mira", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tilda", "Uma", "Viktor", "Wren", "Yara"]
ANIMALS = ["fox", "heron", "badger", "otter", "sparrow", "goat", "hare", "owl", "beetle", "crow", "mole", "trout"]
PLACES = ["the old mill", "the harbour", "a quiet valley", "the market square", "the northern forest",
          "a small island", "the river bank", "the lighthouse", "the library", "the orchard", "the high pass"]
OBJECTS = ["a brass key", "a wooden box", "a red lantern", "a torn map", "a silver coin", "a loaf of bread",
           "a clay jar", "a woollen scarf", "a fishing net", "a music box", "a compass", "a bundle of letters"]
ADJ = ["quiet", "bright", "cold", "gentle", "stubborn", "curious", "tired", "clever", "patient", "brave",
       "small", "ancient", "restless", "careful", "kind", "proud"]
VERBS_PAST = ["found", "carried", "lost", "mended", "hid", "painted", "traded", "opened", "buried", "cleaned"]
FEELINGS = ["happy", "worried", "surprised", "calm", "grateful", "uneasy", "hopeful", "sleepy"]
WEATHER = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "stormy", "mild"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
INGREDIENTS = ["flour", "butter", "onions", "carrots", "barley", "apples", "honey", "salt", "milk", "eggs",
               "lentils", "cabbage", "thyme", "pepper"]
ACTIONS = ["chop", "stir", "boil", "bake", "mix", "slice", "simmer", "roast", "whisk", "season"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]


def _sentence_story(r: random.Random, hero: str, animal: str) -> str:
    templates = [
        lambda: f"{hero} walked to {r.choice(PLACES)} and {r.choice(VERBS_PAST)} {r.choice(OBJECTS)}.",
        lambda: f"The {r.choice(ADJ)} {animal} watched {hero} from a distance.",
        lambda: f"{hero} felt {r.choice(FEELINGS)} because the day was {r.choice(WEATHER)}.",
        lambda: f"At {r.choice(PLACES)}, {r.choice(NAMES)} told {hero} a story about a {r.choice(ADJ)} {r.choice(ANIMALS)}.",
        lambda: f"\"Where did you find {r.choice(OBJECTS)}?\" asked {r.choice(NAMES)}.",
        lambda: f"The {animal} {r.choice(VERBS_PAST)} {r.choice(OBJECTS)} and ran toward {r.choice(PLACES)}.",
        lambda: f"{hero} was {r.choice(ADJ)} and {r.choice(ADJ)}, and never gave up.",
        lambda: f"By evening the sky over {r.choice(PLACES)} was {r.choice(WEATHER)} again.",
    ]
    return r.choice(templates)()


def doc_story(r: random.Random) -> str:
    hero, animal = r.choice(NAMES), r.choice(ANIMALS)
    title = f"The {r.choice(ADJ).title()} {animal.title()}"
    paras = []
    for _ in range(r.randint(1, 5)):
        paras.append(" ".join(_sentence_story(r, hero, animal) for _ in range(r.randint(2, 7))))
    ending = f"And so {hero} and the {animal} became friends. The end."
    return title + "\n\n" + "\n\n".join(paras) + "\n\n" + ending


def doc_letter(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    lines = [f"Dear {b},", ""]
    for _ in range(r.randint(2, 6)):
        lines.append(
            f"I hope you are {r.choice(FEELINGS)}. Here the weather has been {r.choice(WEATHER)} "
            f"since {r.choice(DAYS)}, and I {r.choice(VERBS_PAST)} {r.choice(OBJECTS)} near {r.choice(PLACES)}."
        )
    lines += ["", f"With {r.choice(['love', 'best wishes', 'warm regards'])},", a]
    return "\n".join(lines)


def doc_weather(r: random.Random) -> str:
    out = ["Weather report for the week."]
    for day in DAYS[: r.randint(3, 7)]:
        hi = r.randint(-5, 30)
        out.append(f"{day}: {r.choice(WEATHER)}, high of {hi} degrees, low of {hi - r.randint(2, 12)} degrees.")
    return "\n".join(out)


def doc_recipe(r: random.Random) -> str:
    items = r.sample(INGREDIENTS, r.randint(3, 7))
    out = [f"Recipe: {r.choice(ADJ)} {items[0]} soup", "", "Ingredients:"]
    out += [f"- {r.randint(1, 5)} cups of {x}" for x in items]
    out += ["", "Steps:"]
    for i in range(r.randint(3, 8)):
        out.append(f"{i + 1}. {r.choice(ACTIONS).title()} the {r.choice(items)} for {r.randint(2, 40)} minutes.")
    return "\n".join(out)


def doc_arithmetic(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(5, 25)):
        a, b = r.randint(0, 6), r.randint(0, 6)
        if r.random() < 0.5:
            out.append(f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.")
        else:
            out.append(f"{a} + {b} = {a + b}")
    return "\n".join(out)


def doc_list(r: random.Random) -> str:
    kind = r.choice(["animals", "names", "places"])
    pool = {"animals": ANIMALS, "names": NAMES, "places": PLACES}[kind]
    items = r.sample(pool, r.randint(3, len(pool)))
    return f"A list of {kind}:\n" + "\n".join(f"{i + 1}. {x}" for i, x in enumerate(items))


GENERATORS = [(doc_story, 5), (doc_letter, 2), (doc_weather, 1), (doc_recipe, 1), (doc_arithmetic, 1), (doc_list, 1)]


def build_corpus(n_docs: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    gens = [g for g, w in GENERATORS for _ in range(w)]
    return [r.choice(gens)(r) for _ in range(n_docs)]


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@dataclass
class Args:
    out: Path = Path(__file__).resolve().parents[1] / "titan_cp" / "assets"
    """the package's asset folder (data/ and tokenizer/ are written below it)"""
    docs: int = 800
    """training documents"""
    vocab: int = 1024
    """BPE vocabulary size"""
    seed: int = 0
    val_docs: int = 100
    """held-out documents (those equal to a training one are dropped)"""
    val_seed: int = 1


def main() -> None:
    args = tyro.cli(Args, prog="python -m tools.build_assets", description=__doc__.splitlines()[0], use_underscores=True)

    texts = build_corpus(args.docs, args.seed)
    seen = set(texts)
    held_out = [t for t in build_corpus(args.val_docs, args.val_seed) if t not in seen]
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, docs in (("tiny_corpus.jsonl", texts), ("tiny_corpus_validation.jsonl", held_out)):
        with open(data_dir / name, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in docs)

    tok_dir = args.out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(texts, args.vocab)
    tok.save(str(tok_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
    }
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    n_chars = sum(len(t) for t in texts)
    n_tokens = sum(len(tok.encode(t).ids) for t in texts)
    print(f"corpus: {len(texts)} docs, {n_chars / 1024:.0f} KiB, {n_tokens} tokens; "
          f"tokenizer: vocab {tok.get_vocab_size()} -> {tok_dir}")


if __name__ == "__main__":
    main()
