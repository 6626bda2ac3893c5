"""Encoders (embeddings, sequence and token classification) as ONNX: the model with the platform's
pooling (or its head's logits) traced by ``torch.onnx.export`` (the ``torch.export`` path),
batch and sequence length dynamic, run back in onnxruntime for verification."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ONNX_FILE = "model.onnx"
OUTPUT_NAMES = {"embedding": "embeddings", "sequence-classification": "logits", "token-classification": "logits"}
OPSET = 18


def export_encoder(module: Any, task: str, inputs: dict[str, np.ndarray], path: Path) -> Path:
    """Trace ``module`` (``verify.encoder_module``) on ``inputs`` and write one self-contained file."""
    import torch

    batch, sequence = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2)
    example = {name: torch.from_numpy(value) for name, value in inputs.items()}
    shapes = {name: {0: batch, 1: sequence} for name in example}
    program = torch.onnx.export(
        module,
        (),
        kwargs=example,
        dynamo=True,
        dynamic_shapes=shapes,
        input_names=list(example),
        output_names=[OUTPUT_NAMES[task]],
        opset_version=OPSET,
        external_data=False,
        verbose=False,
    )
    assert program is not None  # dynamo=True always returns the program
    program.save(str(path), external_data=False)
    return path


def run_onnx(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The file's one output for ``inputs`` in onnxruntime on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    (output,) = session.run(None, {k: v for k, v in inputs.items() if k in wanted})
    return np.asarray(output)
