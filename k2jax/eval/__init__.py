"""Evaluation: bits per byte on text sets, multiple-choice log-likelihood tasks, generative exact-match QA.

scoring: spans of tokens packed into (B, T) rows, one jitted forward pass. bpb, choice, qa: the three
measures. sources: text sets and JSONL task files (shipped ones in tasks/, written by build_tasks.py).
suite: what `k2jax eval` and the training loop's `eval` section run.
"""
