"""Format conversion: a GGUF checkpoint becomes a plain safetensors model directory (bf16).

transformers de-quantises GGUF on load; we drop its quantisation config and rebuild the
model from its config so the saved directory loads anywhere in a second or two.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llmos.errors import ArtifactError

log = logging.getLogger(__name__)


def gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (bf16)", gguf_path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many kinds for unsupported or broken GGUF
        raise ArtifactError(
            f"{gguf_path.name}: cannot convert GGUF ({type(exc).__name__}: {exc})", code="unsupported_artifact"
        ) from exc
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in quantised.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings legitimately leave lm_head out of the state dict.
    missing = [k for k in missing if not k.startswith("lm_head.")]
    if missing or unexpected:
        raise ArtifactError(
            f"{gguf_path.name}: converted weights do not match the architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
            code="unsupported_artifact",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del quantised, model, state
    return out_dir
