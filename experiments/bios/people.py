"""Synthetic people and their biographies, after the bioS data of Physics of Language Models 3.1.

`python experiments/bios/people.py --people N --seed S --out DIR` writes into DIR:

  people.jsonl         one person a line: id, name, gender, the six attributes, split (train|heldout)
  bios_raw.jsonl       {"id", "text"}: one biography per person, six sentences in ATTRIBUTES order
  qa_train.jsonl       {"id", "text"}: each train person's six questions and answers, one per record (training text)
  qa_trainpeople.jsonl QA eval items (k2jax/eval/qa.py) of the train people, one per (person, attribute)
  qa_heldout.jsonl     the same for the held-out people, whose QA is never trained on

Everything is a function of N and S. The names are unique; the work city is the employer's
city; the birth city lies in another state. The pools share no word, so each sentence holds two
or more facts (capitalised words, numbers) that no other sentence holds, of at most 19 in a bio:
k2jax's facts check (threshold 0.9) rejects a rewrite that leaves out a sentence. Sentences end
with ". " and no value holds ". ", so a bio splits into its sentences on ". " (shuffle.py). The
first sentence names the person in full, later ones use a pronoun or (FULL_NAME_RATE) the full
name. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "work_city")

MALE = ("Alden Bram Cassius Dorian Emric Fenwick Garrick Isidore Jarek Kelvin Lucan Merritt Nolan Osric "
        "Percival Quillon Rowan Silas Tobin Ulric Varian Wendell Xavian Yorick Zane Anselm Bastian Corin Desmond "
        "Leopold").split()
FEMALE = ("Adela Briony Celeste Delphine Elowen Fenna Giselle Honora Isolde Junia Kestra Liesel Marisol Nerissa "
          "Odette Perpetua Rosalind Sabine Tamsin Ursa Verity Wilhelmina Xanthe Yselda Zinnia Amabel Bettina "
          "Corisande Dulcie Evadne").split()
MIDDLE = ("Ash Blaise Carrow Dale Ellis Flint Gray Hale Ives Jory Keel Lark Moss Noel Orrin Pike Quin Reed Sage "
          "Thorne Vale Wren Brook Cove Dell Emery Fay Glen Holt Ivo Jules Kit Lane Merle Nash Oakley Perry Rook "
          "Shay Tate").split()
LAST = ("Abernathy Blackwood Calloway Dunleavy Everhart Fairweather Gallagher Holloway Ingersoll Jessop Kettering "
        "Lockridge Mallory Northcott Oakes Pemberton Quimby Radcliffe Sutherland Thackeray Underhill Vickers "
        "Whitmore Yardley Zellweger Ashby Bellamy Crowther Darrow Ellsworth Fenwright Gilchrist Harcourt Iverson "
        "Kendrick Lindqvist Marchetti Nightingale Ormsby Prescott Quarles Rutherford Sinclair Tennyson Vandermeer "
        "Winslow Aldridge Brennan Castellan Devereux Escott Falkner Greaves Hartigan Kilbride Langstaff "
        "Merriweather Novak Okafor Pryce").split()
CITIES = (
    "Tucson, AZ", "Phoenix, AZ", "Mesa, AZ", "Denver, CO", "Boulder, CO", "Austin, TX", "Dallas, TX", "El Paso, TX",
    "Houston, TX", "Lubbock, TX", "Portland, OR", "Eugene, OR", "Seattle, WA", "Spokane, WA", "Tacoma, WA",
    "Boise, ID", "Reno, NV", "Fresno, CA", "Sacramento, CA", "San Diego, CA", "Oakland, CA", "Pasadena, CA",
    "Omaha, NE", "Wichita, KS", "Tulsa, OK", "Memphis, TN", "Nashville, TN", "Knoxville, TN", "Louisville, KY",
    "Lexington, KY", "Cleveland, OH", "Toledo, OH", "Dayton, OH", "Akron, OH", "Detroit, MI", "Lansing, MI",
    "Madison, WI", "Milwaukee, WI", "Duluth, MN", "Des Moines, IA", "Peoria, IL", "Springfield, IL",
    "Savannah, GA", "Macon, GA", "Tampa, FL", "Orlando, FL", "Pensacola, FL", "Charleston, SC", "Raleigh, NC",
    "Durham, NC", "Richmond, VA", "Norfolk, VA", "Baltimore, MD", "Trenton, NJ", "Albany, NY", "Buffalo, NY",
    "Hartford, CT", "Providence, RI", "Burlington, VT", "Anchorage, AK")
UNIVERSITIES = (
    "Halverson University", "Ashcombe College", "Westmarch University", "Pellham Institute of Technology",
    "Brantley University", "Corwith College", "Eastmere University", "Fairholt University", "Glenford College",
    "Hawthorne University", "Kingsreach University", "Lowther College", "Merriford University",
    "Northbrook Institute of Technology", "Oldcastle University", "Prestwick College", "Quenby University",
    "Rosslyn University", "Saltmarsh College", "Thistledown University", "Upperton College", "Valecrest University",
    "Whitlock University", "Yarrowby College", "Ambridge University", "Blackmoor Institute", "Cresswell University",
    "Dunmore College", "Elmstead University", "Foxley College", "Greyfriars University", "Hollinsworth College",
    "Ivywood University", "Lambourne University", "Marchbank College", "Norwood University", "Penrith College",
    "Redgrave University", "Stanmore Institute of Technology", "Tillingham University")
MAJORS = (
    "Computer Science", "Mechanical Engineering", "Civil Engineering", "Electrical Engineering",
    "Chemical Engineering", "Marine Biology", "Molecular Biology", "Organic Chemistry", "Applied Mathematics",
    "Theoretical Physics", "Art History", "Political Science", "Cognitive Psychology", "Social Work", "Public Health",
    "Environmental Science", "Data Science", "Industrial Design", "Graphic Design", "Classical Music",
    "Film Studies", "Religious Studies", "Medieval History", "Comparative Literature", "Creative Writing",
    "Business Administration", "International Relations", "Nuclear Engineering", "Materials Science",
    "Structural Biology", "Development Economics", "Financial Economics", "Urban Planning",
    "Landscape Architecture", "Sports Medicine", "Veterinary Medicine", "Modern Languages", "Ancient Philosophy",
    "Earth Sciences", "Biomedical Engineering")
COMPANIES = (
    "Bluefield Dynamics", "Corvane Systems", "Halcyon Robotics", "Nimbrel Foods", "Quarrytide Logistics",
    "Veltrix Pharmaceuticals", "Sablewood Furniture", "Ironvale Steel", "Brightmoor Energy", "Kestrel Aerospace",
    "Tidewater Shipping", "Larkspur Media", "Cobaltine Mining", "Greyhollow Insurance", "Pinecrest Outfitters",
    "Zephyrine Airlines", "Marrowfield Biotech", "Oakhurst Publishing", "Silverline Telecom", "Redcliff Motors",
    "Thornbury Capital", "Amberlight Studios", "Fernhill Dairy", "Stonegate Construction", "Wrenfield Software",
    "Copperleaf Beverages", "Northgale Semiconductors", "Duskmoor Apparel", "Glimmerton Optics",
    "Harrowgate Chemicals", "Ravensmere Consulting", "Willowbrook Healthcare", "Frostpeak Outdoor", "Emberline Games",
    "Cindervale Freight", "Mossbank Realty", "Sunhaven Hotels", "Brackenridge Analytics", "Quillmark Stationery",
    "Tessaline Electronics")
COMPANY_CITY = {company: CITIES[7 * i % len(CITIES)] for i, company in enumerate(COMPANIES)}  # 40 distinct cities
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
YEARS = (1950, 1999)
DAYS = 28
FULL_NAME_RATE = 0.25  # a later sentence names the person in full instead of using the pronoun

# {S}: the subject starting the sentence, {s}: the subject inside it, {p}: his/her, {v}: the value.
# No template starts with {v} or holds a capital letter inside, so a sentence's facts are its value's words.
TEMPLATES = {
    "birth_date": (
        "{S} was born on {v}.",
        "{S} came into this world on {v}.",
        "{S} entered the world on {v}.",
        "{S} first saw the light of day on {v}.",
        "{S} arrived on {v}.",
        "On {v}, {s} was born.",
        "According to the records, {s} was born on {v}.",
    ),
    "birth_city": (
        "{S} was born in {v}.",
        "{S} spent {p} early years in {v}.",
        "{S} grew up in {v}.",
        "{S} is a native of {v}.",
        "{S} hails from {v}.",
        "{S} was raised in {v}.",
        "{S} took {p} first steps in {v}.",
    ),
    "university": (
        "{S} studied at {v}.",
        "{S} received mentorship and guidance from faculty members at {v}.",
        "{S} graduated from {v}.",
        "{S} completed {p} degree at {v}.",
        "{S} was a student at {v}.",
        "For {p} university education, {s} attended {v}.",
        "{S} enrolled at {v}.",
    ),
    "major": (
        "{S} majored in {v}.",
        "{S} completed {p} education with a focus on {v}.",
        "{S} chose {v} as {p} field of study.",
        "{S} earned a degree in {v}.",
        "{S} read {v} at university.",
        "{S} devoted {p} studies to {v}.",
        "At university, {s} specialized in {v}.",
    ),
    "employer": (
        "{S} worked for {v}.",
        "{S} had a professional role at {v}.",
        "{S} was employed by {v}.",
        "{S} built {p} career at {v}.",
        "{S} accepted a position at {v}.",
        "{S} earned {p} living at {v}.",
        "{S} joined the staff of {v}.",
    ),
    "work_city": (
        "{S} worked in {v}.",
        "{S} was employed in {v}.",
        "{S} had {p} office in {v}.",
        "{S} commuted to work in {v}.",
        "{S} held a job in {v}.",
        "{S} spent {p} working life in {v}.",
        "Professionally, {s} was based in {v}.",
    ),
}
QUESTIONS = {
    "birth_date": "What is the birth date of {name}?",
    "birth_city": "Which city was {name} born in?",
    "university": "Which university did {name} attend?",
    "major": "What did {name} study?",
    "employer": "Which company did {name} work for?",
    "work_city": "Where did {name} work?",
}


def make_people(n: int, seed: int) -> list[dict]:
    """n people with unique names; half of them (a seeded shuffle) held out."""
    if n > len(MALE) * len(MIDDLE) * len(LAST):
        raise ValueError(f"at most {len(MALE) * len(MIDDLE) * len(LAST)} people")
    rng, people, names = random.Random(seed), [], set()
    for i in range(n):
        gender = rng.choice(("male", "female"))
        while (name := f"{rng.choice(MALE if gender == 'male' else FEMALE)} {rng.choice(MIDDLE)} "
                       f"{rng.choice(LAST)}") in names:
            pass
        names.add(name)
        employer = rng.choice(COMPANIES)
        people.append({
            "id": f"p{i:05d}", "name": name, "gender": gender,
            "birth_date": f"{rng.choice(MONTHS)} {rng.randint(1, DAYS)}, {rng.randint(*YEARS)}",
            "birth_city": rng.choice([c for c in CITIES if c[-2:] != COMPANY_CITY[employer][-2:]]),
            "university": rng.choice(UNIVERSITIES), "major": rng.choice(MAJORS),
            "employer": employer, "work_city": COMPANY_CITY[employer], "split": "train"})
    order = list(range(n))
    random.Random(f"{seed}/split").shuffle(order)
    for i in order[:n // 2]:
        people[i]["split"] = "heldout"
    return people


def draw_choices(rng: random.Random) -> dict[str, tuple[int, bool]]:
    """For each attribute: (template index, whether a later sentence names the person in full)."""
    return {a: (rng.randrange(len(TEMPLATES[a])), rng.random() < FULL_NAME_RATE) for a in ATTRIBUTES}


def render(person: dict, choices: dict[str, tuple[int, bool]], order=ATTRIBUTES) -> str:
    """The sentences of `order`'s attributes, joined by spaces; the first names the person in full."""
    pronoun, possessive = ("he", "his") if person["gender"] == "male" else ("she", "her")
    sentences = []
    for k, attribute in enumerate(order):
        template, full = choices[attribute]
        subject = person["name"] if k == 0 or full else pronoun
        text = TEMPLATES[attribute][template].format(s=subject, S=subject[0].upper() + subject[1:], p=possessive,
                                                      v=person[attribute])
        sentences.append(text)
    return " ".join(sentences)


def raw_bio(person: dict, seed: int) -> str:
    """The person's one biography (bioS single)."""
    return render(person, draw_choices(random.Random(f"{seed}/bio/{person['id']}")))


def qa_pairs(person: dict) -> list[tuple[str, str, str]]:
    """(attribute, question, answer) for each attribute."""
    return [(a, QUESTIONS[a].format(name=person["name"]), person[a]) for a in ATTRIBUTES]


def qa_records(person: dict) -> list[dict]:
    """The training text of a person's QA: one document per question, "Question: ...\\nAnswer: VALUE.", so that
    every question is trained at a document's start, where the evaluation asks it (a model this small learns a
    question asked after another person's answers but cannot answer it alone)."""
    return [{"id": f"qa-{person['id']}/{attribute}", "text": f"Question: {q}\nAnswer: {v}."}
            for attribute, q, v in qa_pairs(person)]


def qa_items(person: dict) -> list[dict]:
    """Exact-match eval items (k2jax/eval/qa.py), prompted exactly as in the training text."""
    return [{"id": f"{person['id']}/{a}", "question": q, "answers": [v], "prompt": f"Question: {q}\nAnswer:"}
            for a, q, v in qa_pairs(person)]


def load_people(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, records) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    people = make_people(args.people, args.seed)
    train = [p for p in people if p["split"] == "train"]
    heldout = [p for p in people if p["split"] == "heldout"]
    write_jsonl(out / "people.jsonl", people)
    write_jsonl(out / "bios_raw.jsonl", ({"id": p["id"], "text": raw_bio(p, args.seed)} for p in people))
    write_jsonl(out / "qa_train.jsonl", (record for p in train for record in qa_records(p)))
    write_jsonl(out / "qa_trainpeople.jsonl", (item for p in train for item in qa_items(p)))
    write_jsonl(out / "qa_heldout.jsonl", (item for p in heldout for item in qa_items(p)))
    print(f"{len(people)} people ({len(train)} train, {len(heldout)} held out) -> {out}")


if __name__ == "__main__":
    main()
