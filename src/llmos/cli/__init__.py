"""The shell of LLM OS: a thin Typer table over library functions."""
