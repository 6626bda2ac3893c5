"""Bodies of POST /v1/moderations (OpenAI's) and of a tenant's moderation policy (native, admin)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from llmos.api.admin.schemas import AdminModel
from llmos.api.openai.common import StrictModel
from llmos.api.tasks.common import ModelField
from llmos.errors import InvalidRequestError


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ImagePart(StrictModel):
    type: Literal["image_url"]
    image_url: dict[str, Any]


class ModerationRequest(StrictModel):
    """OpenAI's two fields; any other is refused with a 400 naming it."""

    model_config = ConfigDict(strict=True, extra="forbid")

    input: str | list[str] | list[TextPart | ImagePart]
    model: ModelField | None = None

    def texts(self) -> str | list[str]:
        """The texts to moderate; an image is refused (the platform's moderation models read text)."""
        if isinstance(self.input, str):
            return self.input
        if not self.input:
            raise InvalidRequestError("input must hold at least one text", param="input")
        texts = []
        for part in self.input:
            if isinstance(part, ImagePart):
                raise InvalidRequestError(
                    "image inputs are not supported: moderation here runs text classification models",
                    param="input",
                )
            texts.append(part if isinstance(part, str) else part.text)
        return texts


class PolicyBody(AdminModel):
    model: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    threshold: float | None = None
    check_input: bool = False
    check_output: bool = False
    label_map: dict[str, str] | None = None
    blocked_terms: dict[str, list[str]] | None = None
