"""Regenerate the demo assets shipped in ``lightning_slide/app/assets/``.

    python -m lightning_slide.app.make_assets

Writes ``demo.jsonl`` (conversations about an invented atlas: cities, their countries, rivers and trades, two
questions and answers each, some with a system message) and ``tokenizer/`` (a byte-level BPE tokenizer trained on
that text, with role tokens and a chat template). Deterministic and offline: the facts come from a seeded random
generator and the tokenizer is trained with the ``tokenizers`` library, so nothing is downloaded. The facts are
invented so that what the demo model learns is visibly learned, not remembered from pre-training.
"""

import json
import random
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
SEED = 0
CITIES = 96
VOCAB_SIZE = 1024
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Each message is its role token, its content and <|eos|>: a reply ends with the token generation stops at.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] "
    "+ eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SYSTEM = "You are a guide to the atlas. Answer in one sentence."

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "vel"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "n", "r", "s", "l", "m", "th", "nd", "rk", "sk"]
_COUNTRIES = ["Arvenia", "Beloria", "Castavar", "Dunmere", "Estoria", "Fennwick", "Galdera", "Halvorn"]
_RIVERS = ["Oll", "Sarn", "Ivel", "Tamsa", "Rhune", "Kest", "Wend", "Moryn", "Lethe", "Ambra", "Tor", "Velka"]
_TRADES = [
    "glass",
    "salt",
    "wool",
    "copper",
    "silk",
    "clocks",
    "bread",
    "paper",
    "ships",
    "cheese",
    "maps",
    "bells",
    "honey",
    "lanterns",
    "rope",
    "tea",
]

_TEMPLATES = [
    ("Where is {city}?", "{city} lies in {country}, on the river {river}."),
    ("In which country is {city}?", "{city} is in {country}."),
    ("Which country is {city} in?", "{city} is a city of {country}."),
    ("What is {city} known for?", "{city} is known for its {trade}."),
    ("What does {city} make?", "The people of {city} make {trade}."),
    ("Which river flows through {city}?", "The river {river} flows through {city}."),
    ("On which river is {city}?", "{city} is on the river {river}."),
    (
        "Tell me about {city}.",
        "{city} is a city in {country}. It lies on the river {river} and is known for its {trade}.",
    ),
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


def make_city_pairs(rng: random.Random, cities: int = CITIES) -> list[list[dict]]:
    """For each invented city, every template filled in with its facts: ``{"prompt", "response"}`` pairs."""
    names: list[str] = []
    while len(names) < cities:
        name = _name(rng)
        if name not in names:
            names.append(name)
    per_city = []
    for city in names:
        facts = {
            "city": city,
            "country": rng.choice(_COUNTRIES),
            "river": rng.choice(_RIVERS),
            "trade": rng.choice(_TRADES),
        }
        for key, options in (("other", _COUNTRIES), ("other_river", _RIVERS), ("other_trade", _TRADES)):
            wrong = {"other": "country", "other_river": "river", "other_trade": "trade"}[key]
            facts[key] = rng.choice([o for o in options if o != facts[wrong]])
        per_city.append([{"prompt": p.format(**facts), "response": r.format(**facts)} for p, r in _TEMPLATES])
    return per_city


def make_conversations(seed: int = SEED, cities: int = CITIES) -> list[dict]:
    """Two questions and answers about one city per conversation (a third of them open with a system message),
    shuffled: ``cities * len(_TEMPLATES) / 2`` records ``{"messages": [{"role": ..., "content": ...}, ...]}``."""
    rng = random.Random(seed)
    conversations = []
    for pairs in make_city_pairs(rng, cities):
        rng.shuffle(pairs)
        for first, second in zip(pairs[::2], pairs[1::2]):
            messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 1 / 3 else []
            for pair in (first, second):
                messages += [
                    {"role": "user", "content": pair["prompt"]},
                    {"role": "assistant", "content": pair["response"]},
                ]
            conversations.append({"messages": messages})
    rng.shuffle(conversations)
    return conversations


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """A byte-level BPE (any text encodes) that prepends ``<|bos|>`` like Llama's; saved for ``AutoTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS.values(), *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=256,
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=ROLE_TOKENS,
        **SPECIAL_TOKENS,
    ).save_pretrained(out_dir)


def main() -> None:
    conversations = make_conversations()
    ASSETS.mkdir(exist_ok=True)
    with open(ASSETS / "demo.jsonl", "w") as f:
        for conversation in conversations:
            f.write(json.dumps(conversation) + "\n")
    texts = [m["content"] for c in conversations for m in c["messages"]]
    train_tokenizer(texts, ASSETS / "tokenizer")
    print(f"wrote {len(conversations)} conversations and a tokenizer to {ASSETS}")


if __name__ == "__main__":
    main()
