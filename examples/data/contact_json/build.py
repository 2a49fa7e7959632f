"""Builds the demo's task: copy the name, age and city a sentence mentions into one line of JSON.

    python examples/data/contact_json/build.py   # rewrites train.jsonl and test.jsonl beside this file

Why this task: everything the answer needs is in the sentence, so a 135M model can learn it in a few minutes on a
CPU -- the skill is the format and the copying, not world knowledge (the earlier city-to-country task asked the
model for countries it did not know). The held-out split uses first names, surnames and cities that training
never shows, in the same sentence patterns, so exact match there means the model copies what it reads rather
than recalls what it saw. Deterministic: the same files on every machine.
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
CITIES = ["Denver", "Lyon", "Osaka", "Porto", "Leeds", "Perth", "Austin", "Bergen", "Gdansk", "Seville", "Quebec",
          "Tucson", "Malmo", "Cork", "Graz", "Turin", "Busan", "Pune", "Accra", "Lima", "Fresno", "Dresden",
          "Nantes", "Hobart", "Tampere", "Split", "Bilbao", "Utrecht", "Brno", "Kobe", "Omaha", "Aarhus"]

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


def example(rng: random.Random, firsts: list, lasts: list, cities: list) -> dict:
    name, age, city = f"{rng.choice(firsts)} {rng.choice(lasts)}", rng.randint(18, 89), rng.choice(cities)
    text = rng.choice(SENTENCES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {"prompt": [{"role": "user", "content": f"{INSTRUCTION}\n{text}"}],
            "completion": [{"role": "assistant", "content": answer}]}


def build() -> tuple[list[dict], list[dict]]:
    """Training rows from the first three quarters of each name and city list; held-out rows from the rest."""
    rng = random.Random(0)
    cut = lambda names: (names[: len(names) * 3 // 4], names[len(names) * 3 // 4:])  # noqa: E731
    (f_train, f_test), (l_train, l_test), (c_train, c_test) = cut(FIRST), cut(LAST), cut(CITIES)
    train = [example(rng, f_train, l_train, c_train) for _ in range(TRAIN)]
    test = [example(rng, f_test, l_test, c_test) for _ in range(HELD_OUT)]
    return train, test


def main() -> None:
    here = Path(__file__).resolve().parent
    train, test = build()
    for name, rows in (("train", train), ("test", test)):
        (here / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(train)} training and {len(test)} held-out examples in {here}")


if __name__ == "__main__":
    main()
