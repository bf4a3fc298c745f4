from flywheel.v1 import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUBMIT_STATUS_UNSPECIFIED: _ClassVar[SubmitStatus]
    SUBMIT_STATUS_ACCEPTED: _ClassVar[SubmitStatus]
    SUBMIT_STATUS_SPOOLED: _ClassVar[SubmitStatus]
    SUBMIT_STATUS_DUPLICATE: _ClassVar[SubmitStatus]
    SUBMIT_STATUS_ALREADY_VOTED: _ClassVar[SubmitStatus]
SUBMIT_STATUS_UNSPECIFIED: SubmitStatus
SUBMIT_STATUS_ACCEPTED: SubmitStatus
SUBMIT_STATUS_SPOOLED: SubmitStatus
SUBMIT_STATUS_DUPLICATE: SubmitStatus
SUBMIT_STATUS_ALREADY_VOTED: SubmitStatus

class FeedbackRequest(_message.Message):
    __slots__ = ("feedback_id", "interaction_id", "pair_id", "feedback_token", "user_id", "thumbs", "rating", "preference", "demonstration", "comment")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    INTERACTION_ID_FIELD_NUMBER: _ClassVar[int]
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    THUMBS_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    DEMONSTRATION_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    interaction_id: str
    pair_id: str
    feedback_token: str
    user_id: str
    thumbs: int
    rating: int
    preference: _events_pb2.Preference
    demonstration: str
    comment: str
    def __init__(self, feedback_id: _Optional[str] = ..., interaction_id: _Optional[str] = ..., pair_id: _Optional[str] = ..., feedback_token: _Optional[str] = ..., user_id: _Optional[str] = ..., thumbs: _Optional[int] = ..., rating: _Optional[int] = ..., preference: _Optional[_Union[_events_pb2.Preference, str]] = ..., demonstration: _Optional[str] = ..., comment: _Optional[str] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("feedback_id", "status")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    status: SubmitStatus
    def __init__(self, feedback_id: _Optional[str] = ..., status: _Optional[_Union[SubmitStatus, str]] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[FeedbackRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[FeedbackRequest, _Mapping]]] = ...) -> None: ...

class SubmitBatchResult(_message.Message):
    __slots__ = ("response", "error_code", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: FeedbackResponse
    error_code: str
    error: str
    def __init__(self, response: _Optional[_Union[FeedbackResponse, _Mapping]] = ..., error_code: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitBatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitBatchResult, _Mapping]]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("user_id", "ttl_s")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    ttl_s: int
    def __init__(self, user_id: _Optional[str] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session", "user_id", "expires_at")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    session: str
    user_id: str
    expires_at: int
    def __init__(self, session: _Optional[str] = ..., user_id: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...
