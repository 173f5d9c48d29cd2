"""keydiff: why a checkpoint does not load into a model, and the mapping that fixes it.

    >>> import keydiff
    >>> d = keydiff.diff("vit_base_patch16_224", "model.safetensors", num_classes=0)  # doctest: +SKIP
    >>> d                      # a report: rich in a terminal, HTML in Jupyter              # doctest: +SKIP
    >>> sd = d.apply()         # loads with model.load_state_dict(sd, strict=True)       # doctest: +SKIP

Public names: ``diff``, ``compare_keys``, ``compare``, ``stats``, ``read_keys``, ``load_mapping``, ``prove``,
``find``, ``Found``, ``Diff``, ``ValueDiff``, ``Proof``, ``KeyMap``, ``Entry``, ``Op``, ``KeySet``, ``TensorInfo``,
``KeydiffError``, ``InputError``.
"""

from __future__ import annotations

from keydiff._diff import Diff as Diff
from keydiff._diff import compare_keys as compare_keys
from keydiff._diff import diff as diff
from keydiff._errors import InputError as InputError
from keydiff._errors import KeydiffError as KeydiffError
from keydiff._find import Found as Found
from keydiff._find import find as find
from keydiff._keys import KeySet as KeySet
from keydiff._keys import TensorInfo as TensorInfo
from keydiff._mapping import Entry as Entry
from keydiff._mapping import KeyMap as KeyMap
from keydiff._mapping import load_mapping as load_mapping
from keydiff._ops import Op as Op
from keydiff._repair import Proof as Proof
from keydiff._repair import prove as prove
from keydiff._values import ValueDiff as ValueDiff
from keydiff._values import compare as compare
from keydiff._values import stats as stats

__version__ = "0.1.0"

__all__ = [
    "Diff",
    "Entry",
    "Found",
    "InputError",
    "KeyMap",
    "KeySet",
    "KeydiffError",
    "Op",
    "Proof",
    "TensorInfo",
    "ValueDiff",
    "__version__",
    "compare",
    "compare_keys",
    "diff",
    "find",
    "load_mapping",
    "prove",
    "read_keys",
    "stats",
]


def read_keys(path: str, *, key: str | None = None, unsafe_pickle: bool = False) -> KeySet:
    """Keys, shapes and dtypes of a checkpoint, read from its header where the format allows.

    Example:
        >>> keydiff.read_keys("model.safetensors")["cls_token"].shape  # doctest: +SKIP
        (1, 1, 768)
    """
    from keydiff._sources import read_checkpoint

    return read_checkpoint(path, key=key, unsafe_pickle=unsafe_pickle).keys


for _obj in (Diff, Entry, Found, InputError, KeyMap, KeySet, KeydiffError, Op, Proof, TensorInfo, ValueDiff, compare,
             compare_keys, diff, find, load_mapping, prove, read_keys, stats):
    _obj.__module__ = "keydiff"
del _obj
