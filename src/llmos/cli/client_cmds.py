"""`llmos chat` and `llmos embed`: clients of a running server, through the official openai package."""

from __future__ import annotations

from typing import Annotated

import typer

from llmos.cli.common import api_client, console, err_console, settings_from

KeyOpt = Annotated[str | None, typer.Option("--api-key", help="API key (or LLMOS_API_KEY).")]
HostOpt = Annotated[str | None, typer.Option(help="Server host (LLMOS_HOST).")]
PortOpt = Annotated[int | None, typer.Option(help="Server port (LLMOS_PORT).")]


def chat(
    model: Annotated[str, typer.Argument(help="Chat model to talk to.")],
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 is greedy).")] = 0.7,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 512,
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Chat interactively, answers streamed as they are generated. Empty line or Ctrl-D quits."""
    import openai

    client = api_client(settings_from(host=host, port=port), api_key)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            prompt = console.input("[bold cyan]>>> [/bold cyan]")
        except (EOFError, KeyboardInterrupt):
            break
        if not prompt.strip():
            break
        messages.append({"role": "user", "content": prompt})
        answer = ""
        try:
            stream = client.chat.completions.create(
                model=model,
                messages=messages,
                temperature=temperature,
                max_tokens=max_tokens,
                stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    answer += chunk.choices[0].delta.content
                    console.print(chunk.choices[0].delta.content, end="", markup=False, highlight=False)
        except openai.APIError as exc:
            err_console.print(f"\n[red]error:[/red] {exc}")
            messages.pop()
            continue
        console.print()
        messages.append({"role": "assistant", "content": answer})


def embed(
    model: Annotated[str, typer.Argument(help="Embedding model.")],
    texts: Annotated[list[str], typer.Argument(help="Texts to embed.")],
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Print one JSON embedding per text (and their cosine similarities when several)."""
    import json

    import openai

    client = api_client(settings_from(host=host, port=port), api_key)
    try:
        result = client.embeddings.create(model=model, input=texts)
    except openai.APIError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from exc
    vectors = [d.embedding for d in result.data]
    for text, vector in zip(texts, vectors, strict=True):
        print(json.dumps({"text": text, "dimensions": len(vector), "embedding": vector}))
    if len(vectors) > 1:
        for i in range(len(vectors)):
            for j in range(i + 1, len(vectors)):
                sim = sum(a * b for a, b in zip(vectors[i], vectors[j], strict=True))
                err_console.print(f"cosine({i}, {j}) = {sim:.4f}")
