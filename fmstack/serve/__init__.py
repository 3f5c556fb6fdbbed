"""Serving: paged KV cache, continuous-batching engine, OpenAI-compatible HTTP server."""
