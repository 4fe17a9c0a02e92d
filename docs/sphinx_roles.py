"""Griffe extension for the reference pages: Sphinx roles in docstrings become code spans.

The docstrings name other objects the Sphinx way (:func:`inject`, :class:`~lispetorch.LoraConfig`); Markdown would
print the role. Each becomes the name alone, in code: ``inject``, ``LoraConfig`` (a leading ``~`` keeps only the
last component, as in Sphinx).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|exc|data|obj|const):`(~?)([^`]+)`")


def _replace(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"``{target.rsplit('.', 1)[-1] if tilde else target}``"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_replace, obj.docstring.value)
