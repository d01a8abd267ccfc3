"""Every public class, method, property and function of cbn has a docstring, and the
examples in the docstrings of the layer and of each op run as written (doctest)."""

from __future__ import annotations

import doctest
import inspect

import cbn
import cbn.distributed
import cbn.ops
import pytest


def _public_members(module):
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue  # modules, and type aliases (documented by a comment)
        yield f"{module.__name__}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__call__":
                    continue
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if callable(member) or isinstance(member, property):
                    yield f"{module.__name__}.{name}.{attr}", member


PUBLIC = dict(
    item for module in (cbn, cbn.ops, cbn.distributed) for item in _public_members(module)
)


@pytest.mark.parametrize("qualname", sorted(PUBLIC))
def test_public_object_has_a_docstring(qualname):
    doc = inspect.getdoc(PUBLIC[qualname])
    assert doc and doc.strip(), f"{qualname} has no docstring"


@pytest.mark.parametrize("qualname", [
    "cbn.BatchNormalization", "cbn.ops.moments", "cbn.ops.batch_normalization",
    "cbn.ops.batch_norm_train", "cbn.ops.batch_norm_backward",
])
def test_docstring_example_runs(qualname):
    obj = PUBLIC[qualname]
    tests = doctest.DocTestFinder(recurse=False).find(obj, qualname, globs={})
    examples = [t for t in tests if t.examples]
    assert examples, f"{qualname}'s docstring has no example"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in examples:
        runner.run(test)
    assert runner.failures == 0, f"{qualname}'s docstring example failed (output above)"
