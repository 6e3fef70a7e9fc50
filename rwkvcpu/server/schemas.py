"""The OpenAI API's request and response bodies, as pydantic models (the fields rwkvcpu serves).

Requests ignore fields they do not know (clients send many); a field they know but
cannot honour (`suffix`, `best_of`) is refused by the routes with a 400 naming it. Responses are plain dicts built in app.py in
the shapes below' docstrings describe, as OpenAI's clients parse them.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's ranges, where it has one.
Penalty = Field(None, ge=-2.0, le=2.0)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields both completion endpoints take. top_k, min_p, repetition_penalty and
    penalty_decay are extensions (rwkvcpu's sampling options)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    presence_penalty: Optional[float] = Penalty
    frequency_penalty: Optional[float] = Penalty
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    penalty_decay: Optional[float] = Field(None, ge=0.0, le=1.0)
    logit_bias: Optional[dict[str, float]] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)


class CompletionRequest(Sampling):
    """POST /v1/completions."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    # an assistant's earlier calls (OpenAI's tool_calls list), and which call a tool message answers
    tool_calls: Optional[list] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        """The content as one text (parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Union[str, dict, None] = None
