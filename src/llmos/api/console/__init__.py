"""The web console at /ui (docs/console.md)."""
