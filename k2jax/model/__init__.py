"""The model: attention (MHA, GQA, MLA), the MoE FFN and its expert-parallel dispatch, the
Transformer, and its parameter and FLOP counts.

Dimension letters of the shape comments in these modules (`(B, T, D)`):

- B: batch rows.
- T: tokens per row: the query positions (the sequence in training, the new tokens when
  decoding). In `grouped_matmul._swiglu_tiled`: the number of row tiles.
- S: key/value positions: T in training, the cache's slots when decoding.
- D: d_model, the residual width. In the flash kernels (flash_attention*.py): a head dim.
- Dqk, Dv: the query/key and the value head dims; MLA's Dqk is nope + R (qk_nope_head_dim +
  qk_rope_head_dim).
- H: query heads.
- G: key/value heads (GQA groups, H = G * R). In `moe.route`: the expert groups of group-limited
  routing (num_expert_groups).
- R: query heads per GQA group (H = G * R). In MLA (attention.py) and rope.py: the rotary
  dims of a head (qk_rope_head_dim; all of head_dim for MHA/GQA).
- C: MLA's latent rank (kv_lora_rank). In moe.py's capacity dispatch: the slots per expert.
- V: vocabulary.
- L: layers of a scanned stack (a leading axis of stacked weights and stats).
- E: routed experts.
- K: routed experts per token (top-k; `k` in the code). In `grouped_matmul._gmm`: the
  contraction dim, lhs (M, K) x rhs (E, K, N).
- N: routed tokens, B x T flattened (in expert_parallel.py N/shards, N/ep: one shard's share;
  N_group: the tokens of the shards that exchange over the expert axis).
  In `grouped_matmul._gmm`: the output columns.
- M: rows of token copies sorted by expert (N x K in `dispatch_ragged`).
- F: an expert's FFN width (expert_ffn_dim).
- QB_BINS: Quantile Balancing's histogram bins (`moe.QB_BINS`).
"""
