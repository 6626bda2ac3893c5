"""Retrieval: vector stores of tenants' documents (chunked, embedded, indexed) and their search."""
