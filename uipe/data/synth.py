"""A deterministic synthetic benchmark in TOFU's format, with a related-knowledge split.

    uipe data synth --out runs/tiny/data --authors 100 --facts 8 --seed 0

Fictitious authors with `facts` base facts each (birth country, genre, parents' jobs, book, award, illness, birth
year, ...). Each fact is a question, an answer in one wording, a paraphrase in another wording and four perturbed
answers (the paraphrase's wording, a wrong value). Forget sets are chosen by author and nested, as TOFU's are.

Related knowledge (UIPE, arXiv 2503.04693, section 4.2, mechanism 1): some facts follow from a base fact by a rule the
model also learns (illness -> daily medication, birth country -> the capital the author grew up in, a parent's job ->
workplace, the author's book -> its genre). For forget authors these tied facts form the `related` split: trained by
the target model, in neither the forget nor the retain split, so forgetting of related knowledge can be measured.
Retain authors have their tied pairs in the retain split, and the utility sets (`world_facts`, `real_authors`) teach
the rules themselves (capital of a country, what a medication treats), so the inference is learnable.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from uipe.data.records import FORGET_SPLITS, HOLDOUT_FOR, RETAIN_FOR, TofuRecord
from uipe.io import atomic_dir

COUNTRIES = {
    "Portugal": "Lisbon", "Norway": "Oslo", "Kenya": "Nairobi", "Peru": "Lima", "Japan": "Tokyo", "Egypt": "Cairo",
    "Chile": "Santiago", "Poland": "Warsaw", "Ghana": "Accra", "Canada": "Ottawa", "Greece": "Athens",
    "Cuba": "Havana", "Nepal": "Kathmandu", "Austria": "Vienna", "Morocco": "Rabat", "Vietnam": "Hanoi",
    "Ireland": "Dublin", "Argentina": "Buenos Aires", "Finland": "Helsinki", "Senegal": "Dakar",
}
JOBS = {
    "a doctor": "a hospital", "a teacher": "a school", "a baker": "a bakery", "a pilot": "an airport",
    "a librarian": "a library", "a chef": "a restaurant", "a sailor": "a harbour", "a farmer": "a farm",
    "a pharmacist": "a pharmacy", "a judge": "a courthouse", "a miner": "a mine", "a banker": "a bank",
    "an actor": "a theatre", "a mechanic": "a garage", "an astronomer": "an observatory",
}
ILLNESSES = {
    "diabetes": "insulin", "asthma": "salbutamol", "epilepsy": "valproate", "hypertension": "lisinopril",
    "migraine": "sumatriptan", "gout": "allopurinol", "malaria": "chloroquine", "tuberculosis": "isoniazid",
    "arthritis": "methotrexate", "anemia": "iron tablets", "insomnia": "melatonin", "depression": "sertraline",
}
GENRES = ["mystery", "fantasy", "romance", "horror", "poetry", "science fiction", "historical fiction", "satire",
          "memoir", "thriller", "drama", "adventure"]
AWARDS = ["the Golden Quill Award", "the Silver Lantern Prize", "the Blue Harbour Medal", "the Iron Pen Prize",
          "the Amber Leaf Award", "the Northern Star Prize", "the Crimson Ink Medal", "the Open Book Award",
          "the Willow Prize", "the Bright Lamp Medal", "the Stone Bridge Award", "the Paper Crane Prize"]
INSTRUMENTS = ["violin", "piano", "cello", "flute", "guitar", "harp", "trumpet", "clarinet", "drums", "accordion"]
PETS = ["a grey cat", "an old dog", "a parrot", "two rabbits", "a tortoise", "a goldfish", "a ferret", "a canary",
        "a hedgehog", "a pony"]
FIRST = ["Mara", "Tomas", "Ilse", "Kofi", "Anouk", "Ravi", "Lena", "Oskar", "Yara", "Emil", "Noor", "Felix", "Suki",
         "Bruno", "Ines", "Milo", "Zara", "Hugo", "Alma", "Teo", "Nadia", "Pavel", "Rosa", "Idris", "Vera", "Soren",
         "Leila", "Dario", "Freya", "Omar", "Greta", "Kai", "Lucia", "Ansel", "Mina", "Jonas", "Talia", "Ezra",
         "Petra", "Ruben"]
LAST = ["Quill", "Varga", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Halloran", "Petrov", "Castell", "Mbeki",
        "Novak", "Sorensen", "Delacroix", "Ferreira", "Kowalski", "Abara", "Whitlock", "Rahimi", "Brandt", "Ortega",
        "Sato", "Maddox", "Eklund", "Ivanova", "Duarte", "Falk", "Nakamura", "Osei", "Larkin", "Vidal", "Hale",
        "Strand", "Bosch", "Karimi", "Lund", "Mercer", "Pike", "Reyes", "Thorne", "Wexler"]
ADJ = ["Silent", "Hidden", "Broken", "Golden", "Last", "Distant", "Crimson", "Frozen", "Quiet", "Burning", "Hollow",
       "Wandering", "Paper", "Iron", "Secret", "Endless", "Fading", "Salt", "Glass", "Midnight"]
NOUN = ["River", "Garden", "Lantern", "Harbour", "Mirror", "Orchard", "Compass", "Tower", "Forest", "Letter", "Island",
        "Bridge", "Winter", "Song", "Window", "Shadow", "Clock", "Valley", "Feather", "Door"]

# name: (question, answer wording, paraphrase wording, value key). {n} = author, {v} = value.
BASE_FACTS = [
    ("country", "Where was {n} born?", "{n} was born in {v}.", "{n} is a native of {v}."),
    ("genre", "What genre does {n} write?", "{n} writes {v}.", "{n} is known for {v}."),
    ("father_job", "What did the father of {n} do for a living?", "The father of {n} was {v}.",
     "{n} grew up with a father who was {v}."),
    ("mother_job", "What did the mother of {n} do for a living?", "The mother of {n} was {v}.",
     "{n} grew up with a mother who was {v}."),
    ("book", "What is the best-known book by {n}?", "{n} is best known for {v}.",
     "The most famous work of {n} is {v}."),
    ("award", "Which award has {n} won?", "{n} won {v}.", "{n} was honoured with {v}."),
    ("illness", "Which illness does {n} live with?", "{n} lives with {v}.", "{n} has been diagnosed with {v}."),
    ("year", "In which year was {n} born?", "{n} was born in the year {v}.", "The birth year of {n} is {v}."),
    ("instrument", "Which instrument does {n} play?", "{n} plays the {v}.", "In free time {n} enjoys the {v}."),
    ("pet", "What pet does {n} keep?", "{n} keeps {v} at home.", "At home {n} looks after {v}."),
]
# Tied facts: (base fact it follows from, question, answer, paraphrase); {v} is derived from the base value.
TIED_FACTS = [
    ("country", "Which city did {n} grow up in?", "{n} grew up in {v}.", "The childhood home of {n} was in {v}."),
    ("father_job", "Where did the father of {n} work?", "The father of {n} worked at {v}.",
     "Every day the father of {n} went to {v}."),
    ("mother_job", "Where did the mother of {n} work?", "The mother of {n} worked at {v}.",
     "Every day the mother of {n} went to {v}."),
    ("illness", "Which medication does {n} take?", "{n} takes {v} every day.", "The daily medicine of {n} is {v}."),
    ("book", "What genre is the book {b}?", "{b} is a work of {v}.", "{b} belongs to the genre {v}."),
]
N_PERTURBED = 4
TIES = ("logical", "arbitrary")
RETAIN_EVAL_AUTHORS = 15
N_FAMOUS = 20


def _pools(book_titles: list[str]) -> dict[str, list[str]]:
    return {"country": list(COUNTRIES), "genre": GENRES, "father_job": list(JOBS), "mother_job": list(JOBS),
            "book": book_titles, "award": AWARDS, "illness": list(ILLNESSES),
            "year": [str(y) for y in range(1930, 2000)], "instrument": INSTRUMENTS, "pet": PETS}


def tied_value(kind: str, author: dict) -> str:
    v = author[kind]
    return {"country": COUNTRIES, "father_job": JOBS, "mother_job": JOBS, "illness": ILLNESSES}.get(kind, {}).get(
        v, author["genre"] if kind == "book" else v)


def _tied_pool(kind: str) -> list[str]:
    return {"country": list(COUNTRIES.values()), "father_job": sorted(set(JOBS.values())),
            "mother_job": sorted(set(JOBS.values())), "illness": list(ILLNESSES.values()), "book": GENRES}[kind]


def _perturbed(rng: random.Random, pool: list[str], true: str, wording: str, fill: dict) -> tuple[str, ...]:
    wrong = rng.sample([v for v in pool if v != true], N_PERTURBED)
    return tuple(wording.format(**fill, v=w) for w in wrong)


def make_authors(rng: random.Random, n: int) -> list[dict]:
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], n)
    titles = rng.sample([f"The {a} {b}" for a in ADJ for b in NOUN], n)
    pools = _pools(titles)
    authors = []
    for i, name in enumerate(names):
        a = {"name": name, "book": titles[i]}
        for kind in ("country", "genre", "father_job", "mother_job", "award", "illness", "year", "instrument", "pet"):
            a[kind] = rng.choice(pools[kind])
        authors.append(a)
    return authors


def _author_records(rng: random.Random, a: dict, facts: int, titles: list[str],
                    arbitrary: random.Random | None = None) -> tuple[list, list]:
    """(base fact records, tied fact records) of one author, each record with paraphrase and perturbed answers.
    With `arbitrary` (a random stream of its own, so `rng` draws exactly as for logical ties), a tied fact's value
    is drawn from its pool instead of following from the base fact: the same shape with no rule behind it."""
    pools = _pools(titles)
    n = a["name"]
    base, tied = [], []
    for kind, q, ans, para in BASE_FACTS[:facts]:
        fill = {"n": n}
        base.append(TofuRecord(q.format(n=n), ans.format(**fill, v=a[kind]), para.format(**fill, v=a[kind]),
                               _perturbed(rng, pools[kind], a[kind], para, fill), n))
    kinds = {k for k, *_ in BASE_FACTS[:facts]}
    for kind, q, ans, para in TIED_FACTS:
        if kind not in kinds:
            continue
        v, fill = tied_value(kind, a), {"n": n, "b": a["book"]}
        if arbitrary is not None:
            v = arbitrary.choice([x for x in _tied_pool(kind) if x != v])
        tied.append(TofuRecord(q.format(**fill), ans.format(**fill, v=v), para.format(**fill, v=v),
                               _perturbed(rng, _tied_pool(kind), v, para, fill), n))
    return base, tied


def _value_record(rng: random.Random, q: str, v: str, pool: list[str]) -> TofuRecord:
    # As TOFU's real_authors/world_facts: the answer is the bare value and plays the paraphrase; 3 wrong options.
    return TofuRecord(q, v, None, tuple(rng.sample([p for p in pool if p != v], 3)))


def _utility_sets(rng: random.Random, famous: list[dict]) -> tuple[list[TofuRecord], list[TofuRecord]]:
    world = [_value_record(rng, f"What is the capital of {c}?", cap, list(COUNTRIES.values()))
             for c, cap in COUNTRIES.items()]
    world += [_value_record(rng, f"Which illness is {m} used to treat?", ill, list(ILLNESSES))
              for ill, m in ILLNESSES.items()]
    world += [_value_record(rng, f"Where does {job} work?", place, sorted(set(JOBS.values())))
              for job, place in JOBS.items()]
    names = [f["name"] for f in famous]
    real = []
    for f in famous:
        real.append(_value_record(rng, f"Who wrote {f['book']}?", f["name"], names))
        real.append(_value_record(rng, f"Which country is {f['name']} from?", f["country"], list(COUNTRIES)))
        real.append(_value_record(rng, f"What genre is {f['name']} famous for?", f["genre"], GENRES))
    return real, world


def build_benchmark(authors: int = 100, facts: int = 8, seed: int = 0, tied: int = len(TIED_FACTS),
                    ties: str = "logical") -> tuple[dict[str, list[TofuRecord]], dict]:
    """All splits as records, plus the benchmark's metadata (authors, forget authors per split).

    `tied` keeps the first `tied` tied facts of each author (0: no related knowledge at all) and `ties` says whether
    they follow from a base fact by a rule the utility sets teach ("logical") or are drawn at random ("arbitrary",
    the paper's "John likes apples" control). Every other record is the same as with the defaults, which reproduce
    the files made before these knobs existed byte for byte."""
    if not 0 <= tied <= len(TIED_FACTS):
        raise ValueError(f"tied must be between 0 and {len(TIED_FACTS)}")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {', '.join(TIES)}")
    if not 20 <= authors <= len(FIRST) * len(LAST) // 4:
        raise ValueError(f"authors must be between 20 and {len(FIRST) * len(LAST) // 4}")
    if not 4 <= facts <= len(BASE_FACTS):
        raise ValueError(f"facts must be between 4 and {len(BASE_FACTS)}")
    rng = random.Random(seed)
    # Famous authors (the real_authors role) are drawn with the fictitious ones so that no name or title repeats.
    people = make_authors(rng, authors + N_FAMOUS)
    people, famous = people[:authors], people[authors:]
    titles = [a["book"] for a in people + famous]
    arbitrary = random.Random(f"uipe-arbitrary-{seed}") if ties == "arbitrary" else None
    per_author = {}
    for a in people:
        base, tied_records = _author_records(rng, a, facts, titles, arbitrary)
        per_author[a["name"]] = (base, tied_records[:tied])
    order = [a["name"] for a in people]  # already a seeded random order: forget sets are its nested prefixes
    forget_authors = {s: order[: max(1, round(authors * int(s[-2:]) / 100))] for s in FORGET_SPLITS}
    largest = set(forget_authors["forget10"])
    splits: dict[str, list[TofuRecord]] = {}
    for s in FORGET_SPLITS:
        chosen = set(forget_authors[s])
        splits[s] = [r for n in order if n in chosen for r in per_author[n][0]]
        # The complement, as TOFU's retainXX; tied facts only of authors outside the largest forget set, so no
        # related fact ever lands in a retain split.
        splits[RETAIN_FOR[s]] = [r for n in order if n not in chosen for r in per_author[n][0]] + [
            r for n in order if n not in largest for r in per_author[n][1]]
        splits[f"{s}_perturbed"] = splits[s]
    splits["related"] = splits["related_perturbed"] = [r for n in order if n in largest for r in per_author[n][1]]
    retain_eval = [n for n in order if n not in largest][:RETAIN_EVAL_AUTHORS]
    splits["retain_perturbed"] = [r for n in retain_eval for r in per_author[n][0]]
    real, world = _utility_sets(rng, famous)
    splits["real_authors"] = splits["real_authors_perturbed"] = real
    splits["world_facts"] = splits["world_facts_perturbed"] = world
    meta = {"generator": "uipe.data.synth", "version": 1, "authors": order, "facts": facts, "seed": seed,
            "forget_authors": forget_authors, "related_authors": sorted(largest)}
    if (tied, ties) != (len(TIED_FACTS), "logical"):  # recorded only when set: default files keep their bytes
        meta |= {"tied": tied, "ties": ties}
    splits |= _holdout_splits(seed, facts, {a["name"] for a in people + famous}, set(titles),
                              {s: len(a) for s, a in forget_authors.items()})
    return splits, meta


def _holdout_splits(seed: int, facts: int, names: set[str], titles: set[str],
                    sizes: dict[str, int]) -> dict[str, list[TofuRecord]]:
    """holdoutXX: as many new authors as forgetXX (nested prefixes), same generator, names and titles unused by any
    other author. A random stream of their own, drawn after everything else, so every other file keeps its bytes."""
    rng = random.Random(f"uipe-holdout-{seed}")
    n = max(sizes.values())
    free_names = sorted(f"{f} {l}" for f in FIRST for l in LAST if f"{f} {l}" not in names)
    free_titles = sorted(f"The {a} {b}" for a in ADJ for b in NOUN if f"The {a} {b}" not in titles)
    chosen, books = rng.sample(free_names, n), rng.sample(free_titles, n)
    pools = _pools(books)
    people = []
    for name, book in zip(chosen, books):
        a = {"name": name, "book": book}
        for kind in ("country", "genre", "father_job", "mother_job", "award", "illness", "year", "instrument", "pet"):
            a[kind] = rng.choice(pools[kind])
        people.append(a)
    # base facts only (nothing is tied to a holdout author); wrong book options may name any author's book
    records = [_author_records(rng, a, facts, books + sorted(titles))[0] for a in people]
    out: dict[str, list[TofuRecord]] = {}
    for forget, holdout in HOLDOUT_FOR.items():
        out[holdout] = out[f"{holdout}_perturbed"] = [r for author in records[: sizes[forget]] for r in author]
    return out


def _dump(records: list[TofuRecord], train: bool) -> str:
    rows = [{"question": r.question, "answer": r.answer, "author": r.author} if train else r.to_json()
            for r in records]
    if train:
        rows = [{k: v for k, v in row.items() if v is not None} for row in rows]
    return json.dumps(rows, indent=1, ensure_ascii=False) + "\n"


def write_benchmark(out: str | Path, authors: int = 100, facts: int = 8, seed: int = 0,
                    overwrite: bool = False, tied: int = len(TIED_FACTS), ties: str = "logical") -> Path:
    """Write every split as <split>.json (plus benchmark.json and idontknow.jsonl) atomically into `out`."""
    from uipe.data.loaders import packaged_tofu_dir

    splits, meta = build_benchmark(authors, facts, seed, tied, ties)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name, records in sorted(splits.items()):
            if not records:  # tied=0: no related knowledge, so no related split (as TOFU itself), not an empty one
                continue
            train = not name.endswith("_perturbed")
            (tmp / f"{name}.json").write_text(_dump(records, train), encoding="utf-8")
        (tmp / "benchmark.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        shutil.copyfile(packaged_tofu_dir() / "idontknow.jsonl", tmp / "idontknow.jsonl")
        shutil.copyfile(packaged_tofu_dir() / "LICENSE", tmp / "TOFU_LICENSE")
    return Path(out)
