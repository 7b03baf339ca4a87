"""Corpora and token arrays: where text comes from and how it becomes tokens on disk."""
