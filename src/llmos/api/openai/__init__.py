"""OpenAI-compatible endpoints: one folder per endpoint (schemas, serving logic, router)."""
