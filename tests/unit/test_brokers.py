import uuid

from tools import kafka


def test_cluster_id_never_starts_with_a_dash(monkeypatch) -> None:
    # 0xF8 encodes to '-' in base64url: one id in 64 did, and kafka-storage read it as an option.
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(kafka.uuid, "uuid4", lambda: next(draws))
    cid = kafka.new_cluster_id()
    assert cid == "AQEBAQEBAQEBAQEBAQEBAQ"
