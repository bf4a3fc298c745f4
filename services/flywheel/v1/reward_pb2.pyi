from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("prompt", "response")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("score", "reward_version")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REWARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    score: float
    reward_version: int
    def __init__(self, score: _Optional[float] = ..., reward_version: _Optional[int] = ...) -> None: ...

class ScoreBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreRequest, _Mapping]]] = ...) -> None: ...

class ScoreBatchResponse(_message.Message):
    __slots__ = ("scores", "reward_version")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    REWARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    reward_version: int
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., reward_version: _Optional[int] = ...) -> None: ...

class RewardInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RewardInfo(_message.Message):
    __slots__ = ("model", "reward_version", "heldout_accuracy", "pairs_trained", "pairs_heldout", "score_mean", "score_std", "training_steps", "online_accuracy", "online_pairs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REWARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PAIRS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    PAIRS_HELDOUT_FIELD_NUMBER: _ClassVar[int]
    SCORE_MEAN_FIELD_NUMBER: _ClassVar[int]
    SCORE_STD_FIELD_NUMBER: _ClassVar[int]
    TRAINING_STEPS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ONLINE_PAIRS_FIELD_NUMBER: _ClassVar[int]
    model: str
    reward_version: int
    heldout_accuracy: float
    pairs_trained: int
    pairs_heldout: int
    score_mean: float
    score_std: float
    training_steps: int
    online_accuracy: float
    online_pairs: int
    def __init__(self, model: _Optional[str] = ..., reward_version: _Optional[int] = ..., heldout_accuracy: _Optional[float] = ..., pairs_trained: _Optional[int] = ..., pairs_heldout: _Optional[int] = ..., score_mean: _Optional[float] = ..., score_std: _Optional[float] = ..., training_steps: _Optional[int] = ..., online_accuracy: _Optional[float] = ..., online_pairs: _Optional[int] = ...) -> None: ...
