"""Rephrasing vs repetition in miniature: bioS people, K2's SimpleQA arms, held-out-people QA.

`python experiments/bios/experiment.py --out runs/bios` runs every stage, each skipped when its output
exists (so an interrupted experiment continues where it stopped):

  data       people.py: N people, one raw biography each, QA text for the train half, QA eval items
  rephrase   E rephrasings of every biography by `k2jax rephrase` through paraphraser.py (an
             OpenAI-compatible server; the facts check rejects its unfaithful rewrites, which are retried)
  arms       the biography text of each arm (below); shuffled: rephrasings with every sentence naming the
             person in full, then shuffled (PoLM's fullname + permute)
  prepare    `k2jax prepare` of each arm and of the QA text, all with one BPE tokenizer
  train      `k2jax train` per (arm, weight decay, seed): data.sources = [arm biographies, QA text], the
             same token shares and steps for every arm: E passes over the raw biographies' tokens
  eval       `k2jax eval` exact match on the held-out people's questions (their QA never trained on) and
             on the train people's
  report     results.csv, results.md (means over seeds, Wilson 95% intervals over the pooled items)
             and results.png

Arms (K2's SimpleQA ablation: raw x10 epochs, one rephrasing x10, ten rephrasings x1; PoLM's multi + permute):
  raw          the raw biographies, E epochs
  rephrase1    rephrasing 0 of each biography, E epochs
  rephraseE    the E rephrasings, one epoch each
  shuffledE    the E rephrasings, full names, sentences shuffled, one epoch each
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
K2JAX = [sys.executable, "-m", "k2jax.cli"]
sys.path.insert(0, str(HERE))

import people as bios  # noqa: E402
import shuffle  # noqa: E402

BASE_CONFIG = HERE / "base.yaml"
PUBLISHED = {  # held-out QA accuracy, %
    "raw": "K2 SimpleQA raw x10: 23.76; PoLM bioS single: 9.7",
    "rephrase1": "K2 one rephrasing x10: 27.39",
    "rephrase": "K2 ten rephrasings x1: 28.94; PoLM multi5: 41",
    "shuffled": "PoLM multi5 + permute: 96.6",
}


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kwargs)


def make_data(out: Path, people: int, seed: int) -> Path:
    data = out / "data"
    if not (data / "people.jsonl").is_file():
        run([sys.executable, HERE / "people.py", "--people", people, "--seed", seed, "--out", data])
    return data


def rephrase(out: Path, data: Path, rephrasings: int, drop_rate: float) -> Path:
    """E rephrasings of every raw biography through the paraphraser server (k2jax rephrase resumes itself)."""
    target = out / "rephrased"
    if (target / "summary.json").is_file():
        return target
    server = subprocess.Popen([sys.executable, HERE / "paraphraser.py", "--people", data / "people.jsonl",
                               "--port", "0", "--drop-rate", str(drop_rate)], stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"at (http://\S+)", server.stdout.readline()).group(1)
        run(K2JAX + ["rephrase", data / "bios_raw.jsonl", "--out", target, "--base-url", url,
                     "--model", "bios-paraphraser", "--rephrasings", rephrasings, "--concurrency", 16,
                     "--retries", 5])
    finally:
        server.terminate()
        server.wait()
    return target


def _rewrites(rephrased: Path) -> list[dict]:
    records = []
    for part in sorted(rephrased.glob("part-*.jsonl")):
        records += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
    return records


def _full_names(text: str, person: dict) -> str:
    """Every sentence opening with the pronoun names the person in full instead."""
    pronoun = "He" if person["gender"] == "male" else "She"
    return " ".join(person["name"] + s[len(pronoun):] if s.startswith(pronoun + " ") else s
                    for s in shuffle.sentences(text))


def make_arms(out: Path, data: Path, rephrased: Path, rephrasings: int, seed: int) -> dict[str, Path]:
    """arm name -> what `k2jax prepare` reads for its biographies."""
    arms_dir = out / "arms"
    arms_dir.mkdir(parents=True, exist_ok=True)
    people = bios.load_people(data / "people.jsonl")  # in bios_raw.jsonl's line order
    by_line = {f"bios_raw.jsonl:{i}": p for i, p in enumerate(people)}
    rewrites = _rewrites(rephrased)
    first = arms_dir / "rephrase1.jsonl"
    if not first.is_file():
        bios.write_jsonl(first, [r for r in rewrites if r["rephrasing"] == 0])
    shuffled = arms_dir / f"shuffled{rephrasings}.jsonl"
    if not shuffled.is_file():
        bios.write_jsonl(shuffled, [{**r, "text": shuffle.shuffled(_full_names(r["text"], by_line[r["source_id"]]),
                                                                    random.Random(f"{seed}/{r['id']}"))}
                                    for r in rewrites])
    return {"raw": data / "bios_raw.jsonl", "rephrase1": first, f"rephrase{rephrasings}": rephrased,
            f"shuffled{rephrasings}": shuffled}


def prepare(out: Path, data: Path, arms: dict[str, Path], vocab: int) -> dict[str, Path]:
    """Prepared corpora: "qa" and every arm, all with the tokenizer trained on the raw biographies and the QA."""
    prepared = out / "prepared"
    tokenizer = prepared / "tokenizer-corpus"
    if not tokenizer.is_dir():
        run(K2JAX + ["prepare", data / "bios_raw.jsonl", data / "qa_train.jsonl", "--out", tokenizer,
                     "--tokenizer", "bpe", "--bpe-vocab-size", vocab, "--heldout-fraction", 0.001])
    paths = {}
    for name, source in {"qa": data / "qa_train.jsonl", **arms}.items():
        paths[name] = prepared / name
        if not paths[name].is_dir():
            run(K2JAX + ["prepare", source, "--out", paths[name], "--tokenizer", tokenizer,
                         "--heldout-fraction", 0.001])
    return paths


def _train_tokens(path: Path) -> int:
    return json.loads((path / "manifest.json").read_text())["splits"]["train"]["tokens"]


def train_and_eval(out: Path, data: Path, prepared: dict, arm: str, epochs: int, weight_decay: float,
                   seed: int, args) -> dict:
    """One run's row of results.csv (trained and evaluated unless done before)."""
    name = f"{arm}-wd{weight_decay:g}-s{seed}"
    run_dir = out / "runs" / name
    bio_tokens, qa_tokens = _train_tokens(prepared["raw"]), _train_tokens(prepared["qa"])
    steps = math.ceil(args.exposures * (bio_tokens + qa_tokens) / (args.batch_size * args.seq_len))
    sources = (f"[{{path: {prepared[arm]}, weight: {bio_tokens}, name: bios, max_epochs: {epochs * 1.1:g}}}, "
               f"{{path: {prepared['qa']}, weight: {qa_tokens}, name: qa}}]")
    if not (run_dir / "summary.json").is_file():
        resume = ["--resume"] if (run_dir / "checkpoints").is_dir() else []
        run(K2JAX + ["train", BASE_CONFIG, *resume, "--set", f"data.sources={sources}",
                     "--set", f"optim.weight_decay={weight_decay}", "--set", f"train.seed={seed}",
                     "--set", f"data.seed={seed}", "--set", f"train.steps={steps}",
                     "--set", f"train.batch_size={args.batch_size}", "--set", f"data.seq_len={args.seq_len}",
                     "--set", f"train.out_dir={run_dir}", "--set", f"checkpoint.every={steps}"])
    results = run_dir / "eval" / f"step_{steps}.json"
    if not results.is_file():
        run(K2JAX + ["eval", run_dir, "--tasks", f"{data / 'qa_heldout.jsonl'},{data / 'qa_trainpeople.jsonl'}",
                     "--batch-size", 64])
    scores = json.loads(results.read_text())["results"]
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    return {"arm": arm, "weight_decay": weight_decay, "seed": seed, "steps": steps,
            "heldout_em": scores["qa_heldout"]["em"], "heldout_items": scores["qa_heldout"]["items"],
            "trainpeople_em": scores["qa_trainpeople"]["em"], "trainpeople_items": scores["qa_trainpeople"]["items"],
            "bio_epochs": round(metrics[steps]["data/epochs/bios"], 3),
            "qa_epochs": round(metrics[steps]["data/epochs/qa"], 3),
            "final_loss": round(summary["final_loss"], 4), "wall_time_s": round(summary["wall_time_s"], 1)}


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bios")
    parser.add_argument("--people", type=int, default=200)
    parser.add_argument("--exposures", type=int, default=50, help="E: epochs of the repeated arms, rephrasings")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0],
                        help="tried on the raw (repetition) arm at the first seed")
    parser.add_argument("--arm-weight-decays", type=float, nargs="+", default=[0.1, 3.0],
                        help="tried on the other arms at the first seed; every arm runs at its best at every seed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--report-only", action="store_true", help="report the finished runs, train nothing")
    parser.add_argument("--drop-rate", type=float, default=0.1, help="the paraphraser's unfaithful rewrites")
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve()
    data = make_data(out, args.people, 0)
    rephrased = rephrase(out, data, args.exposures, args.drop_rate)
    arms = make_arms(out, data, rephrased, args.exposures, 0)
    prepared = prepare(out, data, arms, args.vocab)
    epochs = {"raw": args.exposures, "rephrase1": args.exposures}
    rows = []

    def row(arm: str, weight_decay: float, seed: int) -> None:
        done = (out / "runs" / f"{arm}-wd{weight_decay:g}-s{seed}" / "summary.json").is_file()
        if args.report_only and not done:
            return
        if not any((r["arm"], r["weight_decay"], r["seed"]) == (arm, weight_decay, seed) for r in rows):
            rows.append(train_and_eval(out, data, prepared, arm, epochs.get(arm, 1), weight_decay, seed, args))

    grids = {arm: args.weight_decays if arm == "raw" else args.arm_weight_decays for arm in arms}
    for arm in arms:  # every arm's weight decays at the first seed
        for weight_decay in grids[arm]:
            row(arm, weight_decay, args.seeds[0])
    best = {arm: best_weight_decay(rows, arm, args.seeds[0]) for arm in arms}
    for seed in args.seeds[1:]:  # each arm at its best
        for arm in arms:
            row(arm, best[arm], seed)
    report(out, rows, best, args)


def best_weight_decay(rows: list[dict], arm: str, seed: int) -> float:
    """The arm's weight decay with the best held-out QA at `seed` (ties: the better train-people QA)."""
    mine = [r for r in rows if r["arm"] == arm and r["seed"] == seed]
    return max(mine, key=lambda r: (r["heldout_em"], r["trainpeople_em"]))["weight_decay"]


def _pooled(runs: list[dict], key: str) -> tuple[float, float, float]:
    """Exact match over the runs' pooled items, and its Wilson 95% interval."""
    n = sum(r[f"{key}_items"] for r in runs)
    hits = sum(r[f"{key}_em"] * r[f"{key}_items"] for r in runs)
    return (hits / n, *wilson(hits, n))


def _at_best(rows: list[dict], best: dict) -> list[tuple[str, list[dict]]]:
    """(arm, its runs at its best weight decay) in arm order."""
    return [(arm, [r for r in rows if r["arm"] == arm and r["weight_decay"] == wd]) for arm, wd in best.items()]


def report(out: Path, rows: list[dict], best: dict, args) -> None:
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"{args.people} people ({args.people // 2} held out: {args.people // 2 * 6} questions per seed), "
             f"E = {args.exposures}; each arm at its best weight decay; exact match in %, over the seeds' pooled "
             f"items [Wilson 95%]", "",
             "| arm | weight decay | held-out people QA | train people QA | held-out, per seed | "
             "published (held-out QA, %) |", "|---|---|---|---|---|---|"]
    for arm, runs in _at_best(rows, best):
        cells = [f"{100 * p:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
                 for p, low, high in (_pooled(runs, "heldout"), _pooled(runs, "trainpeople"))]
        per_seed = ", ".join(f"{100 * r['heldout_em']:.1f} (seed {r['seed']})" for r in runs)
        lines.append(f"| {arm} | {best[arm]:g} | {cells[0]} | {cells[1]} | {per_seed} | "
                     f"{PUBLISHED[arm if arm in PUBLISHED else arm.rstrip('0123456789')]} |")
    decays = sorted({r["weight_decay"] for r in rows})
    lines += ["", f"Held-out people QA (%) by weight decay, seed {args.seeds[0]}:", "",
              "| arm | " + " | ".join(f"wd {wd:g}" for wd in decays) + " |", "|---|" + "---|" * len(decays)]
    for arm in best:
        cell = {r["weight_decay"]: f"{100 * r['heldout_em']:.1f}" for r in rows
                if r["arm"] == arm and r["seed"] == args.seeds[0]}
        lines.append(f"| {arm} | " + " | ".join(cell.get(wd, "") for wd in decays) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, rows, best, args.seeds[0])


def plot(out: Path, rows: list[dict], best: dict, first_seed: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    ax_arms, ax_wd = fig.subplots(1, 2)
    arms = _at_best(rows, best)
    for offset, key, label in ((-0.2, "heldout", "held-out people"), (0.2, "trainpeople", "train people")):
        for i, (_, runs) in enumerate(arms):
            p, low, high = _pooled(runs, key)
            ax_arms.bar(i + offset, 100 * p, 0.4, yerr=[[100 * max(p - low, 0)], [100 * max(high - p, 0)]], capsize=3,
                        color="C0" if key == "heldout" else "C1", label=label if i == 0 else None)
            ax_arms.plot([i + offset] * len(runs), [100 * r[f"{key}_em"] for r in runs], "k.",
                         label="one seed" if i == 0 and key == "heldout" else None)
    ax_arms.set_xticks(range(len(arms)), [f"{arm}\nwd {best[arm]:g}" for arm, _ in arms])
    ax_arms.set(title="QA exact match, each arm at its best weight decay\n(bars: seeds pooled, 95% CI)",
                ylabel="exact match (%)", ylim=(0, 105))
    ax_arms.legend(fontsize="small")
    for arm in best:
        mine = sorted((r for r in rows if r["arm"] == arm and r["seed"] == first_seed), key=lambda r: r["weight_decay"])
        ax_wd.plot([r["weight_decay"] for r in mine], [100 * r["heldout_em"] for r in mine], "o-", label=arm)
    ax_wd.set(xscale="log", title=f"Held-out people QA by weight decay (seed {first_seed})",
              xlabel="optim.weight_decay", ylabel="exact match (%)", ylim=(0, 105))
    ax_wd.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


if __name__ == "__main__":
    main()
