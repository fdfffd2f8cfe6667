"""Markdown table of `k2jax plan --json` reports: python benchmarks/plan_table.py DIR [DIR ...].
Files are read in name order; a name's first `_`-separated word is the preset column."""

import json
import sys
from pathlib import Path

GIB = 2 ** 30


def rows(report: dict, name: str):
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items() if v > 1)
    c = report["config"]
    muon = c.get("muon_sharding", "gspmd" if "gspmd" in name else "owner")
    batch = f"{c['batch_size']} x {c['seq_len']}" + (f" in {c['grad_accum']}" if c["grad_accum"] > 1 else "")
    one_copy, busiest = report["newton_schulz_flops_one_copy"], report.get("newton_schulz_flops_busiest_device")
    for part, p in report["parts"].items():
        need = f"{p['hbm_bytes'] / GIB:,.1f}" if p["hbm_bytes"] is not None else "?"
        ns = ""
        if part == "update" and one_copy:
            ns = f"{(busiest or p['flops'] or 0) / one_copy:.2%}" if (busiest or p["flops"]) else "-"
        coll = f"{sum(p['collective_bytes'].values()) / GIB:,.2f}" if p["collective_bytes"] or p["fits"] else "-"
        flops = f"{p['flops']:.3g}" if p["flops"] is not None else "-"
        yield (f"| {name.split('_')[0]} | {report['topology']} ({mesh}) | {batch} | {muon} | {part} | {'yes' if p['fits'] else '**no**'} | {need} "
               f"| {flops} | {ns} | {coll} |")


def main(dirs):
    print("| preset | slice (mesh) | batch | Muon | program | fits | HBM GiB/chip | matmul FLOPs/chip | Newton-Schulz/chip "
          "(of one copy) | collectives GiB/chip |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in dirs:
        for path in sorted(Path(d).glob("*.json")):
            for row in rows(json.loads(path.read_text()), path.stem):
                print(row)


if __name__ == "__main__":
    main(sys.argv[1:])
