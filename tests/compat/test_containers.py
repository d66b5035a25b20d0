"""dict, list, Namespace, Value and Array proxies behave the same in both implementations."""

from __future__ import annotations

import copy
import multiprocessing.managers
from typing import Any

import pytest

from .conftest import Impl


# -- dict ----------------------------------------------------------------------------------

def test_dict_mapping_methods(manager: Any) -> None:
    d = manager.dict({"a": 1}, b=2)
    d["c"] = 3
    assert len(d) == 3 and "a" in d and "zz" not in d
    assert d["b"] == 2
    assert d.get("zz") is None and d.get("zz", 7) == 7
    assert sorted(d.keys()) == ["a", "b", "c"]
    assert sorted(d.values()) == [1, 2, 3]
    assert sorted(d.items()) == [("a", 1), ("b", 2), ("c", 3)]
    assert isinstance(d.keys(), list) and isinstance(d.items(), list)
    assert d.copy() == {"a": 1, "b": 2, "c": 3}
    assert d.setdefault("a", 9) == 1 and d.setdefault("n", 9) == 9
    assert d.pop("n") == 9 and d.pop("n", "dflt") == "dflt"
    d.update({"x": 10}, y=11)
    assert d["x"] == 10 and d["y"] == 11
    del d["x"]
    assert "x" not in d
    assert d.popitem() == ("y", 11)
    d.clear()
    assert len(d) == 0 and d.copy() == {}


def test_dict_errors(manager: Any) -> None:
    d = manager.dict()
    with pytest.raises(KeyError) as info:
        d["missing"]
    assert info.value.args == ("missing",)
    with pytest.raises(KeyError):
        del d["missing"]
    with pytest.raises(KeyError):
        d.pop("missing")
    with pytest.raises(KeyError):
        d.popitem()
    with pytest.raises(TypeError):
        d[["unhashable"]] = 1
    with pytest.raises(multiprocessing.managers.RemoteError, match="not in exposed"):
        d._callmethod("fromkeys", ([1],))


def test_dict_iteration_and_conversion(manager: Any) -> None:
    d = manager.dict(a=1, b=2)
    assert sorted(d) == ["a", "b"]
    assert sorted(iter(d)) == ["a", "b"]
    assert dict(d) == {"a": 1, "b": 2}
    assert {k: d[k] for k in d} == {"a": 1, "b": 2}
    assert d._getvalue() == {"a": 1, "b": 2}
    assert copy.deepcopy(d) == {"a": 1, "b": 2}


def test_dict_repr_str_and_comparison(manager: Any) -> None:
    d = manager.dict(a=1)
    assert str(d) == "{'a': 1}"
    assert repr(d).startswith("<DictProxy object, typeid 'dict' at 0x")
    # Proxies compare by identity, as in the standard library; compare copies instead.
    assert d == d
    assert d != {"a": 1}
    assert d.copy() == {"a": 1}


def test_values_are_copies(manager: Any) -> None:
    d = manager.dict()
    inner = [1, 2]
    d["k"] = inner
    inner.append(3)
    assert d["k"] == [1, 2]
    got = d["k"]
    got.append(4)
    assert d["k"] == [1, 2]


# -- list ----------------------------------------------------------------------------------

def test_list_methods(manager: Any) -> None:
    lst = manager.list([3, 1, 2])
    lst.append(4)
    lst.extend([5, 6])
    lst.insert(0, 0)
    assert lst[:] == [0, 3, 1, 2, 4, 5, 6]
    assert len(lst) == 7 and 4 in lst and 99 not in lst
    assert lst.pop() == 6 and lst.pop(0) == 0
    lst.remove(4)
    assert lst.index(2) == 2 and lst.count(3) == 1
    lst.reverse()
    assert lst[:] == [5, 2, 1, 3]
    lst.sort()
    assert lst[:] == [1, 2, 3, 5]
    lst.sort(reverse=True)
    assert lst[:] == [5, 3, 2, 1]
    lst[0] = 50
    lst[1:3] = [30, 20]
    del lst[-1]
    assert lst[:] == [50, 30, 20]
    assert lst[-1] == 20 and lst[0:2] == [50, 30]
    assert lst + [1] == [50, 30, 20, 1]
    assert lst * 2 == [50, 30, 20, 50, 30, 20]
    assert 2 * lst == [50, 30, 20, 50, 30, 20]
    assert list(reversed(lst)) == [20, 30, 50]


def test_list_in_place_operators_keep_the_proxy(manager: Any) -> None:
    lst = manager.list([1])
    same = lst
    lst += [2, 3]
    assert lst is same and lst[:] == [1, 2, 3]
    lst *= 2
    assert lst is same and lst[:] == [1, 2, 3, 1, 2, 3]


def test_list_errors(manager: Any) -> None:
    lst = manager.list([1])
    with pytest.raises(IndexError):
        lst[5]
    with pytest.raises(IndexError):
        lst.pop(5)
    with pytest.raises(ValueError):
        lst.remove(99)
    with pytest.raises(ValueError):
        lst.index(99)
    with pytest.raises(TypeError):
        [0] + lst  # no __radd__, in either implementation


def test_list_iteration_repr_comparison(manager: Any) -> None:
    lst = manager.list(["a", "b"])
    assert list(lst) == ["a", "b"]
    assert [x for x in lst] == ["a", "b"]
    assert str(lst) == "['a', 'b']"
    assert repr(lst).startswith("<ListProxy object, typeid 'list' at 0x")
    assert lst == lst and lst != ["a", "b"]
    assert sorted(lst[:]) == ["a", "b"]


def test_empty_list_and_dict_are_falsy_through_len(manager: Any) -> None:
    assert not manager.list()
    assert not manager.dict()
    assert manager.list([0])


# -- nested proxies ------------------------------------------------------------------------

def test_nested_proxies(manager: Any) -> None:
    outer = manager.list()
    inner = manager.dict()
    outer.append(inner)
    outer[0]["x"] = 1
    assert inner["x"] == 1
    del inner                      # the outer list keeps the inner dict alive
    assert outer[0]["x"] == 1
    again = outer[0]
    again["y"] = 2
    assert outer[0].copy() == {"x": 1, "y": 2}


def test_dict_of_lists(manager: Any) -> None:
    d = manager.dict()
    d["l"] = manager.list([1])
    d["l"].append(2)
    assert d["l"][:] == [1, 2]


# -- Namespace, Value, Array ------------------------------------------------------------------

def test_namespace(manager: Any) -> None:
    ns = manager.Namespace(a=1)
    ns.b = "two"
    assert ns.a == 1 and ns.b == "two"
    del ns.a
    with pytest.raises(AttributeError):
        ns.a
    with pytest.raises(AttributeError):
        del ns.nothing
    assert str(ns) == "Namespace(b='two')"
    assert repr(ns).startswith("<NamespaceProxy object, typeid 'Namespace' at 0x")
    ns._local = 5  # underscore names live on the proxy itself
    assert ns._local == 5


def test_value(manager: Any) -> None:
    v = manager.Value("i", 3)
    assert v.value == 3 and v.get() == 3
    v.value = 5
    assert v.get() == 5
    v.set(7)
    assert v.value == 7
    assert str(v) == "Value('i', 7)"
    v.value = "not checked"  # the standard library's Value does not check the typecode
    assert v.value == "not checked"


def test_array(manager: Any) -> None:
    a = manager.Array("i", [1, 2, 3])
    assert len(a) == 3 and a[0] == 1 and a[-1] == 3
    a[1] = 20
    assert list(a) == [1, 20, 3]
    assert a[:].tolist() == [1, 20, 3]
    assert str(a) == "array('i', [1, 20, 3])"
    with pytest.raises(IndexError):
        a[10]
    with pytest.raises(TypeError):
        a[0] = "x"


def test_typed_generic_aliases(impl: Impl) -> None:
    if not hasattr(impl.managers.DictProxy, "__class_getitem__"):
        pytest.skip("this Python's multiprocessing proxies are not generic (3.13+)")
    assert impl.managers.DictProxy[str, int] is not None
    assert impl.managers.ListProxy[int] is not None
    assert impl.managers.ValueProxy[int] is not None
