"""Regenerate the demo assets shipped in ``lightning_slide/app/assets/``.

    python -m lightning_slide.app.make_assets

Writes ``demo.jsonl`` (prompt/response pairs about an invented atlas: cities, their countries, rivers and trades)
and ``tokenizer/`` (a byte-level BPE tokenizer trained on that text). Deterministic and offline: the facts come from
a seeded random generator and the tokenizer is trained with the ``tokenizers`` library, so nothing is downloaded.
The facts are invented so that what the demo model learns is visibly learned, not remembered from pre-training.
"""

import json
import random
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
SEED = 0
CITIES = 96
VOCAB_SIZE = 1024
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "vel"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "n", "r", "s", "l", "m", "th", "nd", "rk", "sk"]
_COUNTRIES = ["Arvenia", "Beloria", "Castavar", "Dunmere", "Estoria", "Fennwick", "Galdera", "Halvorn"]
_RIVERS = ["Oll", "Sarn", "Ivel", "Tamsa", "Rhune", "Kest", "Wend", "Moryn", "Lethe", "Ambra", "Tor", "Velka"]
_TRADES = ["glass", "salt", "wool", "copper", "silk", "clocks", "bread", "paper", "ships", "cheese", "maps",
           "bells", "honey", "lanterns", "rope", "tea"]

_TEMPLATES = [
    ("Where is {city}?", "{city} lies in {country}, on the river {river}."),
    ("In which country is {city}?", "{city} is in {country}."),
    ("Which country is {city} in?", "{city} is a city of {country}."),
    ("What is {city} known for?", "{city} is known for its {trade}."),
    ("What does {city} make?", "The people of {city} make {trade}."),
    ("Which river flows through {city}?", "The river {river} flows through {city}."),
    ("On which river is {city}?", "{city} is on the river {river}."),
    ("Tell me about {city}.", "{city} is a city in {country}. It lies on the river {river} and is known for its "
                              "{trade}."),
    ("Describe {city} in one sentence.", "{city} is a {trade} town on the {river} in {country}."),
    ("I am travelling to {city}. What should I buy?", "Buy {trade}: {city} is famous for it."),
    ("Name the river and the country of {city}.", "River {river}, country {country}."),
    ("Is {city} in {other}?", "No, {city} is in {country}, not {other}."),
    ("Where can I find {city}?", "You can find {city} in {country}, by the river {river}."),
    ("Which country does {city} belong to?", "{city} belongs to {country}."),
    ("What is the main trade of {city}?", "The main trade of {city} is {trade}."),
    ("What is {city} famous for?", "{city} is famous for its {trade}."),
    ("Which river runs past {city}?", "The {river} runs past {city}."),
    ("What river is {city} built on?", "{city} is built on the {river}."),
    ("Give me two facts about {city}.", "{city} is in {country}, and it makes {trade}."),
    ("How do I get to {city}?", "Go to {country} and follow the river {river} to {city}."),
    ("Is {city} on the river {other_river}?", "No, {city} is on the river {river}, not the {other_river}."),
    ("Does {city} make {other_trade}?", "No, {city} makes {trade}."),
    ("Summarize {city}.", "{city}: {country}, river {river}, {trade}."),
    ("Where do the people of {city} live?", "The people of {city} live in {country}, on the {river}."),
]


def _name(rng: random.Random) -> str:
    syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.choice([2, 2, 3]))]
    return "".join(syllables).capitalize()


def make_examples(seed: int = SEED, cities: int = CITIES) -> list[dict]:
    """Every template for every invented city, shuffled: ``cities * len(_TEMPLATES)`` prompt/response pairs."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < cities:
        name = _name(rng)
        if name not in names:
            names.append(name)
    examples = []
    for city in names:
        facts = {"city": city, "country": rng.choice(_COUNTRIES), "river": rng.choice(_RIVERS),
                 "trade": rng.choice(_TRADES)}
        for key, options in (("other", _COUNTRIES), ("other_river", _RIVERS), ("other_trade", _TRADES)):
            wrong = {"other": "country", "other_river": "river", "other_trade": "trade"}[key]
            facts[key] = rng.choice([o for o in options if o != facts[wrong]])
        for prompt, response in _TEMPLATES:
            examples.append({"prompt": prompt.format(**facts), "response": " " + response.format(**facts)})
    rng.shuffle(examples)
    return examples


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """A byte-level BPE (any text encodes) that prepends ``<|bos|>`` like Llama's; saved for ``AutoTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=256, **SPECIAL_TOKENS).save_pretrained(out_dir)


def main() -> None:
    examples = make_examples()
    ASSETS.mkdir(exist_ok=True)
    with open(ASSETS / "demo.jsonl", "w") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
    train_tokenizer([e["prompt"] + e["response"] for e in examples], ASSETS / "tokenizer")
    print(f"wrote {len(examples)} examples and a tokenizer to {ASSETS}")


if __name__ == "__main__":
    main()
