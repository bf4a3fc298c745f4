from flywheel.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "params", "user_id", "messages")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    params: _common_pb2.SamplingParams
    user_id: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, prompt: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., user_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "interaction_id", "policy_version", "feedback_token", "finish_reason", "prompt_tokens", "generated_tokens", "tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    interaction_id: str
    policy_version: int
    feedback_token: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    tokens: _containers.RepeatedCompositeFieldContainer[_common_pb2.Token]
    def __init__(self, text: _Optional[str] = ..., interaction_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., feedback_token: _Optional[str] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[_common_pb2.Token, _Mapping]]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("token", "text", "final")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    token: _common_pb2.Token
    text: str
    final: GenerateResponse
    def __init__(self, token: _Optional[_Union[_common_pb2.Token, _Mapping]] = ..., text: _Optional[str] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class GeneratePairRequest(_message.Message):
    __slots__ = ("request", "candidate_version")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    request: GenerateRequest
    candidate_version: int
    def __init__(self, request: _Optional[_Union[GenerateRequest, _Mapping]] = ..., candidate_version: _Optional[int] = ...) -> None: ...

class GeneratePairResponse(_message.Message):
    __slots__ = ("pair_id", "a", "b", "feedback_token")
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pair_id: str
    a: GenerateResponse
    b: GenerateResponse
    feedback_token: str
    def __init__(self, pair_id: _Optional[str] = ..., a: _Optional[_Union[GenerateResponse, _Mapping]] = ..., b: _Optional[_Union[GenerateResponse, _Mapping]] = ..., feedback_token: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("model", "policy_version", "device", "dtype", "max_context_tokens", "max_input_tokens", "max_new_tokens", "max_concurrent_sequences", "max_queue", "running_sequences", "waiting_requests", "spooled_interactions", "last_swap_error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SPOOLED_INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_SWAP_ERROR_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy_version: int
    device: str
    dtype: str
    max_context_tokens: int
    max_input_tokens: int
    max_new_tokens: int
    max_concurrent_sequences: int
    max_queue: int
    running_sequences: int
    waiting_requests: int
    spooled_interactions: int
    last_swap_error: str
    def __init__(self, model: _Optional[str] = ..., policy_version: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., max_context_tokens: _Optional[int] = ..., max_input_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_concurrent_sequences: _Optional[int] = ..., max_queue: _Optional[int] = ..., running_sequences: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., spooled_interactions: _Optional[int] = ..., last_swap_error: _Optional[str] = ...) -> None: ...
