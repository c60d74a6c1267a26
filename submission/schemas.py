"""Request/response models of the challenge API (../shared/reference/challenge-api.md).

They generate the server's OpenAPI schema (``GET /openapi.json``), which the fuzz test feeds to
schemathesis. Defaults are the organizers' sample servers'; HELM's extra keys are declared and
used; any other key is accepted and ignored (the contract says unknown keys must be accepted).
Types are strict (``"5"`` is not an int, ``0`` is not a bool; an int is a fine float): a request that
breaks the schema is a 422 that says where, never a silent guess.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Hard caps that make "huge" inputs a 422 before any work; the engine also checks the model's own
# context length (a 422 naming it).
MAX_NEW_TOKENS_CAP = 32768
MAX_TOP_K_PER_TOKEN = 20
MAX_STOP_SEQUENCES = 16


def _encodable(text: str) -> str:
    # JSON can carry lone surrogates ("\ud800") that are not valid Unicode text: refuse them here.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text is not valid Unicode ({err.reason} at index {err.start})") from err
    return text


def integral(value):
    # JSON Schema's "integer" includes 3.0; strict ints would refuse it. Bools and strings stay refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class _Request(BaseModel):
    """Strict types, with integral floats (3.0) accepted where an int is expected."""

    int_fields: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            for name in cls.int_fields:
                if name in data:
                    value = data[name]
                    data[name] = [integral(v) for v in value] if isinstance(value, list) else integral(value)
        return data


class ProcessRequest(_Request):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)
    int_fields = ("num_samples", "num_return_sequences", "max_new_tokens", "top_k", "seed", "top_k_per_token")

    prompt: str = Field(..., min_length=1, description="the prompt (HELM's full few-shot prompt)")
    num_samples: int = Field(1, ge=1, le=64, description="sample servers' name; one completion is returned")
    num_return_sequences: int | None = Field(None, ge=1, le=64,
                                             description="HELM's name; one completion is returned")
    max_new_tokens: int = Field(50, ge=0, le=MAX_NEW_TOKENS_CAP,
                                description="upper bound on completion tokens (0 with echo_prompt scores the prompt)")
    top_k: int = Field(200, ge=0, description="sample from the k most likely tokens (0 = no limit)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    temperature: float = Field(0.8, ge=0.0, le=100.0, description="<= 1e-5 means greedy (HELM sends 1e-7)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="makes sampling reproducible")
    echo_prompt: bool | None = Field(False, description="return the prompt's tokens (with logprobs) before the completion")
    top_k_per_token: int = Field(1, ge=0, le=MAX_TOP_K_PER_TOKEN,
                                 description="how many entries each token's top_logprob holds")
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=MAX_STOP_SEQUENCES,
                                             description="stop before the first occurrence of any of these")

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: str) -> str:
        return _encodable(value)

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        for stop in value or []:
            if stop == "":
                raise ValueError("stop_sequences must not contain an empty string (it would stop at once)")
            _encodable(stop)
        return value


class Token(BaseModel):
    text: str
    logprob: float
    top_logprob: dict[str, float]


class ProcessResponse(BaseModel):
    text: str
    tokens: list[Token]
    logprob: float
    request_time: float


class TokenizeRequest(_Request):
    model_config = ConfigDict(extra="allow", strict=True)
    int_fields = ("max_length",)

    text: str
    truncation: bool = True
    max_length: int = Field(2048, ge=1, le=10_000_000)

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return _encodable(value)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    request_time: float


class DecodeRequest(_Request):
    model_config = ConfigDict(extra="allow", strict=True)
    int_fields = ("tokens",)

    tokens: list[int] = Field(..., max_length=1_000_000)


class DecodeResponse(BaseModel):
    text: str
    request_time: float


class ErrorResponse(BaseModel):
    detail: str | list


class EffectivePromptRequest(_Request):
    """Debug endpoint: what /process would feed the model for ``prompt``."""

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str = Field(..., description="a prompt as a client would send it to /process")
    echo_prompt: bool = Field(False, description="as in /process: echo scoring sends the prompt untemplated")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return _encodable(value)


class EffectivePromptResponse(BaseModel):
    prompt: str = Field(..., description="the text after the server's prompt template")
    tokens: list[int] = Field(..., description="its token ids, as /process feeds them (before truncation)")
    prompt_style: str = Field(..., description="the template applied: raw or a litgpt PromptStyle class name")
