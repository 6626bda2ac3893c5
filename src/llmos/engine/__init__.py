"""The CPU of LLM OS: inference backends behind one protocol."""

from llmos.engine.protocol import (
    ClassificationResult,
    EmbeddingResult,
    EngineClient,
    Entity,
    EntityResult,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelHandle,
    ModelInfo,
    PairScores,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)

__all__ = [
    "ClassificationResult",
    "EmbeddingResult",
    "EngineClient",
    "Entity",
    "EntityResult",
    "FinishReason",
    "GenerationDelta",
    "GenerationRequest",
    "ModelHandle",
    "ModelInfo",
    "PairScores",
    "SamplingParams",
    "TokenLogprob",
    "TopLogprob",
]
