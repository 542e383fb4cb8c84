"""Tests of cpl_mini.safe_pickle used on its own: what load_pickle admits and what it refuses."""

import os
import pickle
import struct

import numpy as np
import pytest

from cpl_mini import cifar
from cpl_mini.safe_pickle import ROW_BYTES, CorruptArchiveError, PickleBudget, UnsafePickleError, load_pickle


def batch(rows: int, protocol: int = 2) -> bytes:
    data = np.arange(rows * ROW_BYTES, dtype=np.uint8).reshape(rows, ROW_BYTES)
    return pickle.dumps({b"data": data, b"labels": list(range(rows))}, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4])
def test_loads_a_genuine_batch(protocol):
    obj = load_pickle(batch(3, protocol), PickleBudget("f", 3, "CIFAR-10"))
    assert obj[b"labels"] == [0, 1, 2]
    assert obj[b"data"].shape == (3, ROW_BYTES) and obj[b"data"].dtype == np.uint8
    assert not obj[b"data"].flags.writeable  # a view of the payload
    np.testing.assert_array_equal(obj[b"data"].ravel(), np.arange(3 * ROW_BYTES, dtype=np.uint8))


def test_refuses_other_globals():
    class Boom:
        def __reduce__(self):
            return (os.system, ("true",))

    with pytest.raises(UnsafePickleError, match=r"^f: refused to load the global .*system"):
        load_pickle(pickle.dumps({b"x": Boom()}, protocol=2), PickleBudget("f", 3, "CIFAR-10"))


def test_refuses_wrong_shape_and_memo_bomb():
    with pytest.raises(CorruptArchiveError, match=r"^f: refused a uint8 array of shape \(3, 3072\)"):
        load_pickle(batch(3), PickleBudget("f", 4, "CIFAR-10"))
    with pytest.raises(CorruptArchiveError, match=r"^f: refused a .* a meta file holds no array"):
        load_pickle(batch(3), PickleBudget("f", None, "CIFAR-10"))
    bomb = b"\x80\x02}r" + struct.pack("<I", 2**26) + b"."
    with pytest.raises(CorruptArchiveError, match=r"asks for memo slot 67108864"):
        load_pickle(bomb, PickleBudget("f", 3, "CIFAR-10"))


def test_cifar_reexports_the_errors():
    assert cifar.UnsafePickleError is UnsafePickleError
    assert cifar.CorruptArchiveError is CorruptArchiveError
