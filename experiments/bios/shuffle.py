"""PoLM's "permute" augmentation: each record's text with its sentences in a seeded random order.

`python experiments/bios/shuffle.py IN.jsonl OUT.jsonl --seed S` writes every record of IN with
its "text" split into sentences at ". " (people.py's templates end every sentence there and put
it in no value) and shuffled by an RNG seeded from (S, the record's id, else its line number);
the other fields are kept. OUT is written to OUT.tmp, then renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re


def sentences(text: str) -> list[str]:
    return re.split(r"(?<=\.) ", text.strip())


def shuffled(text: str, rng: random.Random) -> str:
    parts = sentences(text)
    rng.shuffle(parts)
    return " ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a JSONL file of records with a 'text'")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tmp = args.out + ".tmp"
    with open(args.source) as f, open(tmp, "w") as out:
        for i, line in enumerate(f):
            if line.strip():
                record = json.loads(line)
                rng = random.Random(f"{args.seed}/{record.get('id', i)}")
                out.write(json.dumps({**record, "text": shuffled(record["text"], rng)}, ensure_ascii=False) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
