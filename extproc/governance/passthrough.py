"""Which non-metered OpenAI endpoints a workspace may use: the `passthrough` policy section.

```yaml
defaults:            # or per workspace
  passthrough:
    endpoints: [models, files, responses, moderations]   # default: every group
    allow_unpriced: false                                 # default: false
```

Groups are those of `extproc.wire.paths.GROUPS`. Calls that cost nothing (reads, deletes,
moderation) and calls whose answer carries priceable usage are allowed when their group is
listed. A call that costs money the answer does not state (a batch job, speech synthesis,
vector-store writes) is allowed only with `allow_unpriced: true`: by default the gateway
refuses what it cannot bill. Each call allowed is still recorded in the ledger.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from extproc.wire.errors import OpenAIError
from extproc.wire.paths import GROUPS, Passthrough, Pricing

FIELDS = ("endpoints", "allow_unpriced")


@dataclass(frozen=True, slots=True)
class PassthroughPolicy:
    endpoints: frozenset[str] = frozenset(GROUPS)
    allow_unpriced: bool = False

    def refusal(self, api: Passthrough, name: str) -> OpenAIError | None:
        """Why this workspace may not call `api`, in OpenAI's shape; None when it may."""
        if api.group not in self.endpoints:
            return OpenAIError(
                403,
                f"The {name} endpoint is not enabled for this workspace. Ask your platform "
                f"team to add '{api.group}' to the workspace's passthrough.endpoints.",
                "permission_error",
                None,
                "endpoint_not_allowed",
            )
        if api.pricing is Pricing.UNPRICED and not self.allow_unpriced:
            return OpenAIError(
                403,
                f"The {name} endpoint costs money that extproc cannot price from the answer, "
                "and this workspace does not allow unpriced endpoints "
                "(passthrough.allow_unpriced).",
                "permission_error",
                None,
                "unpriced_endpoint_not_allowed",
            )
        return None


DEFAULT = PassthroughPolicy()

Report = Callable[[str, str], None]
"""Called with (field path, problem) for every problem found."""


def parse_passthrough(
    path: str, value: Any, inherited: PassthroughPolicy, error: Report
) -> PassthroughPolicy:
    """The section at `path` over `inherited`, field by field; problems go to `error`."""
    if value is None:
        return inherited
    if not isinstance(value, Mapping):
        error(path, f"must be a mapping with {', '.join(FIELDS)}")
        return inherited
    for key in value:
        if key not in FIELDS:
            hint = difflib.get_close_matches(str(key), FIELDS, n=1)
            error(
                f"{path}.{key}",
                "unknown field" + (f' (did you mean "{hint[0]}"?)' if hint else ""),
            )
    endpoints = inherited.endpoints
    if "endpoints" in value:
        raw = value["endpoints"]
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            error(f"{path}.endpoints", f"must be a list of names from: {', '.join(GROUPS)}")
        else:
            for name in raw:
                if name not in GROUPS:
                    hint = difflib.get_close_matches(name, GROUPS, n=1)
                    error(
                        f"{path}.endpoints",
                        f'unknown endpoint group "{name}"'
                        + (f' (did you mean "{hint[0]}"?)' if hint else "")
                        + f"; known: {', '.join(GROUPS)}",
                    )
            endpoints = frozenset(raw) & frozenset(GROUPS)
    allow_unpriced = inherited.allow_unpriced
    if "allow_unpriced" in value:
        raw = value["allow_unpriced"]
        if not isinstance(raw, bool):
            error(f"{path}.allow_unpriced", "must be true or false")
        else:
            allow_unpriced = raw
    return PassthroughPolicy(endpoints=endpoints, allow_unpriced=allow_unpriced)
