"""UID checks: what may become part of a path, and what this node produced."""

from __future__ import annotations

import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID (PS3.5 9.1): digits and dots, 64 characters at most.

    Only a UID that passes this check ever becomes part of a file name, so ``../`` or a slash can
    never reach the file system through one.
    """
    return isinstance(value, str) and len(value) <= 64 and _UID_RE.match(value) is not None
