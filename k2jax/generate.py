"""Generate text from a trained run or a Hugging Face directory: the Python API.

    import k2jax.generate as gen
    model = gen.load("runs/default")                  # or an exported / DeepSeek-V3-format HF directory
    [c.text for c in model.generate(["def ", "import "], max_tokens=64, temperature=0)]

`load` rebuilds the model (from the run's config.yaml, or from config.json), restores the latest
(or a given) checkpoint onto this machine's devices and loads the tokenizer; `generate` runs the
KV-cached engine (`k2jax.inference.engine`): prompts prefilled in one pass, then one token per
step for the whole batch, each prompt stopping on its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from flax import nnx

from k2jax.config import Config, DataConfig, MeshConfig, load_config
from k2jax.data import tokenizer as tokenizer_lib
from k2jax.inference.engine import Completion, Engine, SamplingParams, encode_prompt
from k2jax.model.transformer import Transformer
from k2jax.train.checkpoint import Checkpointer, CheckpointError
from k2jax.train.step import abstract_train_state


@dataclasses.dataclass
class LoadedRun:
    """A model ready to generate: the model, its tokenizer, its config and where it came from."""
    model: Transformer
    tokenizer: object
    config: Config
    step: int
    name: str = "k2jax"  # the run directory's name, or the HF model's
    trained_len: int | None = None  # tokens per row it trained on (data.seq_len; unknown for HF)
    mesh: object = None  # the mesh the weights are placed on (None: one device)

    def prompt_ids(self, prompt: str) -> np.ndarray:
        """The ids the model is given for `prompt` (bos first, where the tokenizer has one)."""
        return np.asarray(encode_prompt(self.tokenizer, prompt), np.int32)

    def engine(self, **kwargs) -> Engine:
        """A batching engine over this model (Engine's keyword arguments: max_batch, max_len, ...)."""
        kwargs.setdefault("trained_len", self.trained_len)
        kwargs.setdefault("mesh", self.mesh)
        return Engine(self.model, self.tokenizer, **kwargs)

    def generate(self, prompts, *, max_batch: int = 16, **sampling) -> list[Completion]:
        """Complete each prompt (text or token ids); sampling: SamplingParams' fields."""
        params = SamplingParams(**sampling)
        prompts = [self.prompt_ids(p).tolist() if isinstance(p, str) else list(p) for p in prompts]
        longest = max((len(p) for p in prompts), default=1) + params.max_tokens
        engine = self.engine(max_batch=max(1, min(max_batch, len(prompts))), max_len=longest)
        return engine.generate(prompts, params)

    def complete(self, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.8,
                 top_k: int | None = None, seed: int = 0) -> str:
        """The prompt's continuation as text (up to eos or max_new_tokens)."""
        return self.generate([prompt], max_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                             seed=seed)[0].text


def load(path: str | Path, step: int | None = None, *, compute_dtype: str | None = None) -> LoadedRun:
    """A run directory (config.yaml, checkpoints/) or a Hugging Face directory (config.json and
    *.safetensors, as `k2jax export` writes them; its tokenizer in tokenizer/ or tokenizer.json).
    compute_dtype overrides the model's (e.g. "float32" to compare with transformers)."""
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        return load_hf(path, compute_dtype=compute_dtype)
    return load_run(path, step, compute_dtype=compute_dtype)


def load_run(run_dir: str | Path, step: int | None = None, *, compute_dtype: str | None = None) -> LoadedRun:
    """The model and tokenizer of a run directory written by `k2jax train`, its weights on one mesh over
    this machine's devices (mesh.data = all of them, whatever mesh trained it)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = dataclasses.replace(load_config(run_dir / "config.yaml"), mesh=MeshConfig())
    setup, abstract = abstract_train_state(cfg)
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    try:
        state, _, _ = ckpt.restore(abstract, step)
    finally:
        ckpt.close()
    if compute_dtype is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype=compute_dtype))
    model = _with_weights(cfg, state["params"], state["model_state"])
    return LoadedRun(model, tokenizer_lib.load(run_dir / "tokenizer"), cfg, int(state["step"]),
                     run_dir.resolve().name, cfg.data.seq_len, setup.mesh if setup.mesh.size > 1 else None)


def load_hf(directory: str | Path, *, compute_dtype: str | None = None) -> LoadedRun:
    """A DeepSeek-V3 / Kimi-K2 format directory (bf16/float32, FP8 block-scaled or int4 experts) and its
    tokenizer, streamed onto one mesh over this machine's devices."""
    from k2jax.interop.deepseek_v3 import InteropError
    from k2jax.interop.importer import hf_config, import_weights, run_config
    from k2jax.interop.quant import WeightReader

    directory = Path(directory)
    hf = hf_config(directory)
    cfg = run_config(directory, None, [f"model.compute_dtype={compute_dtype}"] if compute_dtype else [])
    cfg = dataclasses.replace(cfg, data=DataConfig(seq_len=min(DataConfig.seq_len, cfg.model.max_seq_len)))
    try:
        tok = tokenizer_lib.from_hf_dir(directory)
    except ValueError as e:
        raise InteropError(str(e)) from None
    setup, abstract = abstract_train_state(cfg)
    params, biases, _ = import_weights(WeightReader(directory), cfg, abstract, hf, log=lambda _: None)
    model = _with_weights(cfg, params, biases)
    name = hf.get("_name_or_path") or directory.resolve().name
    return LoadedRun(model, tok, cfg, 0, name, None, setup.mesh if setup.mesh.size > 1 else None)


def _with_weights(cfg: Config, *states) -> Transformer:
    """The model of `cfg` holding the given weights (no random initialisation first)."""
    model = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0), cfg.execution))
    for state in states:
        nnx.update(model, state)
    return model
