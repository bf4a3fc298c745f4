import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from flywheel.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_KIND_UNSPECIFIED: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_THUMBS: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_RATING: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_PREFERENCE: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_DEMONSTRATION: _ClassVar[FeedbackKind]

class Preference(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREFERENCE_UNSPECIFIED: _ClassVar[Preference]
    PREFERENCE_A: _ClassVar[Preference]
    PREFERENCE_B: _ClassVar[Preference]
    PREFERENCE_TIE: _ClassVar[Preference]
FEEDBACK_KIND_UNSPECIFIED: FeedbackKind
FEEDBACK_KIND_THUMBS: FeedbackKind
FEEDBACK_KIND_RATING: FeedbackKind
FEEDBACK_KIND_PREFERENCE: FeedbackKind
FEEDBACK_KIND_DEMONSTRATION: FeedbackKind
PREFERENCE_UNSPECIFIED: Preference
PREFERENCE_A: Preference
PREFERENCE_B: Preference
PREFERENCE_TIE: Preference

class Interaction(_message.Message):
    __slots__ = ("interaction_id", "pair_id", "pair_side", "prompt", "response", "policy_version", "params", "prompt_tokens", "generated_tokens", "finish_reason", "user_id", "created_at", "model")
    INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    PAIR_SIDE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    interaction_id: str
    pair_id: str
    pair_side: str
    prompt: str
    response: str
    policy_version: int
    params: _common_pb2.SamplingParams
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    user_id: str
    created_at: _timestamp_pb2.Timestamp
    model: str
    def __init__(self, interaction_id: _Optional[str] = ..., pair_id: _Optional[str] = ..., pair_side: _Optional[str] = ..., prompt: _Optional[str] = ..., response: _Optional[str] = ..., policy_version: _Optional[int] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., user_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class FeedbackEvent(_message.Message):
    __slots__ = ("feedback_id", "interaction_id", "pair_id", "kind", "value", "rating_scale", "preference", "demonstration", "comment", "user_id", "policy_version", "created_at")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    RATING_SCALE_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    DEMONSTRATION_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    interaction_id: str
    pair_id: str
    kind: FeedbackKind
    value: int
    rating_scale: int
    preference: Preference
    demonstration: str
    comment: str
    user_id: str
    policy_version: int
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, feedback_id: _Optional[str] = ..., interaction_id: _Optional[str] = ..., pair_id: _Optional[str] = ..., kind: _Optional[_Union[FeedbackKind, str]] = ..., value: _Optional[int] = ..., rating_scale: _Optional[int] = ..., preference: _Optional[_Union[Preference, str]] = ..., demonstration: _Optional[str] = ..., comment: _Optional[str] = ..., user_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PreferencePair(_message.Message):
    __slots__ = ("pair_id", "prompt", "chosen", "rejected", "weight", "margin", "chosen_interaction_id", "rejected_interaction_id", "source_feedback_ids", "source", "created_at")
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTED_INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FEEDBACK_IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    weight: float
    margin: float
    chosen_interaction_id: str
    rejected_interaction_id: str
    source_feedback_ids: _containers.RepeatedScalarFieldContainer[str]
    source: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, pair_id: _Optional[str] = ..., prompt: _Optional[str] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ..., weight: _Optional[float] = ..., margin: _Optional[float] = ..., chosen_interaction_id: _Optional[str] = ..., rejected_interaction_id: _Optional[str] = ..., source_feedback_ids: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class FileDigest(_message.Message):
    __slots__ = ("path", "sha256", "size")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    size: int
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ModelUpdate(_message.Message):
    __slots__ = ("model", "version", "parent", "uri", "files", "metrics", "created_at", "reason", "signature", "signing_key_id", "adapter", "base")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNING_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    parent: int
    uri: str
    files: _containers.RepeatedCompositeFieldContainer[FileDigest]
    metrics: _containers.ScalarMap[str, float]
    created_at: _timestamp_pb2.Timestamp
    reason: str
    signature: bytes
    signing_key_id: str
    adapter: bool
    base: BaseVersion
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., parent: _Optional[int] = ..., uri: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileDigest, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., signature: _Optional[bytes] = ..., signing_key_id: _Optional[str] = ..., adapter: _Optional[bool] = ..., base: _Optional[_Union[BaseVersion, _Mapping]] = ...) -> None: ...

class BaseVersion(_message.Message):
    __slots__ = ("model", "version", "files_sha256")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FILES_SHA256_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    files_sha256: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., files_sha256: _Optional[str] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("topic", "partition", "offset", "key", "value", "consumer_group", "error_type", "error", "attempts", "failed_at")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_AT_FIELD_NUMBER: _ClassVar[int]
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    consumer_group: str
    error_type: str
    error: str
    attempts: int
    failed_at: _timestamp_pb2.Timestamp
    def __init__(self, topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ..., key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., consumer_group: _Optional[str] = ..., error_type: _Optional[str] = ..., error: _Optional[str] = ..., attempts: _Optional[int] = ..., failed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
