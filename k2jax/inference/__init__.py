"""Generation: KV caches, sampling, the batching engine, the OpenAI-compatible server."""
