"""The public surface: what ``mpmesh.__all__`` exports, and the public error tree."""

from __future__ import annotations

import multiprocessing
import multiprocessing.managers
import pickle
import re
from pathlib import Path

import pytest

import mpmesh

PUBLIC = sorted(mpmesh.__all__)

# Every public error, with the classes it must also be (besides MeshError).
ERRORS: dict[str, tuple[type, ...]] = {
    "MeshError": (Exception,),
    "RequestTimeout": (TimeoutError, multiprocessing.TimeoutError),
    "NotFound": (LookupError,),
    "NoHandler": (),
    "WorkerLost": (),
    "LockTimeout": (TimeoutError,),
    "FencedError": (),
    "AuthenticationError": (multiprocessing.AuthenticationError,),
    "SerializationError": (TypeError,),
    "MeshClosed": (),
    "BrokerUnavailable": (ConnectionError,),
    "RemoteError": (multiprocessing.managers.RemoteError,),
}


def test_all_has_no_duplicates() -> None:
    assert len(mpmesh.__all__) == len(set(mpmesh.__all__))


@pytest.mark.parametrize("name", PUBLIC)
def test_every_exported_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from mpmesh import {name}", namespace)  # noqa: S102 - a literal, checked name
    assert namespace[name] is getattr(mpmesh, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from mpmesh import *", namespace)  # noqa: S102
    assert sorted(k for k in namespace if k != "__builtins__") == PUBLIC


@pytest.mark.parametrize("name", [n for n in PUBLIC if isinstance(getattr(mpmesh, n), type)])
def test_public_classes_live_in_mpmesh(name: str) -> None:
    cls = getattr(mpmesh, name)
    assert cls.__module__ == "mpmesh", f"{name}.__module__ is {cls.__module__!r}"
    assert cls.__name__ == name


def test_no_private_module_leaks_through_the_facade() -> None:
    for name in PUBLIC:
        obj = getattr(mpmesh, name)
        assert not getattr(obj, "__module__", "mpmesh").startswith("mpmesh._"), name


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_of_api_section_4(name: str) -> None:
    assert name in mpmesh.__all__, f"mpmesh.{name} must be exported"
    cls = getattr(mpmesh, name)
    assert issubclass(cls, mpmesh.MeshError)
    for base in ERRORS[name]:
        assert issubclass(cls, base), f"{name} must also be a {base.__module__}.{base.__qualname__}"
    assert cls.__module__ == "mpmesh"


def test_drop_in_except_clauses_keep_working() -> None:
    with pytest.raises(multiprocessing.TimeoutError):
        raise mpmesh.RequestTimeout("late")
    with pytest.raises(TimeoutError):
        raise mpmesh.RequestTimeout("late")
    with pytest.raises(multiprocessing.AuthenticationError):
        raise mpmesh.AuthenticationError("bad key")
    with pytest.raises(multiprocessing.managers.RemoteError):
        raise mpmesh.RemoteError("remote text")
    with pytest.raises(LookupError):
        raise mpmesh.NotFound("nobody")
    assert not issubclass(mpmesh.NotFound, KeyError)


def test_lock_timeout_is_not_a_request_timeout() -> None:
    assert not issubclass(mpmesh.LockTimeout, mpmesh.RequestTimeout)
    assert not issubclass(mpmesh.RequestTimeout, mpmesh.LockTimeout)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_pickle_by_their_public_path(name: str) -> None:
    """Errors cross processes; they must rebuild as themselves, with their message."""
    cls = getattr(mpmesh, name)
    err = cls("something went wrong")
    data = pickle.dumps(err)
    assert b"mpmesh._errors" not in data
    back = pickle.loads(data)
    assert type(back) is cls
    assert str(back) == "something went wrong"


def test_remote_error_str_is_the_remote_text() -> None:
    text = "Traceback (most recent call last):\n  ...\nValueError: boom"
    assert str(mpmesh.RemoteError(text)) == text


def test_version_matches_pyproject() -> None:
    pyproject = (Path(mpmesh.__file__).parent.parent / "pyproject.toml").read_text()
    match = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    assert match is not None
    assert mpmesh.__version__ == match.group(1)
