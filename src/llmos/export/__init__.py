"""Export of registered models for other runtimes: a merged Hugging Face directory, GGUF for
llama.cpp, ONNX for encoders; each verified against the torch model before it is offered."""

from llmos.export.formats import FORMATS, ExportFormat
from llmos.export.service import EXPORT_PURPOSE, ExportOperation, ExportOperations, model_exports

__all__ = ["EXPORT_PURPOSE", "FORMATS", "ExportFormat", "ExportOperation", "ExportOperations", "model_exports"]
