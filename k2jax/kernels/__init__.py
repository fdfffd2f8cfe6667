"""How the model runs, apart from what it computes (k2jax/model): flash attention for GPU
(`flash_attention.py`, Triton) and TPU (`flash_attention_tpu.py`, the library's Mosaic kernel),
run per shard (`sharded_attention.py`); the MoE's grouped matmuls (`grouped_matmul.py`); the
expert exchanges over the expert axis (`expert_parallel.py`); and `select.py`, the one place that
picks among them from `execution` and the platform. Every choice here changes the result only
by float rounding (and a bounded expert exchange by the token copies it drops, which it reports).
"""
