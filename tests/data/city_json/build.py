"""Builds the real-model task: pull the city out of a sentence and name its country, answered as one line of JSON.

    python tests/data/city_json/build.py      # rewrites train.jsonl and test.jsonl beside this file

Why this task: it is the kind of small structured-extraction job people fine-tune small models for; an
instruct model answers it in chatty prose before training and in the exact format after; and the held-out
split uses cities the training split never shows, so its loss needs the country knowledge the *pretrained*
weights carry -- which is what 4-bit storage must not lose (NF4 vs FP4, docs/benchmarks.md).
Deterministic: the same files on every machine.
"""

import json
import random
from pathlib import Path

INSTRUCTION = "Extract the city from this sentence and name its country. Answer with JSON only."

CITIES = [
    ("Lyon", "France"), ("Marseille", "France"), ("Toulouse", "France"), ("Bordeaux", "France"),
    ("Munich", "Germany"), ("Hamburg", "Germany"), ("Cologne", "Germany"), ("Frankfurt", "Germany"),
    ("Milan", "Italy"), ("Naples", "Italy"), ("Florence", "Italy"), ("Venice", "Italy"), ("Turin", "Italy"),
    ("Barcelona", "Spain"), ("Seville", "Spain"), ("Valencia", "Spain"), ("Bilbao", "Spain"),
    ("Porto", "Portugal"), ("Lisbon", "Portugal"), ("Amsterdam", "Netherlands"), ("Rotterdam", "Netherlands"),
    ("Brussels", "Belgium"), ("Antwerp", "Belgium"), ("Zurich", "Switzerland"), ("Geneva", "Switzerland"),
    ("Vienna", "Austria"), ("Salzburg", "Austria"), ("Prague", "Czech Republic"), ("Krakow", "Poland"),
    ("Warsaw", "Poland"), ("Budapest", "Hungary"), ("Stockholm", "Sweden"), ("Gothenburg", "Sweden"),
    ("Oslo", "Norway"), ("Bergen", "Norway"), ("Copenhagen", "Denmark"), ("Helsinki", "Finland"),
    ("Dublin", "Ireland"), ("Edinburgh", "United Kingdom"), ("Manchester", "United Kingdom"),
    ("Liverpool", "United Kingdom"), ("Athens", "Greece"), ("Istanbul", "Turkey"), ("Moscow", "Russia"),
    ("Kyiv", "Ukraine"), ("Cairo", "Egypt"), ("Nairobi", "Kenya"), ("Lagos", "Nigeria"),
    ("Cape Town", "South Africa"), ("Johannesburg", "South Africa"), ("Casablanca", "Morocco"),
    ("Tokyo", "Japan"), ("Osaka", "Japan"), ("Kyoto", "Japan"), ("Seoul", "South Korea"), ("Busan", "South Korea"),
    ("Beijing", "China"), ("Shanghai", "China"), ("Mumbai", "India"), ("Delhi", "India"), ("Bangalore", "India"),
    ("Bangkok", "Thailand"), ("Hanoi", "Vietnam"), ("Jakarta", "Indonesia"), ("Manila", "Philippines"),
    ("Singapore", "Singapore"), ("Sydney", "Australia"), ("Melbourne", "Australia"), ("Perth", "Australia"),
    ("Auckland", "New Zealand"), ("Toronto", "Canada"), ("Vancouver", "Canada"), ("Montreal", "Canada"),
    ("Chicago", "United States"), ("Boston", "United States"), ("Seattle", "United States"),
    ("Houston", "United States"), ("Miami", "United States"), ("Mexico City", "Mexico"),
    ("Guadalajara", "Mexico"), ("Havana", "Cuba"), ("Bogota", "Colombia"), ("Lima", "Peru"),
    ("Santiago", "Chile"), ("Buenos Aires", "Argentina"), ("Sao Paulo", "Brazil"), ("Rio de Janeiro", "Brazil"),
    ("Dubai", "United Arab Emirates"), ("Tehran", "Iran"), ("Karachi", "Pakistan"), ("Dhaka", "Bangladesh"),
    ("Kathmandu", "Nepal"), ("Reykjavik", "Iceland"), ("Riga", "Latvia"), ("Vilnius", "Lithuania"),
    ("Tallinn", "Estonia"), ("Bucharest", "Romania"), ("Sofia", "Bulgaria"), ("Belgrade", "Serbia"),
    ("Zagreb", "Croatia"), ("Addis Ababa", "Ethiopia"), ("Accra", "Ghana"), ("Tunis", "Tunisia"),
]

SENTENCES = [
    "I flew into {city} last spring for a conference.",
    "My sister just moved to {city} for a new job.",
    "The train from {city} was two hours late this morning.",
    "We spent our honeymoon in {city} and loved the food.",
    "Our company is opening a new office in {city} next year.",
    "He grew up in {city} before studying abroad.",
    "The marathon in {city} drew thousands of runners.",
    "She bought this scarf at a market in {city}.",
    "The weather in {city} was warmer than we expected.",
    "They are filming a documentary about the history of {city}.",
]

HELD_OUT = 40  # cities seen only in test.jsonl


def example(sentence: str, city: str, country: str) -> dict:
    answer = json.dumps({"city": city, "country": country})
    return {"prompt": [{"role": "user", "content": f"{INSTRUCTION}\n{sentence.format(city=city)}"}],
            "completion": [{"role": "assistant", "content": answer}]}


def build() -> tuple[list[dict], list[dict]]:
    rng = random.Random(0)
    cities = CITIES[:]
    rng.shuffle(cities)
    held, seen = cities[:HELD_OUT], cities[HELD_OUT:]
    train = [example(s, c, k) for c, k in seen for s in rng.sample(SENTENCES, 3)]
    rng.shuffle(train)
    train = train[:150]
    test = [example(rng.choice(SENTENCES), c, k) for c, k in held]
    return train, test


def main() -> None:
    here = Path(__file__).resolve().parent
    train, test = build()
    for name, rows in (("train", train), ("test", test)):
        (here / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(train)} training and {len(test)} held-out examples in {here}")


if __name__ == "__main__":
    main()
