"""Text of an attached file: plain text, Markdown, HTML, PDF (pypdf) or JSON Lines, recognised by
its name and checked by its content. What cannot be read raises DocumentError with OpenAI's
``last_error`` code."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown"})
HTML_SUFFIXES = frozenset({".html", ".htm"})
SUPPORTED = sorted(TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf", ".jsonl"})


def accept_document(path: Path) -> dict[str, Any]:
    """Upload check of a document: none beyond the size limit. Its type is known from its name
    only when it is attached to a vector store, where what cannot be read fails the attached file
    with OpenAI's ``last_error`` (the upload itself stays usable for other purposes)."""
    return {}


DOCUMENT_PURPOSES = {"assistants": accept_document, "user_data": accept_document}
"""File purposes OpenAI uses for documents that vector stores read."""


class DocumentError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "unsupported_file" or "invalid_file"
        self.message = message


def document_text(path: Path, filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    if suffix in TEXT_SUFFIXES:
        text = _utf8(path)
    elif suffix in HTML_SUFFIXES:
        text = _html_text(_utf8(path))
    elif suffix == ".pdf":
        text = _pdf_text(path)
    elif suffix == ".jsonl":
        text = _jsonl_text(path)
    else:
        raise DocumentError(
            "unsupported_file", f"{filename}: unsupported file type; supported are {', '.join(SUPPORTED)}"
        )
    if not text.strip():
        raise DocumentError("invalid_file", f"{filename}: the file has no text")
    return text


def _utf8(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise DocumentError("invalid_file", "the file is binary, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError("invalid_file", f"the file is not UTF-8 text (byte {exc.start})") from None


class _TextOfHtml(HTMLParser):
    _SKIPPED = frozenset({"script", "style", "head", "template"})
    _BLOCKS = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIPPED:
            self._skipping += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIPPED and self._skipping:
            self._skipping -= 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def _html_text(html: str) -> str:
    parser = _TextOfHtml()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise DocumentError("invalid_file", f"the PDF could not be read: {str(exc)[:200]}") from None


def _jsonl_text(path: Path) -> str:
    """Each line's string values, one record a paragraph."""
    records = []
    for number, line in enumerate(_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DocumentError("invalid_file", f"line {number} is not JSON: {exc.msg}") from None
        records.append("\n".join(_strings(value)))
    return "\n\n".join(records)


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []
