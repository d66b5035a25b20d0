"""User payloads: pickle first, dill when pickle refuses; remote exceptions keep their type."""

from __future__ import annotations

import multiprocessing.managers
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mpmesh._errors import MeshError, RemoteError, RemoteTraceback, SerializationError
from mpmesh._wire import _codec


@pytest.fixture(autouse=True)
def fresh_type_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with an empty 'pickle refused this type' memory."""
    monkeypatch.setattr(_codec, "_DILL_TYPES", set())


@pytest.fixture
def dill_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every object that goes through dill."""
    calls: list[object] = []
    real = _codec._dill_dumps

    def spy(obj: object, *args: Any) -> bytes:
        calls.append(obj)
        return real(obj, *args)

    monkeypatch.setattr(_codec, "_dill_dumps", spy)
    return calls


def make_adder(n: int) -> Callable[[int], int]:
    def add(x: int) -> int:
        return x + n

    return add


class Holder:
    def __init__(self, fn: Callable[[int], int]) -> None:
        self.fn = fn


def module_level(x: int) -> int:
    return x * 2


# -- dumps / loads ----------------------------------------------------------------------------

@pytest.mark.parametrize("obj", [
    None, 0, -5, 2**100, 1.5, "text é 🐍", b"\x00\xff", bytearray(b"ab"),
    [1, [2, [3]]], {"k": {"nested": (1, 2)}}, {1, 2}, frozenset({3}), module_level,
    ValueError("x"), range(3),
], ids=lambda obj: type(obj).__name__)
def test_pickle_fast_path(obj: object, dill_calls: list[object]) -> None:
    data = _codec.dumps(obj)
    assert data == pickle.dumps(obj, protocol=5)
    assert dill_calls == []
    back = _codec.loads(data)
    if isinstance(obj, BaseException):
        assert type(back) is type(obj) and back.args == obj.args  # type: ignore[attr-defined]
    else:
        assert back == obj


def test_protocol_5() -> None:
    assert _codec.PROTOCOL == 5
    assert _codec.dumps([1])[:2] == b"\x80\x05"


def test_lambda_goes_through_dill(dill_calls: list[object]) -> None:
    fn = lambda x: x + 1  # noqa: E731
    with pytest.raises(Exception):
        pickle.dumps(fn, protocol=5)
    data = _codec.dumps(fn)
    assert dill_calls == [fn]
    assert _codec.loads(data)(41) == 42  # type: ignore[operator]
    assert pickle.loads(data)(1) == 2, "plain pickle reads dill's output"


def test_closure_goes_through_dill() -> None:
    add = make_adder(10)
    assert _codec.loads(_codec.dumps(add))(5) == 15  # type: ignore[operator]


def test_object_holding_a_closure() -> None:
    back = _codec.loads(_codec.dumps(Holder(make_adder(3))))
    assert isinstance(back, Holder) and back.fn(1) == 4


def test_refused_type_is_remembered(dill_calls: list[object]) -> None:
    _codec.dumps(Holder(make_adder(1)))
    assert Holder in _codec._DILL_TYPES
    second = Holder(module_level)
    _codec.dumps(second)
    assert dill_calls[-1] is second, "a remembered type skips the pickle attempt"


def test_function_types_are_not_remembered() -> None:
    _codec.dumps(lambda: 1)
    assert type(lambda: 1) not in _codec._DILL_TYPES


def test_container_holding_a_lambda_does_not_slow_every_later_container(
        dill_calls: list[object]) -> None:
    """One dict with a lambda inside must not send every later dict through dill (50x)."""
    _codec.dumps({"callback": lambda: None})
    dill_calls.clear()
    _codec.dumps({"a": 1})
    _codec.dumps([1, 2, 3])
    assert dill_calls == []


def generator() -> Iterator[int]:
    yield 1


@pytest.mark.parametrize(("obj", "type_name"), [
    (generator(), "generator"),
    (memoryview(b"abc"), "memoryview"),
    ({"nested": [generator()]}, "dict"),
], ids=["generator", "memoryview", "nested"])
def test_unserializable_raises_serialization_error_naming_the_type(obj: object, type_name: str) -> None:
    with pytest.raises(SerializationError, match=type_name) as info:
        _codec.dumps(obj)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, MeshError)


def test_serialization_error_is_a_type_error_for_callers() -> None:
    try:
        _codec.dumps(generator())
    except TypeError:
        pass
    else:  # pragma: no cover
        pytest.fail("SerializationError must be catchable as TypeError")


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x80\x05", pickle.dumps([1, 2])[:-3]])
def test_loads_garbage_raises_serialization_error(data: bytes) -> None:
    with pytest.raises(SerializationError, match=f"{len(data)} bytes"):
        _codec.loads(data)


def test_dumps_by_value_sends_importable_objects_by_reference(dill_calls: list[object]) -> None:
    data = _codec.dumps_by_value(module_level)
    assert dill_calls == [], "an importable function needs no dill (nor its import in the child)"
    assert _codec.loads(data)(4) == 8  # type: ignore[operator]
    with pytest.raises(SerializationError, match="generator"):
        _codec.dumps_by_value(generator())


def test_dumps_by_value_sends_main_and_closures_by_value(
        dill_calls: list[object], monkeypatch: pytest.MonkeyPatch) -> None:
    def from_main(x: int) -> int:
        return x + 1

    monkeypatch.setattr(from_main, "__module__", "__main__")
    for target in (from_main, make_adder(3)):
        data = _codec.dumps_by_value((target, (1,), {}))
        assert dill_calls[-1] == (target, (1,), {})
        fn, args, _ = _codec.loads(data)  # type: ignore[misc]
        assert fn(*args) == target(*args)


# -- exceptions ------------------------------------------------------------------------------

def raise_value_error() -> None:
    raise ValueError("bad input 42")


def caught(fn: Callable[[], None]) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("fn did not raise")  # pragma: no cover


def test_exception_round_trip_keeps_type_and_chains_the_remote_traceback() -> None:
    exc = caught(raise_value_error)
    payload, text = _codec.pack_exception(exc)
    assert payload is not None
    assert "ValueError: bad input 42" in text
    assert "raise_value_error" in text, "the text is the formatted traceback"
    back = _codec.unpack_exception(payload, text)
    assert type(back) is ValueError
    assert back.args == ("bad input 42",)
    assert isinstance(back.__cause__, RemoteTraceback)
    assert back.__cause__.tb == text
    assert "raise_value_error" in str(back.__cause__)


def test_pack_exception_leaves_the_original_intact() -> None:
    def chained() -> None:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer") from inner

    exc = caught(chained)
    cause, context, tb = exc.__cause__, exc.__context__, exc.__traceback__
    _codec.pack_exception(exc)
    assert exc.__cause__ is cause and exc.__context__ is context and exc.__traceback__ is tb
    assert isinstance(cause, KeyError) and tb is not None


class TwoArgError(Exception):
    """Pickles, but cannot be rebuilt: __init__ needs two arguments, args holds one."""

    def __init__(self, a: object, b: object) -> None:
        super().__init__(a)


class HoldsAGenerator(Exception):
    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.gen = generator()


@pytest.mark.parametrize("make", [
    lambda: TwoArgError("first", "second"),
    lambda: HoldsAGenerator("with a generator attribute"),
], ids=["cannot-rebuild", "cannot-pickle"])
def test_unpicklable_exception_becomes_remote_error_with_the_text(
        make: Callable[[], BaseException]) -> None:
    def boom() -> None:
        raise make()

    exc = caught(boom)
    payload, text = _codec.pack_exception(exc)
    assert payload is None
    assert type(exc).__name__ in text and "boom" in text
    back = _codec.unpack_exception(payload, text)
    assert type(back) is RemoteError
    assert str(back) == text
    assert isinstance(back, multiprocessing.managers.RemoteError)


def test_exception_from_a_closure_class_travels_through_dill() -> None:
    def factory() -> type[Exception]:
        class LocalError(Exception):
            pass

        return LocalError

    local_error = factory()

    def boom() -> None:
        raise local_error("local")

    exc = caught(boom)
    payload, text = _codec.pack_exception(exc)
    assert payload is not None
    back = _codec.unpack_exception(payload, text)
    assert type(back).__name__ == "LocalError" and back.args == ("local",)
    assert isinstance(back.__cause__, RemoteTraceback)


@pytest.mark.parametrize("payload", [b"garbage", pickle.dumps(("not an exception", "tb"))])
def test_unpack_garbage_gives_remote_error(payload: bytes) -> None:
    back = _codec.unpack_exception(payload, "Traceback: remote text")
    assert type(back) is RemoteError
    assert str(back) == "Traceback: remote text"


def test_pack_exception_does_not_need_a_traceback() -> None:
    payload, text = _codec.pack_exception(ValueError("never raised"))
    back = _codec.unpack_exception(payload, text)
    assert type(back) is ValueError and "never raised" in text


# -- built-in values only: what the broker reads --------------------------------------------

class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("this ran",))


_EVIL_PICKLES = {
    "protocol 0 GLOBAL + REDUCE": b"cbuiltins\nprint\n(S'this ran'\ntR.",
    "protocol 0 INST": b"(S'this ran'\nibuiltins\nprint\n.",
    "protocol 2 GLOBAL": pickle.dumps(_Evil(), protocol=2),
    "protocol 5 STACK_GLOBAL": pickle.dumps(_Evil(), protocol=5),
    "a global hidden in a key tuple": pickle.dumps(("cache", _Evil()), protocol=0),
}


@pytest.mark.parametrize("label", sorted(_EVIL_PICKLES))
def test_the_broker_reads_no_global_whatever_the_protocol(label: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TypeError, match="not a built-in value"):
        _codec.loads_builtin(_EVIL_PICKLES[label])
    assert "this ran" not in capsys.readouterr().out


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_the_broker_reads_built_in_values_in_every_protocol(protocol: int) -> None:
    value = ("k", 1, 2.5, None, True, [1, {"a": {1, 2}}], frozenset({3}), complex(1, 2))
    if protocol >= 3:  # before 3, bytes pickle as a call of _codecs.encode: refused
        value += (b"x",)
    assert _codec.loads_builtin(pickle.dumps(value, protocol=protocol)) == value
