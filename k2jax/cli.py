"""Command line: `k2jax train CONFIG [--set k=v ...] [--resume]`, `k2jax info --config NAME|FILE`,
`k2jax prepare SOURCE... --out DIR`, `k2jax sweep FILE`, `k2jax analyze FILE`, `k2jax sample RUN_DIR`,
`k2jax eval RUN_DIR --tasks heldout,stdlib_mc`, `k2jax export RUN_DIR OUT_DIR`,
`k2jax serve RUN_DIR --port N`, `k2jax rephrase SOURCE --out DIR --base-url URL --model NAME`,
`k2jax bench CONFIG`, `k2jax lower CONFIG --platform cuda|tpu`,
`k2jax plan CONFIG --topology v5p:8x8x8`."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import traceback
from pathlib import Path

from k2jax.config import Config, ConfigError, load_config
from k2jax.interop.deepseek_v3 import EXPORT_DTYPES

EXIT_STATUS = """exit status:
  0    done
  1    plan: the program does not fit; or an unexpected error (--debug prints its traceback)
  2    a config, usage or input error (a bad key or value, malformed YAML, an empty corpus, ...)
  3    a checkpoint or resume problem (no finished checkpoint, none readable, ...)
  4    training diverged (NaN/inf loss or weights); the last good checkpoint is kept
  5    an I/O error: a read-only or full disk, a path that is a file
  6    rephrase: the generator server is down or kept failing; the same command continues the job
  7    train: another process of a multi-process run died or its host stopped answering; every process
       ends, the line names the lost one; --resume in every process continues
  130  interrupted (Ctrl-C)
  143  preempted (SIGTERM): a checkpoint was saved; --resume, or the same sweep again, continues
Errors are one or two lines on stderr; --debug adds the traceback."""

_OS_HINTS = {errno.ENOSPC: "free space on that disk, then run again (--resume continues a training run)",
             errno.EROFS: "write somewhere writable", errno.EACCES: "fix the permissions or write elsewhere",
             errno.EPERM: "fix the permissions or write elsewhere"}


def _preset_name(config: str | None) -> str | None:
    """The model preset `_load` reads `config` as, or None for a YAML file (or no config)."""
    if config is None or Path(config).suffix in (".yaml", ".yml") or Path(config).is_file():
        return None
    return config


def _load(config: str | None, overrides: list[str]) -> Config:
    """A YAML path, or a model preset name (e.g. kimi-k2) with default everything else."""
    preset = _preset_name(config)
    if preset is None:
        return load_config(config, overrides)
    return load_config(None, [f"model.preset={preset}", *overrides])


def cmd_train(args) -> int:
    from k2jax.parallel import distributed
    from k2jax.train.loop import train

    if args.init_from:
        from k2jax.interop.importer import run_config

        if args.resume:
            raise ConfigError("--init-from starts a new run from imported weights; --resume continues one: pass one")
        cfg = run_config(args.init_from, args.config, args.set)
    elif args.config is None:
        raise ConfigError("train: give CONFIG (an experiment YAML or a model preset), or --init-from HF_DIR")
    else:
        cfg = _load(args.config, args.set)
    distributed.initialize(auto=args.distributed == "auto", coordinator=args.coordinator,
                           num_processes=args.num_processes, process_id=args.process_id,
                           heartbeat_timeout=args.heartbeat_timeout)
    try:
        summary = train(cfg, resume=args.resume, init_from=args.init_from)
    except Exception:
        distributed.wait_for_lost_peer()  # an error a dead process caused ends naming it (exit 7)
        raise
    if "preempted_at" in summary:
        from k2jax.train.loop import Preempted

        raise Preempted(f"stopped by SIGTERM after step {summary['preempted_at']}, its checkpoint saved in "
                        f"{cfg.train.out_dir}; continue with --resume")
    trained = summary["steps"] - summary["start_step"]
    throughput = f", {summary['tokens_per_s']:,.0f} tokens/s" if trained else ""
    loss = f", final loss {summary['final_loss']:.4f}" if trained else ""
    print(f"done: {summary['steps']} steps ({trained} in this launch){loss}, "
          f"eval loss {summary.get('final_eval_loss', float('nan')):.4f}{throughput} -> {cfg.train.out_dir}")
    return 0


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


# The batch a published model trained with (rows x tokens), which `k2jax info --config NAME` measures Newton-Schulz
# against: Kimi K2's about 67M tokens of 4096-token sequences, DeepSeek-V3's 15,360 sequences of 4096 tokens.
PUBLISHED_BATCH = {"kimi-k2": (16384, 4096), "deepseek-v3": (15360, 4096)}


def cmd_info(args) -> int:
    from flax import nnx

    from k2jax.model.count import abstract_model, count_model_params
    from k2jax.model.flops import newton_schulz_fraction
    from k2jax.optim import describe
    from k2jax.optim.muon import newton_schulz_flops
    from k2jax.parallel.sharding import abstract_mesh, param_shardings
    from k2jax.params import param_info

    published = PUBLISHED_BATCH.get(_preset_name(args.config))
    batch = [f"train.batch_size={published[0]}", f"data.seq_len={published[1]}"] if published else []
    cfg = _load(args.config, [*batch, *args.set])  # the user's --set comes last: it wins
    mesh = abstract_mesh(cfg.mesh, args.devices)
    counts = count_model_params(cfg.model)
    m = cfg.model
    att, moe = m.attention, m.moe
    print(f"attention {att.kind}: {att.num_heads} heads, d_model {m.d_model}, {m.num_layers} layers "
          f"({m.num_dense_layers} dense); experts {moe.num_experts} (top-{moe.experts_per_token}, "
          f"{moe.num_shared_experts} shared, sparsity {moe.num_experts / max(moe.experts_per_token, 1):g})")
    print(f"total parameters:     {_human(counts['total'])} ({counts['total']:,})")
    print(f"activated per token:  {_human(counts['activated'])} ({counts['activated']:,})")
    print(f"embedding + head:     {_human(counts['embedding'])}")
    state = nnx.state(abstract_model(cfg.model), nnx.Param)
    infos = param_info(state)
    rows, seq_len = cfg.train.batch_size, cfg.data.seq_len
    ns = newton_schulz_flops(infos, nnx.to_pure_dict(state), cfg.optim.ns_steps)
    share = newton_schulz_fraction(ns, cfg)
    set_keys = {o.partition("=")[0].strip() for o in args.set}
    source = ("as --set" if set_keys & {"train.batch_size", "data.seq_len"} else
              f"{args.config}'s published training batch" if published else
              "k2jax's default" if _preset_name(args.config) else f"from {args.config or 'the defaults'}")
    print(f"Newton-Schulz FLOPs per Muon step: {ns:.3e} = {share:.2%} of the model FLOPs of a step of "
          f"{rows:,} x {seq_len:,} = {rows * seq_len:,} tokens (train.batch_size x data.seq_len, {source}"
          + ("; change with --set)" if source != "as --set" else ")"))
    shardings = None
    if mesh.size > 1:  # raises, as training would, where a mesh axis does not divide a parameter
        shardings = param_shardings(infos, nnx.to_pure_dict(state), mesh)
        print(f"mesh {dict(mesh.shape)}: every mesh axis divides the parameter dimensions it splits")
    if args.params:
        placement = f" and placement on mesh {dict(mesh.shape)}" if shardings else ""
        print(f"\noptimizer '{cfg.optim.name}' rules{placement} per parameter:")
        for row in describe(infos, cfg.optim.name, shardings):
            print("  " + "  ".join(str(c) for c in row))
    return 0


def cmd_prepare(args) -> int:
    from k2jax.data.prepared import prepare

    m = prepare(args.sources, args.out, tokenizer=args.tokenizer, text_field=args.text_field,
                heldout_fraction=args.heldout_fraction, shard_tokens=args.shard_tokens,
                bpe_vocab_size=args.bpe_vocab_size, bos_token=args.bos_token, eos_token=args.eos_token)
    for split, info in m["splits"].items():
        print(f"{split:8s} {info['documents']:,} documents, {info['tokens']:,} tokens, {len(info['files'])} shards")
    total = sum(info["tokens"] for info in m["splits"].values())
    print(f"tokenizer {m['tokenizer']} (vocab {m['vocab_size']:,}); {total / max(m['seconds'], 1e-9):,.0f} "
          f"tokens/s -> {args.out}  (train on it with --set data.corpus={args.out})")
    return 0


def cmd_sweep(args) -> int:
    from k2jax.sweep.grid import launch_commands, load_sweep, run_sweep

    sweep = load_sweep(args.file)
    if args.print_commands:
        print("\n".join(launch_commands(sweep, args.extra)))
        return 0
    print(f"results: {run_sweep(sweep)}")
    return 0


def cmd_analyze(args) -> int:
    from k2jax.sweep.analysis import analyze
    from k2jax.sweep.grid import load_sweep, run_dirs, write_results

    if Path(args.file).is_dir():  # a results.csv kept without its sweep file (e.g. experiments/results/*)
        sweep_dir, title = Path(args.file), Path(args.file).name
    else:
        sweep = load_sweep(args.file)
        sweep_dir, title = sweep.out_dir, sweep.name
        if run_dirs(sweep):
            write_results(sweep)  # keeps the rows of runs whose directories are gone
        elif (sweep_dir / "results.csv").is_file():
            print(f"{sweep_dir} has no run directories: analysing its results.csv as it is")
    result = analyze(sweep_dir, arm=args.arm, reference=args.reference, y=args.y, title=title, curves=args.curves,
                     best_over=args.best_over)
    print(json.dumps(result, indent=2))
    for name, fit in result["arms"].items():
        if fit["degenerate"]:
            print(f"arm {name}: degenerate fit ({fit['degenerate']}); its numbers are not estimates")
    print(f"report: {sweep_dir / 'report' / 'report.md'}")
    return 0


def cmd_sample(args) -> int:
    import warnings

    from k2jax.generate import load
    from k2jax.inference.engine import SamplingParams

    run = load(args.run_dir, args.step)  # a CheckpointError exits 3, naming the directory
    engine = run.engine(max_batch=args.num_samples, max_len=len(run.prompt_ids(args.prompt)) + args.tokens)
    params = [SamplingParams(max_tokens=args.tokens, temperature=args.temperature, top_k=args.top_k or 0,
                             top_p=args.top_p, seed=args.seed + i, stop=tuple(args.stop))
              for i in range(args.num_samples)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            requests = [engine.submit(args.prompt, p) for p in params]
        except ValueError as e:  # a bad setting or a prompt too long for the model: an input error
            raise ConfigError(f"sample: {e}") from None
    for w in caught:  # generating past the trained length says so, once, on stderr
        print(f"warning: {w.message}", file=sys.stderr)
    while engine.step():
        pass
    for i, r in enumerate(requests):
        done = r.completion
        print(f"--- sample {i + 1} (step {run.step}, {done.finish_reason}) ---\n{args.prompt}{done.text}")
    return 0


def cmd_eval(args) -> int:
    from k2jax.data import corpus as corpus_lib, prepared, tokenizer as tokenizer_lib
    from k2jax.eval.qa import engine_generate
    from k2jax.eval.scoring import ModelParts
    from k2jax.eval.sources import HELDOUT
    from k2jax.eval.suite import Suite, format_table, write_results
    from k2jax.generate import load_run
    from k2jax.train.checkpoint import CheckpointError

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    for flag, value in (("--batch-size", args.batch_size), ("--max-bytes", args.max_bytes),
                        ("--max-items", args.max_items)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be positive, got {value}")
    cfg = load_config(run_dir / "config.yaml")
    names = [n for n in args.tasks.split(",") if n]
    if not names and not args.text:
        raise ConfigError("--tasks: name at least one set or task (e.g. heldout,stdlib_mc), or pass --text")
    heldout = None
    if HELDOUT in names and not prepared.is_prepared(cfg.data.corpus):
        heldout = corpus_lib.load_corpus(cfg.data)[1]
    # every set and task is read and checked before the checkpoint is restored
    suite = Suite.build(tokenizer_lib.load(run_dir / "tokenizer"), cfg.data.seq_len,
                        texts=[n for n in names if n == HELDOUT] + args.text, tasks=[n for n in names if n != HELDOUT],
                        heldout=heldout, max_bytes=args.max_bytes, max_items=args.max_items,
                        where=("--text", "--tasks"))
    run = load_run(run_dir, args.step)  # a CheckpointError exits 3
    generate = engine_generate(run.model, run.tokenizer, args.batch_size) if suite.qa_tasks else None
    results = suite.run(ModelParts.of(run.model), args.batch_size, generate)
    path = run_dir / "eval" / f"step_{run.step}.json"
    write_results(path, run.step, results)
    print(f"step {run.step} of {run_dir}, rows of {cfg.data.seq_len} tokens (data.seq_len)\n{format_table(results)}\n"
          f"-> {path}")
    return 0


def cmd_export(args) -> int:
    import shutil

    from flax import nnx

    from k2jax.generate import load_run
    from k2jax.interop.deepseek_v3 import config_to_hf, save_hf_checkpoint

    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export: {out} already exists and is not an empty directory; choose a new OUT_DIR")
    run = load_run(args.run_dir, args.step)  # a CheckpointError exits 3
    config_to_hf(run.config.model)  # a model the layout cannot hold (InteropError, exit 2) before anything is written
    _, params, rest = nnx.split(run.model, nnx.Param, ...)
    save_hf_checkpoint(out, nnx.to_pure_dict(params), nnx.to_pure_dict(rest), run.config.model,
                       fused_experts=args.fused_experts, dtype=args.dtype)
    shutil.copytree(Path(args.run_dir) / "tokenizer", out / "tokenizer")
    print(f"step {run.step} of {args.run_dir} -> {out} (config.json, {args.dtype} safetensors; the run's tokenizer in "
          f"{out / 'tokenizer'})")
    return 0


def cmd_import(args) -> int:
    from k2jax.interop.importer import import_run
    from k2jax.parallel import distributed

    distributed.initialize(auto=args.distributed == "auto", coordinator=args.coordinator,
                           num_processes=args.num_processes, process_id=args.process_id)
    stats = import_run(args.hf_dir, args.run_dir, args.set,
                       log=print if distributed.is_primary() else lambda _: None)
    if distributed.is_primary():
        print(f"{args.hf_dir} -> {args.run_dir}: {stats.line()}; continue it with `k2jax train "
              f"{Path(args.run_dir) / 'config.yaml'} --resume` (data and optimizer settings may change)")
    return 0


def cmd_serve(args) -> int:
    import logging

    from k2jax.inference.server import serve

    if args.max_batch < 1 or (args.max_len is not None and args.max_len < 2) or not 0 <= args.port < 65536:
        raise ConfigError(f"serve: --max-batch must be at least 1 (got {args.max_batch}), --max-len at least 2 "
                          f"(got {args.max_len}) and --port in 0..65535 (got {args.port})")
    handler = logging.StreamHandler(sys.stderr)  # progress, requests and batch sizes on stderr
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    for name in ("k2jax", "uvicorn"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return serve(args.run_dir, host=args.host, port=args.port, max_batch=args.max_batch, max_len=args.max_len,
                 step=args.step, served_model_name=args.served_model_name)  # a bad RUN_DIR exits 3


def cmd_rephrase(args) -> int:
    import os

    from k2jax.data.prepared import iter_source
    from k2jax.rephrase.client import Client, GenerationError
    from k2jax.rephrase.fidelity import make_check
    from k2jax.rephrase.job import GeneratorDown, Job
    from k2jax.rephrase.prompts import load_styles

    if (args.base_url is None) == (args.local is None):
        raise ConfigError("rephrase: give --base-url URL (a server) or --local RUN_DIR (the model in this process), "
                          "one of the two")
    if args.local is None and args.model is None:
        raise ConfigError("rephrase: --base-url needs --model, the name of the model the server serves")
    if args.local is None and args.max_len is not None:
        raise ConfigError("--max-len is for --local (a server has its own)")
    if args.local is not None and args.fidelity == "embedding":
        raise ConfigError("--fidelity embedding needs a server's embeddings; with --local use --fidelity facts or "
                          "judge")
    if args.local is not None and (args.concurrency < 1 or (args.max_len is not None and args.max_len < 2)):
        raise ConfigError(f"--concurrency (the engine's slots) must be at least 1 (got {args.concurrency}) and "
                          f"--max-len at least 2 (got {args.max_len})")
    styles = load_styles(args.styles)
    index, _, count = args.shard.partition("/")
    if not (index.isdigit() and count.isdigit()):
        raise ConfigError(f"--shard must be I/N (e.g. 0/4), got {args.shard!r}")
    if next(iter_source(args.source), None) is None:
        raise ConfigError(f"rephrase: {args.source} holds no documents")
    if args.judge_model and args.fidelity != "judge":
        raise ConfigError("--judge-model is the model of --fidelity judge; add --fidelity judge or leave it out")
    if args.local is not None:
        from k2jax.rephrase.local import LocalClient

        # a directory that is not a run exits 3; the engine is compiled (warmed up) before any work
        client = LocalClient(args.local, args.model, endpoint=args.endpoint, max_batch=args.concurrency,
                             max_len=args.max_len)
        where = args.local
    else:
        client = Client(args.base_url, args.model, endpoint=args.endpoint, api_key=os.environ.get("OPENAI_API_KEY"),
                        timeout=args.timeout, retries=args.request_retries)
        where = f"the server at {args.base_url}"
    with client:
        try:
            served = client.served_models()
        except GenerationError as e:
            raise GeneratorDown(str(e)) from None
        for flag, model in (("--model", args.model), ("--judge-model", args.judge_model)):
            if model and model not in served:
                raise ConfigError(f"{flag}: {where} serves {served}, not {model!r}")
        check = make_check(args.fidelity, client, args.min_fidelity, args.judge_model)
        if args.fidelity == "embedding":
            try:
                client.embed(["a test sentence"])
            except GenerationError as e:
                raise ConfigError(f"--fidelity embedding: the server gives no embeddings ({e}); use --fidelity facts")
        job = Job(args.source, args.out, client, styles, rephrasings=args.rephrasings, concurrency=args.concurrency,
                  chunk_tokens=args.chunk_tokens, check=check, retries=args.retries, seed=args.seed,
                  temperature=args.temperature, max_tokens=args.max_tokens, shard_records=args.shard_records,
                  shard=(int(index), int(count)), file_format=args.format, progress=sys.stderr.isatty())
        s = job.run()
    print(f"{s['documents']:,} documents x {args.rephrasings} rephrasings: {s['rewrites']:,} rewrites, "
          f"{s['dropped']:,} dropped, {s['chunk_retries']:,} chunk retries, {s['completion_tokens']:,} tokens "
          f"generated ({s['pairs_this_launch']:,} pairs in this launch) -> {args.out}")
    if args.local is not None:
        stats = client.engine.stats
        print(f"engine: {stats['decode_rows'] / max(stats['decode_calls'], 1):.1f} requests per decode call "
              f"on average, {client.engine.max_batch} slots")
    return 0


def cmd_bench(args) -> int:
    from k2jax.tools.bench import bench, format_table, optimizer_variants

    cfg = _load(args.config, args.set)
    if args.compare:
        key, sep, values = args.compare.partition("=")
        if not sep or not values:
            raise ConfigError(f"--compare: expected KEY=VALUE1,VALUE2,..., got {args.compare!r}")
        variants = {v: _load(args.config, [*args.set, f"{key}={v}"]) for v in values.split(",")}
    else:
        variants = optimizer_variants(cfg)
    print(format_table(bench(variants, steps=args.steps, warmup=args.warmup, profile_dir=args.profile), cfg))
    if args.profile:
        print(f"profile of one step per variant -> {args.profile}")
    return 0


def cmd_lower(args) -> int:
    import time

    from k2jax.tools.lowering import lower_train_step, summarize

    cfg = _load(args.config, args.set)
    started = time.perf_counter()
    lowered, mesh = lower_train_step(cfg, args.platform)
    seconds = time.perf_counter() - started
    text = lowered.as_text()
    print(f"train step lowered for {args.platform} in {seconds:.1f} s ({len(text):,} characters of StableHLO; "
          f"batch {cfg.train.batch_size} x {cfg.data.seq_len}, {cfg.train.grad_accum} micro-batches, "
          f"mesh {mesh})")
    for name, count in summarize(lowered).items():
        print(f"  {name:22s} {count:6d}")
    if args.out:
        Path(args.out).write_text(text)
        print(f"StableHLO -> {args.out}")
    return 0


def cmd_plan(args) -> int:
    import jax

    jax.config.update("jax_platforms", "cpu")  # compiled for the slice, never run here: leave any TPU alone
    # a deviceless TPU executable does not load back from JAX's persistent cache (it warns, then compiles
    # again): keep plan's programs out of a cache the user set
    jax.config.update("jax_enable_compilation_cache", False)
    from k2jax.tools.plan import format_report, plan

    cfg = _load(args.config, args.set)
    report = plan(cfg, args.topology, tuple(args.parts.split(",")), args.hlo, decode_batch=args.decode_batch,
                  decode_len=args.decode_len, decode_steps=args.decode_steps)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"report -> {args.json}")
    return 0 if all(p["fits"] for p in report["parts"].values()) else 1


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and its flags."""
    parser = argparse.ArgumentParser(prog="k2jax", description=__doc__, epilog=EXIT_STATUS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from an experiment YAML")
    p.add_argument("config", nargs="?", help="experiment YAML (e.g. experiments/default.yaml) or a model preset name; "
                   "optional with --init-from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir")
    p.add_argument("--init-from", metavar="HF_DIR", help="start from a DeepSeek-V3 / Kimi-K2 checkpoint directory "
                   "(bf16, FP8 or int4; its config.json is the model, CONFIG sets the rest)")
    g = p.add_argument_group("multi-process (run the same command in every process)")
    g.add_argument("--distributed", choices=["auto"], help="detect the cluster (TPU VM pod slices, SLURM, Open MPI)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, elsewhere")
    g.add_argument("--num-processes", type=int, metavar="N")
    g.add_argument("--process-id", type=int, metavar="I")
    g.add_argument("--heartbeat-timeout", type=int, default=30, metavar="SECONDS",  # = DEFAULT_HEARTBEAT_TIMEOUT_S
                   help="a process whose host stops answering this long is lost and the run ends in every process "
                   "(exit 7); a killed or crashed process is noticed at once (default 30)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("info", help="parameter counts (from the abstract model) and optimizer rules")
    p.add_argument("--config", default="small", help="a model preset name (kimi-k2 and deepseek-v3 with their "
                   "published training batch) or an experiment YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (train.batch_size, data.seq_len: the step Newton-Schulz is "
                   "compared with)")
    p.add_argument("--params", action="store_true",
                   help="list every parameter, its optimizer rule and (on a mesh of several devices) its placement")
    p.add_argument("--devices", type=int, metavar="N",
                   help="devices of the mesh, for a -1 mesh axis (default: the fixed axes' product; -1 counts 1)")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("prepare", help="tokenize text/JSONL/Parquet/HF datasets into ArrayRecord shards")
    p.add_argument("sources", nargs="+", help="files, directories, 'stdlib', or hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--out", required=True, help="new directory to write (refused if it exists)")
    p.add_argument("--tokenizer", default="byte",
                   help="byte | bpe (trained on the sources) | path to tokenizer.json | path to sentencepiece .model "
                        "| a prepared corpus or run directory whose tokenizer to reuse (mixtures need one tokenizer)")
    p.add_argument("--bpe-vocab-size", type=int, default=8192)
    p.add_argument("--bos-token", help="bos token of a tokenizer.json (default: detected)")
    p.add_argument("--eos-token", help="eos token of a tokenizer.json (default: detected)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--heldout-fraction", type=float, default=0.01)
    p.add_argument("--shard-tokens", type=int, default=50_000_000, help="ids per ArrayRecord shard")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("sweep", help="run a grid of trainings from a sweep YAML (finished runs are skipped)")
    p.add_argument("file", help="sweep YAML, e.g. experiments/sweeps/optimizer_cpu.yaml")
    p.add_argument("--print-commands", action="store_true", help="print one `k2jax train` command per run instead")
    p.add_argument("--extra", default="", help="flags appended to printed commands, e.g. '--distributed auto'")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("analyze", help="fit loss vs compute per arm; plots and a Markdown report")
    p.add_argument("file", help="the sweep YAML whose results to analyze, or a directory holding a results.csv")
    p.add_argument("--arm", help="results column that defines the arms (e.g. optim.name)")
    p.add_argument("--reference", help="the arm multipliers are measured against (default: the first)")
    p.add_argument("--y", default="final_eval_loss", help="results column to fit (default final_eval_loss; "
                   "e.g. eval/bpb/heldout from an eval section)")
    p.add_argument("--curves", action="store_true",
                   help="fit each run's held-out curve (constant-lr runs) instead of one point per run")
    p.add_argument("--best-over", metavar="AXIS",
                   help="keep only the best run among runs differing in this axis (e.g. optim.learning_rate)")
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("sample", help="sample text from a run's checkpoint or a Hugging Face directory "
                       "(KV-cached, the samples batched)")
    p.add_argument("run_dir", help="a run directory written by `k2jax train` (train.out_dir), or a Hugging "
                   "Face directory (`k2jax export`)")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens whose "
                   "probability reaches p")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end a sample at this text")
    p.add_argument("--num-samples", type=int, default=1, help="samples drawn together, seeds seed, seed + 1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("eval", help="bits per byte, multiple-choice and QA tasks on a run's checkpoint "
                       "-> RUN_DIR/eval/step_N.json")
    p.add_argument("run_dir", help="a run directory written by `k2jax train`")
    p.add_argument("--tasks", default="heldout,stdlib_mc",
                   help="comma-separated: heldout (bits per byte on the run's held-out text), shipped tasks "
                   "(stdlib_mc, stdlib_qa) or .jsonl task files")
    p.add_argument("--text", action="append", default=[], metavar="NAME=PATH",
                   help="also score bits per byte on a text file, directory or JSONL ('text' field); repeatable")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--batch-size", type=int, default=16, help="rows of data.seq_len tokens per forward pass")
    p.add_argument("--max-bytes", type=int, metavar="N", help="score only the first N bytes of each text set")
    p.add_argument("--max-items", type=int, metavar="N", help="score only the first N items of each task")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face DeepSeek-V3 model "
                       "(config.json + model.safetensors)")
    p.add_argument("run_dir", help="a run directory written by `k2jax train`")
    p.add_argument("out_dir", help="new (or empty) directory to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--fused-experts", action="store_true",
                   help="write experts as fused tensors (transformers' in-memory layout) instead of one per expert")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32",
                   help="float32; bfloat16; fp8: FP8 e4m3 projections with 128x128 block scales, as DeepSeek-V3 and "
                   "Kimi-K2 are released (the rest bfloat16)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("import", help="a Hugging Face DeepSeek-V3 / Kimi-K2 checkpoint (bf16, FP8 block-scaled, int4 "
                       "experts) as a run directory, streamed into the run's sharding")
    p.add_argument("hf_dir", help="directory with config.json, *.safetensors and a tokenizer")
    p.add_argument("run_dir", help="new run directory to write")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run setting (mesh.*, optim.*, data.*, model.param_dtype, ...)")
    g = p.add_argument_group("multi-process (run the same command in every process; each reads what its devices hold)")
    g.add_argument("--distributed", choices=["auto"])
    g.add_argument("--coordinator", metavar="HOST:PORT")
    g.add_argument("--num-processes", type=int, metavar="N")
    g.add_argument("--process-id", type=int, metavar="I")
    p.set_defaults(fn=cmd_import)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions) "
                       "over a run's checkpoint; concurrent requests share device batches")
    p.add_argument("run_dir", help="a run directory written by `k2jax train`, or a directory `k2jax export` wrote")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one, printed)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most (engine slots)")
    p.add_argument("--max-len", type=int, help="longest prompt + max_tokens a request may have; the KV cache "
                   "holds max-batch x max-len positions (default: the model's max_seq_len)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--served-model-name", help="the model name clients send (default: the run directory's name)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("rephrase", help="rewrite a corpus through an OpenAI-compatible server (or a run loaded "
                       "here: --local), chunk by chunk in several styles, with fidelity checks; resumable (rerun the "
                       "same command)")
    p.add_argument("source", help="what `k2jax prepare` reads: a file, a directory, 'stdlib' or hf:NAME")
    p.add_argument("--out", required=True, help="directory of the parts, manifest.json and summary.json")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"], help="the parts' file format")
    p.add_argument("--base-url", help="the server's API root, e.g. http://127.0.0.1:8000/v1 (an API key, if it "
                   "needs one, from $OPENAI_API_KEY)")
    p.add_argument("--local", metavar="RUN_DIR", help="instead of --base-url: generate in this process from a run "
                   "directory (or a `k2jax export` one), the concurrent requests batched by one engine with "
                   "--concurrency slots")
    p.add_argument("--model", help="the model name the server serves; with --local, the name recorded (default: "
                   "the run directory's name)")
    p.add_argument("--max-len", type=int, help="with --local: the longest prompt + max_tokens; the KV cache holds "
                   "concurrency x max-len positions (default: the model's max_seq_len)")
    p.add_argument("--styles", default="knowledge", help="a shipped prompt set (knowledge, math) or a YAML file")
    p.add_argument("--rephrasings", type=int, default=1, help="rewrites per document, in different styles")
    p.add_argument("--concurrency", type=int, default=8, help="rewrites in flight at once")
    p.add_argument("--chunk-tokens", type=int, default=300, help="the longest chunk (tokens estimated)")
    p.add_argument("--max-tokens", type=int, help="max_tokens of a chunk's rewrite (default: 2 x chunk-tokens)")
    p.add_argument("--fidelity", default="facts", choices=["facts", "embedding", "judge"], help="the check of "
                   "every chunk: numbers and names kept, embedding cosine, or an LLM judge's score (1-5)")
    p.add_argument("--min-fidelity", type=float, help="accept at this score in [0, 1] (default: facts 0.9, "
                   "embedding 0.85, judge 0.75, i.e. 4 of 5)")
    p.add_argument("--judge-model", help="the model that judges with --fidelity judge, on the same server "
                   "(default: --model)")
    p.add_argument("--retries", type=int, default=3, help="new seeds for a chunk that fails, before the rewrite "
                   "is dropped")
    p.add_argument("--request-retries", type=int, default=6, help="tries again of a request that fails (429, "
                   "5xx, timeout, a broken reply), with exponential backoff")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a reply")
    p.add_argument("--endpoint", default="chat", choices=["chat", "completions"], help="the API the prompts go to")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0, help="the seed the request seeds derive from")
    p.add_argument("--shard-records", type=int, default=1000, help="rewrites per part")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="this worker's part of the documents")
    p.set_defaults(fn=cmd_rephrase)

    p = sub.add_parser("bench", help="train-step time, tokens/s, MFU, memory: MuonClip vs Muon vs AdamW")
    p.add_argument("config", help="experiment YAML or a model preset name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--compare", metavar="KEY=V1,V2,...", help="time these values of one config key "
                   "(e.g. execution.expert_parallel=all_gather,gspmd) instead of the three optimizers")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--profile", metavar="DIR", help="trace one more step of each variant into DIR (jax.profiler)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("lower", help="lower the train step for GPU or TPU on this machine (nothing allocated): "
                       "proves the program, Pallas kernels included, lowers there; counts kernels and collectives")
    p.add_argument("config", help="experiment YAML or a model preset name")
    p.add_argument("--platform", default="cuda", choices=["cuda", "rocm", "tpu", "cpu"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", help="write the StableHLO text here")
    p.set_defaults(fn=cmd_lower)

    p = sub.add_parser("plan", help="compile the train step for a TPU slice without a TPU (libtpu): HBM per "
                       "device and whether it fits, FLOPs and collective bytes per device, a step-time bound")
    p.add_argument("config", help="experiment YAML or a model preset name")
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5p:2x2x2, v5p:8x8x8, v6e:16x16, v4:4x4x4")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--parts", default="step,grads,update",
                   help="programs to compile: the whole step, its forward+backward, its optimizer update; "
                   "or decode (one chunk of the generation engine's decode over a full cache)")
    p.add_argument("--decode-batch", type=int, default=32, help="decode: cache slots (rounded up to the batch shards)")
    p.add_argument("--decode-len", type=int, default=32768, help="decode: positions per slot, all attended")
    p.add_argument("--decode-steps", type=int, default=1, help="decode: steps in the compiled chunk")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--hlo", metavar="DIR", help="also write each part's optimized HLO (every collective) to DIR")
    p.set_defaults(fn=cmd_plan)

    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback of an error")
    return parser


def _failure(e: BaseException) -> tuple[int, str]:
    """(exit status, one line) for an error; see EXIT_STATUS."""
    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted; a training run continues from its last checkpoint with --resume"
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        hint = f"; {_OS_HINTS[e.errno]}" if e.errno in _OS_HINTS else ""
        return 5, f"I/O error: {where}{e.strerror or e}{hint}"
    if isinstance(e, ConfigError):
        return e.exit_code, f"config error: {e}"
    if hasattr(e, "exit_code"):
        return e.exit_code, str(e)
    return 1, f"unexpected error: {type(e).__name__}: {_gist(e)} (run again with --debug for the traceback)"


def _gist(e: BaseException) -> str:
    text = str(e).strip().split("\n")[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _not_orbax(record) -> bool:
    return "orbax" not in record.pathname


def _quiet_background_errors() -> None:
    """Without --debug: no log lines from orbax and asyncio (a failed save reaches us as an exception,
    with a log line and a traceback per failed write beside it), and one line, not a traceback, per
    distinct error raised in a background thread or callback."""
    import logging
    import threading

    logging.getLogger("absl").addFilter(_not_orbax)  # a function, not a lambda: added once per process
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    seen = set()

    def one_line(exc_type, exc_value):
        line = f"error in the background: {exc_type.__name__}: {_gist(exc_value)}"
        if line not in seen:
            seen.add(line)
            print(line, file=sys.stderr)

    threading.excepthook = lambda a: one_line(a.exc_type, a.exc_value)
    sys.unraisablehook = lambda a: one_line(a.exc_type, a.exc_value)


def main(argv: list[str] | None = None) -> int:
    from k2jax.platform import skip_absent_tpu

    skip_absent_tpu()
    args = build_parser().parse_args(argv)
    if not args.debug:
        _quiet_background_errors()
    try:
        return args.fn(args)
    except (Exception, KeyboardInterrupt) as e:
        if args.debug:
            traceback.print_exc()
        code, message = _failure(e)
        print(f"k2jax {args.command}: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
