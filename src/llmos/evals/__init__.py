"""Evaluations: OpenAI's Evals API (graders, templates, runs) and the paired comparison of two runs."""
