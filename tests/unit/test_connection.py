"""Two Connection objects back to back (h11's ConnectionPair): handshake, auth, framing."""

from __future__ import annotations

import ast
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

import mpmesh._wire
from mpmesh._errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from mpmesh._wire._connection import NONCE_BYTES, Connection, Phase, Side, _digest
from mpmesh._wire._frames import HEADER, MAX_HANDSHAKE_FRAME_BYTES
from mpmesh._wire._pool import handshake_for_workers
from mpmesh._wire._messages import (
    Answer,
    Challenge,
    Heartbeat,
    Hello,
    Message,
    Reply,
    Request,
    Welcome,
    decode,
    encode,
)

KEY = b"the-mesh-authkey"


def counter_bytes(tag: int) -> Callable[[int], bytes]:
    """Deterministic stand-in for os.urandom: distinct, reproducible nonces."""
    counter = itertools.count()

    def random_bytes(n: int) -> bytes:
        return bytes([tag, next(counter)]) * (n // 2)

    return random_bytes


class Pair:
    """A broker-side and a peer-side Connection wired to each other in memory."""

    def __init__(self, broker_key: bytes = KEY, peer_key: bytes = KEY) -> None:
        self.broker = Connection(Side.BROKER, broker_key, counter_bytes(1))
        self.peer = Connection(Side.PEER, peer_key, counter_bytes(2))

    def handshake(self) -> None:
        challenge = self.broker.initiate()
        answer = self.peer.receive_data(challenge)
        welcome = self.broker.receive_data(answer)
        assert self.peer.receive_data(welcome) == b""

    def to_broker(self, *msgs: Message) -> list[Message]:
        assert self.broker.receive_data(b"".join(self.peer.send(m) for m in msgs)) == b""
        return self.broker.events()

    def to_peer(self, *msgs: Message) -> list[Message]:
        assert self.peer.receive_data(b"".join(self.broker.send(m) for m in msgs)) == b""
        return self.peer.events()


HELLO = Hello(4242, 1, 1, "w1", "api", "host")


def test_handshake_success() -> None:
    pair = Pair()
    assert pair.broker.phase is Phase.HANDSHAKE and pair.peer.phase is Phase.HANDSHAKE
    challenge = pair.broker.initiate()
    assert decode(*_split(challenge)) == Challenge(counter_bytes(1)(NONCE_BYTES))
    answer = pair.peer.receive_data(challenge)
    assert isinstance(decode(*_split(answer)), Answer)
    assert pair.peer.phase is Phase.HANDSHAKE, "the peer is ready only after the broker proves the key"
    welcome = pair.broker.receive_data(answer)
    assert pair.broker.phase is Phase.READY
    assert isinstance(decode(*_split(welcome)), Welcome)
    assert pair.peer.receive_data(welcome) == b""
    assert pair.peer.phase is Phase.READY
    assert pair.broker.events() == [] and pair.peer.events() == []


def test_messages_flow_both_ways_after_the_handshake() -> None:
    pair = Pair()
    pair.handshake()
    req = Request(1, 0, -1, 0, 2.5, 0.0, "square", "w1", b"\x80\x05K\x07.")
    assert pair.to_broker(HELLO, req) == [HELLO, req]
    assert pair.to_peer(Reply(1, b"49")) == [Reply(1, b"49")]
    assert pair.broker.events() == [] and pair.peer.events() == []


def test_handshake_fed_byte_by_byte() -> None:
    pair = Pair()
    out = pair.broker.initiate()
    answer = b"".join(pair.peer.receive_data(out[i : i + 1]) for i in range(len(out)))
    welcome = b"".join(pair.broker.receive_data(answer[i : i + 1]) for i in range(len(answer)))
    assert pair.broker.phase is Phase.READY
    for i in range(len(welcome)):
        pair.peer.receive_data(welcome[i : i + 1])
    assert pair.peer.phase is Phase.READY


def test_welcome_and_first_messages_in_one_chunk() -> None:
    pair = Pair()
    answer = pair.peer.receive_data(pair.broker.initiate())
    welcome = pair.broker.receive_data(answer)
    hb = Heartbeat(3)
    pair.peer.receive_data(welcome + pair.broker.send(hb))
    assert pair.peer.phase is Phase.READY
    assert pair.peer.events() == [hb]


def test_welcome_and_a_large_message_in_one_chunk() -> None:
    """How the bytes are chunked must not change the outcome: the frame limit grows as
    soon as the Welcome is processed, even if a large frame follows in the same read."""
    pair = Pair()
    answer = pair.peer.receive_data(pair.broker.initiate())
    welcome = pair.broker.receive_data(answer)
    big = Reply(1, b"z" * (4 * MAX_HANDSHAKE_FRAME_BYTES))
    pair.peer.receive_data(welcome + pair.broker.send(big))
    assert pair.peer.phase is Phase.READY
    assert pair.peer.events() == [big]


def test_peer_with_wrong_key_is_refused_by_the_broker() -> None:
    pair = Pair(peer_key=b"not-the-key")
    answer = pair.peer.receive_data(pair.broker.initiate())
    with pytest.raises(AuthenticationError):
        pair.broker.receive_data(answer)
    assert pair.broker.phase is Phase.CLOSED
    rejection = pair.broker.rejection()
    with pytest.raises(AuthenticationError, match="rejected"):
        pair.peer.receive_data(rejection)
    assert pair.peer.phase is Phase.CLOSED
    assert pair.peer.events() == [] and pair.broker.events() == []


def test_broker_with_wrong_key_is_refused_by_the_peer() -> None:
    """A broker that does not know the key cannot forge the Welcome."""
    peer = Connection(Side.PEER, KEY, counter_bytes(2))
    answer = decode(*_split(peer.receive_data(encode(Challenge(b"n" * NONCE_BYTES)))))
    assert isinstance(answer, Answer)
    forged = Welcome(_digest(b"not-the-key", b"broker", answer.nonce))
    with pytest.raises(AuthenticationError):
        peer.receive_data(encode(forged))
    assert peer.phase is Phase.CLOSED
    with pytest.raises(LocalProtocolError):
        peer.send(HELLO)


def test_replayed_answer_with_another_nonce_fails() -> None:
    """An Answer recorded from an earlier handshake does not open a new one."""
    first = Pair()
    answer = first.peer.receive_data(first.broker.initiate())
    other = Connection(Side.BROKER, KEY, counter_bytes(9))
    other.initiate()
    with pytest.raises(AuthenticationError):
        other.receive_data(answer)


def test_closed_connection_ignores_further_bytes() -> None:
    pair = Pair(peer_key=b"bad")
    answer = pair.peer.receive_data(pair.broker.initiate())
    with pytest.raises(AuthenticationError):
        pair.broker.receive_data(answer)
    assert pair.broker.receive_data(encode(HELLO)) == b""
    assert pair.broker.events() == []


@pytest.mark.parametrize("side", [Side.BROKER, Side.PEER])
def test_app_message_before_the_handshake(side: Side) -> None:
    conn = Connection(side, KEY, counter_bytes(3))
    if side is Side.BROKER:
        conn.initiate()
    with pytest.raises(RemoteProtocolError, match="before the handshake"):
        conn.receive_data(encode(Request(1, 0, -1, 0, -1.0, 0.0, "a", "b", b"pickle?")))
    assert conn.phase is Phase.CLOSED
    assert conn.events() == []


def test_handshake_message_after_the_handshake() -> None:
    pair = Pair()
    pair.handshake()
    with pytest.raises(RemoteProtocolError):
        pair.broker.receive_data(encode(Answer(b"d" * 32, b"n" * 32)))
    assert pair.broker.phase is Phase.CLOSED


@pytest.mark.parametrize("msg", [Challenge(b"n" * 32), Welcome(b"d" * 32)])
def test_broker_expects_an_answer(msg: Message) -> None:
    broker = Connection(Side.BROKER, KEY, counter_bytes(1))
    broker.initiate()
    with pytest.raises(RemoteProtocolError, match="expected Answer"):
        broker.receive_data(encode(msg))


def test_broker_refuses_an_answer_before_its_challenge() -> None:
    broker = Connection(Side.BROKER, KEY, counter_bytes(1))
    with pytest.raises(RemoteProtocolError):
        broker.receive_data(encode(Answer(b"d" * 32, b"n" * 32)))


def test_peer_refuses_a_second_challenge_and_an_early_welcome() -> None:
    peer = Connection(Side.PEER, KEY, counter_bytes(2))
    with pytest.raises(RemoteProtocolError):
        peer.receive_data(encode(Welcome(b"d" * 32)))
    peer = Connection(Side.PEER, KEY, counter_bytes(2))
    peer.receive_data(encode(Challenge(b"n" * 32)))
    with pytest.raises(RemoteProtocolError):
        peer.receive_data(encode(Challenge(b"m" * 32)))


def test_garbage_during_the_handshake() -> None:
    broker = Connection(Side.BROKER, KEY, counter_bytes(1))
    broker.initiate()
    with pytest.raises(RemoteProtocolError):
        broker.receive_data(HEADER.pack(3, Answer.KIND) + b"abc")


def test_sending_before_ready_is_a_local_error() -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError):
        pair.peer.send(HELLO)
    with pytest.raises(LocalProtocolError):
        pair.broker.send(Reply(1, b""))
    with pytest.raises(LocalProtocolError):
        pair.peer.initiate()


def test_frame_limit_before_auth_is_the_handshake_limit() -> None:
    broker = Connection(Side.BROKER, KEY, counter_bytes(1))
    broker.initiate()
    # A header alone is enough to refuse: the body is never waited for nor buffered.
    with pytest.raises(RemoteProtocolError, match=str(MAX_HANDSHAKE_FRAME_BYTES)):
        broker.receive_data(HEADER.pack(MAX_HANDSHAKE_FRAME_BYTES + 1, Answer.KIND))
    # At the limit it is only incomplete, not refused.
    broker = Connection(Side.BROKER, KEY, counter_bytes(1))
    broker.initiate()
    assert broker.receive_data(HEADER.pack(MAX_HANDSHAKE_FRAME_BYTES, Answer.KIND)) == b""
    assert broker.phase is Phase.HANDSHAKE


def test_frame_limit_grows_after_auth() -> None:
    pair = Pair()
    pair.handshake()
    big = Reply(7, b"q" * (64 * MAX_HANDSHAKE_FRAME_BYTES))
    assert pair.to_broker(big) == [big]
    assert pair.to_peer(big) == [big]


def test_garbage_after_the_handshake_closes_the_connection() -> None:
    pair = Pair()
    pair.handshake()
    with pytest.raises(RemoteProtocolError):
        pair.broker.receive_data(HEADER.pack(2, Reply.KIND) + b"\x00\x01")
    assert pair.broker.phase is Phase.CLOSED


def test_a_trusted_pair_is_ready_at_once_and_refuses_handshake_frames() -> None:
    # The zygote's socketpair for a forked child: no handshake, full-size frames at once,
    # and a handshake frame arriving later is garbage like on any ready connection.
    broker, peer = Connection.trusted(Side.BROKER), Connection.trusted(Side.PEER)
    assert broker.phase is Phase.READY and peer.phase is Phase.READY
    big = Reply(7, b"q" * (64 * MAX_HANDSHAKE_FRAME_BYTES))
    assert broker.receive_data(peer.send(HELLO) + peer.send(big)) == b""
    assert broker.events() == [HELLO, big]
    with pytest.raises(LocalProtocolError):
        broker.initiate()
    with pytest.raises(RemoteProtocolError):
        peer.receive_data(encode(Challenge(b"n" * 32)))
    assert peer.phase is Phase.CLOSED


def _split(frame: bytes) -> tuple[int, bytes]:
    length, kind = HEADER.unpack_from(frame, 0)
    assert len(frame) == HEADER.size + length
    return kind, frame[HEADER.size :]


# -- nothing on the wire is unpickled ------------------------------------------------------

WIRE_DIR = Path(mpmesh._wire.__file__).parent
SERIALIZERS = {"pickle", "dill", "cloudpickle", "marshal", "shelve", "copyreg"}


def _referenced_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in SERIALIZERS:
                names.add(node.value)  # __import__("pickle") / importlib tricks
    return names


@pytest.mark.parametrize("path", sorted(p for p in WIRE_DIR.glob("*.py") if p.name != "_codec.py"),
                         ids=lambda p: p.name)
def test_wire_modules_never_reference_a_deserializer(path: Path) -> None:
    assert not (_referenced_modules(path) & SERIALIZERS), f"{path.name} must not (un)pickle"


def test_the_reference_check_can_fail() -> None:
    assert "pickle" in _referenced_modules(WIRE_DIR / "_codec.py")


# -- a Pool's workers: their half of the handshake, computed by the pool ----------------------

def test_the_pools_precomputed_handshake_is_the_brokers() -> None:
    token, challenge, nonce = b"t" * 32, b"c" * 32, b"n" * 32
    answer, proof = handshake_for_workers(token, challenge, nonce)
    pool = Connection(Side.BROKER, token, lambda n: challenge)
    pool.initiate()
    assert pool.receive_handshake(answer) == proof and pool.ready
    # The same answer to another pool's challenge, or under another token, is refused.
    other = Connection(Side.BROKER, token, lambda n: b"x" * 32)
    other.initiate()
    with pytest.raises(AuthenticationError):
        other.receive_handshake(answer)
    forged, _ = handshake_for_workers(b"u" * 32, challenge, nonce)
    pool = Connection(Side.BROKER, token, lambda n: challenge)
    pool.initiate()
    with pytest.raises(AuthenticationError):
        pool.receive_handshake(forged)
