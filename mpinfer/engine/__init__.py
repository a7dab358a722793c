"""The batch engine: scheduler, paged KV cache, sampling."""
