"""Serving: continuous batching over a paged KV cache (`engine`, `blocks`)."""
