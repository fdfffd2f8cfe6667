"""Rephrasing (K2's knowledge and math rewriting): `k2jax rephrase` rewrites a corpus through an
OpenAI-compatible server (or a k2jax run in-process), chunk by chunk and style by style, checks each chunk's fidelity and
writes JSONL or Parquet parts with provenance, resumably. chunking.py cuts documents, prompts.py loads the
prompt sets (prompts/*.yaml), client.py talks to the server, local.py to an in-process engine, fidelity.py scores rewrites and
job.py runs the job."""
