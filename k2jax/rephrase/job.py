"""`rephrase`: rewrite a corpus through a generator server, resumably, each (document, rephrasing) once.

Each document is cut into chunks (chunking.py); rephrasing r of document d uses style
(md5(d) + r) mod S of the S styles, so a document's first S rephrasings differ in style.
The chunks are rewritten in order, each prompt carrying the rewrite so far (the latest chunk
rewrites that fit in 2T tokens) and the chunk; the rewrites are joined with the source's
separators (a blank line, a newline or a space). A chunk whose rewrite fails the fidelity
check (or gets no score from the judge), is cut off by max_tokens, comes back empty or is
refused by the server (HTTP 4xx) is tried again with another seed, `retries` times; then the
rewrite is dropped and recorded as dropped. A server that keeps failing (the client's retries
spent on 429/5xx/timeouts/...) stops the job (GeneratorDown); what was finished is kept.

Output in OUT (with `shard=(i, n)`, n > 1, every name starts with `w{i:03d}of{n:03d}-`, so the n
workers can share OUT):

  part-00000.jsonl ...  one JSON record per rewrite: id ("{source_id}#{r}"), text, source_id,
                        rephrasing, style, prompt_set, prompt_hash, model, fidelity_check,
                        chunks ([{index, span: [start, end) in the source, seed, attempts, fidelity}]),
                        completion_tokens
  (part-00000.parquet   with file_format="parquet": the same records as rows, chunks a list of structs)
  manifest.json         settings, the committed parts (each with the ids dropped with it) and counts
  summary.json          the counts, written at the end of every launch

A part is written to a .tmp file, fsynced and renamed; then the manifest listing it is written
the same way. The manifest is the commit: a part it does not list (a kill between the two
renames) is deleted at the next start, as are .tmp files, and the ids of the listed parts (and
their dropped ids) are skipped. So after a kill at any moment, the same command finishes the
job with every (document, rephrasing) pair exactly once, in a listed part or as dropped.
Failure and retry counts cover the work of every launch up to its last commit.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from k2jax.config import ConfigError
from k2jax.data.prepared import REPHRASE_FORMAT as FORMAT, iter_source, read_rephrase_part
from k2jax.rephrase.chunking import TokenCounter, chunk_text, estimate_tokens
from k2jax.rephrase.client import Client, GenerationError
from k2jax.rephrase.fidelity import Check, FactsCheck, JudgeCheck, Unscored
from k2jax.rephrase.prompts import Style

FILE_FORMATS = ("jsonl", "parquet")


class GeneratorDown(Exception):
    """The generator server failed past the client's retries; the job stopped, its finished work kept."""

    exit_code = 6


class _Stopped(Exception):
    """A rewrite abandoned because the job is stopping."""


@dataclasses.dataclass
class Outcome:
    """What became of one (document, rephrasing): a record, or the reason it was dropped."""

    id: str
    style: str
    record: dict | None = None
    dropped: str | None = None
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def _digest(*parts) -> int:
    return int.from_bytes(hashlib.md5("/".join(map(str, parts)).encode()).digest()[:4], "little")


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parquet(records: list[dict]) -> bytes:
    """The records as one Parquet file, with a fixed schema (so a part without records has the columns too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    chunk = pa.struct([("index", pa.int64()), ("span", pa.list_(pa.int64())), ("seed", pa.int64()),
                       ("attempts", pa.int64()), ("fidelity", pa.float64())])
    schema = pa.schema([*((k, pa.string()) for k in ("id", "text", "source_id")), ("rephrasing", pa.int64()),
                        *((k, pa.string()) for k in ("style", "prompt_set", "prompt_hash", "model", "fidelity_check")),
                        ("chunks", pa.list_(chunk)), ("completion_tokens", pa.int64())])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records, schema=schema), sink)
    return sink.getvalue().to_pybytes()


def _separator(chunk: str) -> str:
    """The whitespace a chunk's rewrite is followed by: a blank line, a newline or a space, as in the source."""
    tail = chunk[len(chunk.rstrip()):]
    return "\n\n" if tail.count("\n") >= 2 else "\n" if "\n" in tail else " "


class Job:
    """One rephrasing job writing into `out_dir`; `run()` does (or finishes) it and returns the summary."""

    def __init__(self, source: str, out_dir: str | Path, client: Client, styles: list[Style], *,
                 rephrasings: int = 1, concurrency: int = 8, chunk_tokens: int = 300, check: Check | None = None,
                 retries: int = 3, seed: int = 0, temperature: float = 0.7, max_tokens: int | None = None,
                 shard_records: int = 1000, shard: tuple[int, int] = (0, 1), file_format: str = "jsonl",
                 count_tokens: TokenCounter = estimate_tokens, progress: bool = False):
        for name, value, low in (("rephrasings", rephrasings, 1), ("concurrency", concurrency, 1),
                                 ("chunk-tokens", chunk_tokens, 1), ("retries", retries, 0),
                                 ("shard-records", shard_records, 1)):
            if value < low:
                raise ConfigError(f"--{name} must be at least {low}, got {value}")
        if not 0 <= shard[0] < shard[1]:
            raise ConfigError(f"--shard I/N needs 0 <= I < N, got {shard[0]}/{shard[1]}")
        if file_format not in FILE_FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FILE_FORMATS)}, got {file_format!r}")
        self.source, self.out = str(source), Path(out_dir)
        self.client, self.styles, self.check = client, styles, check or FactsCheck()
        self.rephrasings, self.concurrency, self.chunk_tokens = rephrasings, concurrency, chunk_tokens
        self.retries, self.seed, self.temperature = retries, seed, temperature
        self.max_tokens = max_tokens or 2 * chunk_tokens
        self.shard_records, self.shard, self.format, self.count = shard_records, shard, file_format, count_tokens
        self.progress = progress
        self.prefix = "" if shard[1] == 1 else f"w{shard[0]:03d}of{shard[1]:03d}-"
        self._stop = threading.Event()

    # ---- the output directory ----

    def settings(self) -> dict:
        """What the output depends on: a rerun into the same OUT must have the same."""
        return {"source": self.source, "model": self.client.model, "endpoint": self.client.endpoint,
                "styles": {s.name: s.prompt_hash for s in self.styles}, "rephrasings": self.rephrasings,
                "chunk_tokens": self.chunk_tokens, "fidelity": self.check.name, "min_fidelity": self.check.threshold,
                "retries": self.retries, "seed": self.seed, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "shard": list(self.shard), "format": self.format,
                **({"judge_model": self.check.model, "judge_rubric": self.check.rubric_hash}
                   if isinstance(self.check, JudgeCheck) else {})}

    def _path(self, name: str) -> Path:
        return self.out / f"{self.prefix}{name}"

    def _open(self) -> tuple[dict, set[str]]:
        """(the manifest, the ids already done) after removing what no manifest lists."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self._path("manifest.json")
        if path.is_file():
            manifest = json.loads(path.read_text())
            if manifest.get("format") != FORMAT:
                raise ConfigError(f"{path} is not a rephrase manifest (format {manifest.get('format')!r})")
            theirs, ours = manifest["settings"], self.settings()
            diff = [k for k in ours if theirs.get(k) != ours[k]]
            if diff:
                changes = "; ".join(f"{k}: {theirs.get(k)!r} there, {ours[k]!r} now" for k in diff)
                raise ConfigError(f"{self.out} holds a rephrase job with other settings ({changes}); run it with "
                                  f"its settings or choose another --out")
        else:
            manifest = {"format": FORMAT, "settings": self.settings(), "parts": [], "counts": {}}
        listed = {p["file"] for p in manifest["parts"]}
        for stray in {*self.out.glob(f"{self.prefix}*.tmp"), *self.out.glob(f"{self.prefix}part-*")}:
            if stray.name not in listed and (self.prefix or stray.name.startswith(("part-", "manifest", "summary"))):
                stray.unlink()
        done = set()
        for part in manifest["parts"]:
            done.update(r["id"] for r in read_rephrase_part(self.out / part["file"], ["id"]))
            done.update(part["dropped"])
        return manifest, done

    def _commit(self, manifest: dict, outcomes: list[Outcome], counts: collections.Counter) -> None:
        """A new part holding `outcomes` (none: only the counts are updated), then the manifest listing it."""
        parts = manifest["parts"]
        if outcomes:
            name = f"{self.prefix}part-{len(parts):05d}.{self.format}"
            records = [o.record for o in outcomes if o.record is not None]
            _atomic_write(self.out / name, _parquet(records) if self.format == "parquet" else
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            parts = parts + [{"file": name, "records": len(records),
                              "dropped": {o.id: o.dropped for o in outcomes if o.record is None}}]
        new = {**manifest, "parts": parts, "counts": dict(counts)}
        _atomic_write(self._path("manifest.json"), json.dumps(new, indent=1))
        manifest.update(new)  # only once it is on disk: a failed commit can be tried again

    # ---- the work ----

    def _pairs(self, done: set[str], documents: collections.Counter) -> Iterator[tuple[str, str, int]]:
        """The (source id, text, r) of this shard not done yet, streamed; counts the documents."""
        for doc_id, text in iter_source(self.source):
            if _digest(doc_id) % self.shard[1] == self.shard[0]:
                documents["documents"] += 1
                yield from ((doc_id, text, r) for r in range(self.rephrasings) if f"{doc_id}#{r}" not in done)

    def rewrite(self, doc_id: str, text: str, r: int) -> Outcome:
        """Rephrasing r of one document, chunk by chunk."""
        style = self.styles[(_digest(doc_id) + r) % len(self.styles)]
        outcome = Outcome(f"{doc_id}#{r}", style.name)
        counts, pieces, chunks, start = outcome.counts, [], [], 0
        for k, chunk in enumerate(chunk_text(text, self.chunk_tokens, self.count)):
            span, start = [start, start + len(chunk)], start + len(chunk)
            if not chunk.strip():
                continue
            previous = self._context(pieces)
            for attempt in range(self.retries + 1):
                if self._stop.is_set():
                    raise _Stopped
                seed = _digest(self.seed, doc_id, r, k, attempt) & 0x7FFFFFFF
                accepted = self._attempt(style.render(previous, chunk.strip()), chunk.strip(), seed, counts)
                if accepted is not None:
                    pieces.append((accepted[0], _separator(chunk)))
                    chunks.append({"index": k, "span": span, "seed": seed, "attempts": attempt + 1,
                                   "fidelity": round(accepted[1], 4)})
                    break
            else:
                outcome.dropped = f"chunk {k} failed {self.retries + 1} tries"
                return outcome
        outcome.record = {
            "id": outcome.id, "text": "".join(p + sep for p, sep in pieces).rstrip(), "source_id": doc_id,
            "rephrasing": r, "style": style.name, "prompt_set": style.prompt_set, "prompt_hash": style.prompt_hash,
            "model": self.client.model, "fidelity_check": self.check.name, "chunks": chunks,
            "completion_tokens": counts["completion_tokens"]}
        return outcome

    def _attempt(self, prompt: str, chunk: str, seed: int, counts: collections.Counter) -> tuple[str, float] | None:
        """(the rewrite, its fidelity score), or None (counted by why) if it is no good."""
        counts["chunk_attempts"] += 1
        try:
            reply = self.client.generate(prompt, max_tokens=self.max_tokens, temperature=self.temperature, seed=seed)
            text = reply.text.strip()
            counts["completion_tokens"] += reply.completion_tokens
            if reply.finish_reason == "length" or not text:
                counts["chunk_cut_off" if text else "chunk_empty"] += 1
                return None
            score = self.check.score(chunk, text)  # the embedding and judge checks ask the server too
        except Unscored:
            counts["chunk_unscored"] += 1
            return None
        except GenerationError as e:
            if e.kind != "rejected":
                raise GeneratorDown(f"{e}; the finished rewrites are kept in {self.out}: run the same command "
                                    f"again to continue") from None
            counts["chunk_rejected"] += 1
            return None
        if score < self.check.threshold:
            counts["chunk_unfaithful"] += 1
            return None
        return text, score

    def _context(self, pieces: list[tuple[str, str]]) -> str:
        """The latest chunk rewrites that fit in 2 * chunk_tokens tokens (at least the last one)."""
        kept, used = [], 0
        for text, sep in reversed(pieces):
            used += self.count(text)
            if kept and used > 2 * self.chunk_tokens:
                break
            kept.append(text + sep)
        return "".join(reversed(kept)).rstrip()

    def run(self) -> dict:
        """Do what is not done yet; the summary (also written to summary.json)."""
        self._stop.clear()
        self.client.cancel.clear()
        manifest, done = self._open()
        documents = collections.Counter()
        counts = collections.Counter(manifest["counts"])
        failures_before = collections.Counter(self.client.failures)
        started, launch = time.monotonic(), collections.Counter()
        pending: list[Outcome] = []
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(1 for _ in self._pairs(done, collections.Counter())), unit="rewrite",
                       dynamic_ncols=True)

        def commit():
            nonlocal failures_before
            failures = collections.Counter(self.client.failures)
            counts.update({f"request_{k}": v for k, v in (failures - failures_before).items()})
            failures_before = failures
            self._commit(manifest, pending, counts)
            pending.clear()

        pairs, launch_pairs = self._pairs(done, documents), 0
        with cf.ThreadPoolExecutor(self.concurrency) as pool:
            running: set[cf.Future] = set()
            try:
                while True:
                    while len(running) < 2 * self.concurrency and (pair := next(pairs, None)):
                        running.add(pool.submit(self.rewrite, *pair))
                        launch_pairs += 1
                    if not running:
                        break
                    finished, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for future in finished:
                        outcome = future.result()
                        pending.append(outcome)
                        counts.update(outcome.counts)
                        launch.update(outcome.counts)
                        kind = "rewrites" if outcome.record else "dropped"
                        counts[kind] += 1
                        counts[f"{kind}/{outcome.style}"] += 1
                        if bar is not None:
                            bar.update()
                            seconds = time.monotonic() - started
                            bar.set_postfix_str(f"{launch['completion_tokens'] / seconds:,.0f} tok/s, "
                                                f"{counts['dropped']} dropped")
                        if len(pending) >= self.shard_records:  # parts of shard_records, however many finish at once
                            commit()
            except BaseException:
                self._stop.set()
                self.client.cancel.set()  # requests waiting to retry give up at once
                for future in running:
                    future.cancel()
                raise
            finally:
                if bar is not None:
                    bar.close()
                commit()  # what is finished, and the counts of a launch that stops
        summary = {"documents": documents["documents"], "pairs": documents["documents"] * self.rephrasings,
                   **self._totals(counts), "pairs_this_launch": launch_pairs,
                   "seconds_this_launch": round(time.monotonic() - started, 3)}
        _atomic_write(self._path("summary.json"), json.dumps(summary, indent=1))
        return summary

    def _totals(self, counts: collections.Counter) -> dict:
        styles = {s.name: {"rewrites": counts[f"rewrites/{s.name}"], "dropped": counts[f"dropped/{s.name}"]}
                  for s in self.styles}
        for entry in styles.values():  # None: the style has not been used
            tried = entry["rewrites"] + entry["dropped"]
            entry["acceptance"] = round(entry["rewrites"] / tried, 4) if tried else None
        chunk_failures = {k.removeprefix("chunk_"): counts[k] for k in sorted(counts)
                          if k.startswith("chunk_") and k != "chunk_attempts"}
        return {"rewrites": counts["rewrites"], "dropped": counts["dropped"],
                "chunk_attempts": counts["chunk_attempts"],
                "chunk_retries": sum(chunk_failures.values()) - counts["dropped"],  # the last failure is no retry
                "chunk_failures": chunk_failures, "completion_tokens": counts["completion_tokens"],
                "request_failures": {k.removeprefix("request_"): counts[k] for k in sorted(counts)
                                     if k.startswith("request_")},
                "styles": styles}
