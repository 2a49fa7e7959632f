"""Builds the demo's task: copy the name, age and city a sentence mentions into one line of JSON.

    python examples/data/contact_json/build.py   # rewrites train.jsonl and test.jsonl beside this file

Why this task: everything the answer needs is in the sentence, so a 135M model can learn it in a few minutes on a
CPU -- the skill is the format and the copying, not world knowledge (the earlier city-to-country task asked the
model for countries it did not know). The held-out split uses first names, surnames and cities that training
never shows, in the same sentence patterns, so exact match there means the model copies what it reads rather
than recalls what it saw. Deterministic: the same files on every machine.

The city pool (changed 2026-12-06, issue 29): 76 training cities, each shown two or three times, and 20 held-out
cities, each in two sentences (40 held-out rows; the sentence patterns and the 160 training rows as before). Why:
the first design showed training only 24 cities and held out 8 (x 5 sentences), and all of its misses were the one
held-out city Split -- inside the answer's quotes a word is tokenized without its leading space, `"Split` is there
one whole token of SmolLM2's tokenizer, while every training city was spelled there in pieces (`"Den|ver`), so the
model wrote `S` and could not spell the rest. A bigger pool teaches the copy over many more spellings, and 15 of
the training cities are whole tokens there (WHOLE_TRAIN; checked with the tokenizer, which has few such city names)
as 5 of the held-out ones are (WHOLE_HELD_OUT, Split kept among them): the same share, about one in five. With 20
held-out cities, one city is 5% of the score instead of 12.5%. Measured (examples/demo.py, 30 steps): 35/40
held-out before the change (five misses, all Split), 37/40 after it (TRL's seed 42) and 38/40 (seed 43); more in
docs/getting-started.md.
"""

import json
import random
from pathlib import Path

INSTRUCTION = "Extract the person's name, age and city from this text. Answer with JSON only."

FIRST = ["Maria", "James", "Aiko", "Omar", "Sofia", "Liam", "Chen", "Fatima", "Lucas", "Ingrid", "Ravi", "Elena",
         "Kwame", "Hannah", "Diego", "Yuki", "Noah", "Amara", "Pavel", "Leila", "Mateo", "Greta", "Tariq", "Nina",
         "Felix", "Priya", "Oscar", "Zara", "Hugo", "Mei", "Anton", "Isla", "Kofi", "Clara", "Emil", "Rosa",
         "Arjun", "Vera", "Jonas", "Lina", "Marco", "Ayla", "Bruno", "Dalia", "Tomas", "Ines", "Sami", "Olga"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Rossi", "Murphy", "Wang", "Khan", "Silva", "Berg", "Patel",
        "Novak", "Mensah", "Fischer", "Garcia", "Sato", "Brown", "Okafor", "Ivanov", "Rahimi", "Costa", "Larsen",
        "Aziz", "Petrov", "Weber", "Sharma", "Nilsson", "Hussein", "Moreau", "Liu", "Kowalski", "Reid", "Boateng",
        "Keller", "Lund", "Ortiz", "Iyer", "Popescu", "Vogel", "Dahl", "Romano", "Yilmaz", "Duarte", "Salem",
        "Horvat", "Ferreira", "Nakamura", "Volkova"]
# Cities whose quoted form (`"City` in the answer) is one token of SmolLM2's tokenizer, and cities spelled there in
# pieces; none shares a word with a first name or surname above.
WHOLE_TRAIN = ["London", "Chicago", "Rome", "Paris", "Boston", "Reading", "Madison", "Mobile", "Oxford", "Newton",
               "Jackson", "Cambridge", "Washington", "Male", "Golden"]
PIECES_TRAIN = ["Denver", "Lyon", "Osaka", "Porto", "Leeds", "Perth", "Austin", "Bergen", "Gdansk", "Seville",
                "Quebec", "Tucson", "Malmo", "Cork", "Graz", "Turin", "Busan", "Pune", "Accra", "Lima", "Fresno",
                "Dresden", "Nantes", "Hobart", "Berlin", "Madrid", "Vienna", "Dublin", "Oslo", "Milan", "Naples",
                "Munich", "Hamburg", "Zurich", "Geneva", "Basel", "Lisbon", "Athens", "Cairo", "Delhi", "Mumbai",
                "Dallas", "Houston", "Miami", "Seattle", "Toronto", "Ottawa", "Sydney", "Tokyo", "Kyoto", "Seoul",
                "Manila", "Bangkok", "Nairobi", "Lagos", "Dubai", "Moscow", "Warsaw", "Bristol", "Glasgow", "Verona"]
WHOLE_HELD_OUT = ["Split", "Bern", "Darwin", "Perm", "Lincoln"]
PIECES_HELD_OUT = ["Tampere", "Bilbao", "Utrecht", "Brno", "Kobe", "Omaha", "Aarhus", "Ghent", "Quito", "Dakar",
                   "Riga", "Kazan", "Cebu", "Tunis", "Kigali"]

SENTENCES = [
    "{name}, {age}, lives in {city}.",
    "Hi, I'm {name}. I'm {age} years old and I live in {city}.",
    "New member: {name} from {city}, age {age}.",
    "{name} ({age}) just moved to {city} for work.",
    "Please update the record: {name} is {age} and now based in {city}.",
    "Our speaker today, {name}, is {age} and flew in from {city}.",
    "From {city}: {name}, {age} years old, won the chess tournament.",
    "At {age}, {name} opened a bakery in {city}.",
    "Contact: {name}, {city}. Age: {age}.",
    "{name} turned {age} last week and celebrated in {city}.",
]

TRAIN, HELD_OUT = 160, 40


def example(rng: random.Random, firsts: list, lasts: list, city: str) -> dict:
    name, age = f"{rng.choice(firsts)} {rng.choice(lasts)}", rng.randint(18, 89)
    text = rng.choice(SENTENCES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {"prompt": [{"role": "user", "content": f"{INSTRUCTION}\n{text}"}],
            "completion": [{"role": "assistant", "content": answer}]}


def spread(rng: random.Random, cities: list, rows: int) -> list:
    """`rows` cities in which every city comes as often as the others, give or take one, in a shuffled order: so
    training shows every city of its pool and each held-out city has the same weight in the score."""
    order = []
    while len(order) < rows:
        order += rng.sample(cities, len(cities))
    return order[:rows]


def build() -> tuple[list[dict], list[dict]]:
    """Training rows from the first three quarters of each name list and the training cities; held-out rows from the
    rest of the names and the held-out cities."""
    rng = random.Random(0)
    cut = lambda names: (names[: len(names) * 3 // 4], names[len(names) * 3 // 4:])  # noqa: E731
    (f_train, f_test), (l_train, l_test) = cut(FIRST), cut(LAST)
    train = [example(rng, f_train, l_train, city) for city in spread(rng, WHOLE_TRAIN + PIECES_TRAIN, TRAIN)]
    test = [example(rng, f_test, l_test, city) for city in spread(rng, WHOLE_HELD_OUT + PIECES_HELD_OUT, HELD_OUT)]
    return train, test


def main() -> None:
    here = Path(__file__).resolve().parent
    train, test = build()
    for name, rows in (("train", train), ("test", test)):
        (here / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(train)} training and {len(test)} held-out examples in {here}")


if __name__ == "__main__":
    main()
