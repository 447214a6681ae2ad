"""ARM's naming rules for the parts of a resource path, each with the words that say it: the
API's path parameters and the settings that name a compute (MMS_COMPUTE_ALLOW_HOSTS) check the same."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class NameRule:
    pattern: str
    rule: str  # what a name may hold, in words

    def matches(self, value: str) -> bool:
        return re.fullmatch(self.pattern, value) is not None


SUBSCRIPTION = NameRule(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", "1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
)
RESOURCE_GROUP = NameRule(r"^[-\w._()]{1,90}$", "1-90 letters, digits, '-', '_', '.', '(' or ')'")
ACCOUNT = NameRule(
    r"^[A-Za-z0-9][A-Za-z0-9_-]{1,63}$", "2-64 letters, digits, '-' or '_', starting with a letter or digit"
)
COMPUTE = NameRule(r"^[A-Za-z][A-Za-z0-9-]{1,31}$", "2-32 letters, digits or '-', starting with a letter")
