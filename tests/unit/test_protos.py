"""The generated code matches protos/, and the schema keeps the public contract's names."""

from flywheel.v1 import events_pb2, feedback_pb2, policy_pb2, reward_pb2, trainer_pb2
from tools import protogen


def test_generated_code_is_fresh():
    assert protogen.stale_files() == [], "run `python -m tools.protogen` and commit services/flywheel/v1"


def test_stale_code_is_detected(tmp_path):
    out = tmp_path / "v1"
    protogen.generate(out)
    assert protogen.stale_files(out) == []
    (out / "policy_pb2.py").write_text("# edited by hand\n")
    (out / "extra_pb2.py").write_text("")
    assert protogen.stale_files(out) == ["extra_pb2.py", "policy_pb2.py"]


def _fields(msg) -> set[str]:
    return {f.name for f in msg.DESCRIPTOR.fields}


def test_contract_field_names():
    assert {"prompt", "params", "user_id"} <= _fields(policy_pb2.GenerateRequest)
    assert {
        "text",
        "interaction_id",
        "policy_version",
        "feedback_token",
        "finish_reason",
        "prompt_tokens",
        "generated_tokens",
    } <= _fields(policy_pb2.GenerateResponse)
    assert {"pair_id", "a", "b"} <= _fields(policy_pb2.GeneratePairResponse)
    assert {"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop"} <= _fields(
        policy_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["params"].message_type._concrete_class
    )
    assert {
        "feedback_id",
        "interaction_id",
        "pair_id",
        "feedback_token",
        "user_id",
        "thumbs",
        "rating",
        "preference",
        "demonstration",
        "comment",
    } <= _fields(feedback_pb2.FeedbackRequest)
    assert {"prompt", "response"} <= _fields(reward_pb2.ScoreRequest)
    assert {"score", "reward_version"} <= _fields(reward_pb2.ScoreResponse)


def test_services_have_every_rpc_of_the_design():
    rpcs = {
        policy_pb2: ("Policy", {"Generate", "GenerateStream", "GeneratePair", "GetInfo"}),
        feedback_pb2: ("Feedback", {"Submit", "SubmitBatch", "CreateSession"}),
        reward_pb2: ("Reward", {"Score", "ScoreBatch", "GetInfo"}),
        trainer_pb2: ("Trainer", {"GetStatus", "Pause", "Resume", "Promote", "Rollback", "ListVersions"}),
    }
    for module, (service, methods) in rpcs.items():
        desc = module.DESCRIPTOR.services_by_name[service]
        assert {m.name for m in desc.methods} == methods
        assert desc.full_name == f"flywheel.v1.{service}"


def test_event_messages_round_trip():
    u = events_pb2.ModelUpdate(model="policy", version=3, parent=2, uri="file:///m/policy/v000003")
    u.files.add(path="model.safetensors", sha256="ab" * 32, size=10)
    u.metrics["gate.reward_mean"] = 0.5
    assert events_pb2.ModelUpdate.FromString(u.SerializeToString()) == u
    for name in ("Interaction", "FeedbackEvent", "PreferencePair", "ModelUpdate", "DeadLetter"):
        assert name in events_pb2.DESCRIPTOR.message_types_by_name
