"""Who a signed-in person is to extproc: their console roles, the scopes they approve for,
and the personal keys they may hold. Pure functions of the policy and the person.

Nothing here is remembered about anyone: roles are derived from the groups the identity
provider vouches for, on every request, so a group removed from the policy (or from the
person, at the provider) counts at the next request rather than at the next sign-in.

Approval is #22's business (top-ups); this module only answers "may this person approve for
this scope", so the top-up flow plugs in without knowing how approvers are written down.
A workspace's approvers approve for the workspace and every team in it; a team's approvers
approve for that team only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from extproc.governance.policy import Approvers, PersonalKeyGrant, Policy

ADMIN, VIEWER = "admin", "viewer"


@dataclass(frozen=True, slots=True)
class Person:
    """A signed-in human (or a bearer token's subject) as the identity provider describes it."""

    subject: str
    email: str | None = None
    name: str | None = None
    groups: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        """How the audit log and the pages name them: the email, else the subject."""
        return self.email or self.subject


def groups_from_claims(claims: dict[str, object], claim: str) -> frozenset[str]:
    """The group names in `claims[claim]`: a list of strings, or one space-separated string
    (some providers send that). Anything else counts as no groups."""
    value = claims.get(claim)
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str) and v)
    return frozenset()


def roles_of(policy: Policy | None, groups: Iterable[str]) -> frozenset[str]:
    """The console roles `groups` hold; an admin can do whatever a viewer can."""
    if policy is None:
        return frozenset()
    held = frozenset(groups)
    roles = {role for role, members in policy.console.roles.items() if members & held}
    if ADMIN in roles:
        roles.add(VIEWER)
    return frozenset(roles)


def _names(approvers: Approvers | None, person: Person) -> bool:
    if approvers is None:
        return False
    who = {person.subject.lower(), *([person.email.lower()] if person.email else [])}
    return bool(approvers.people & who) or bool(approvers.groups & person.groups)


def may_approve(policy: Policy | None, person: Person, workspace: str, team: str | None) -> bool:
    """Whether `person` may approve for the scope (`workspace`, or `team` within it)."""
    ws = policy.workspaces.get(workspace) if policy else None
    if ws is None:
        return False
    if _names(ws.approvers, person):
        return True
    if team is None:
        return False
    found = ws.teams.get(team)
    return found is not None and _names(found.approvers, person)


def approver_scopes(policy: Policy | None, person: Person) -> list[tuple[str, str | None]]:
    """Every (workspace, team or None) `person` may approve for, in policy order."""
    if policy is None:
        return []
    out: list[tuple[str, str | None]] = []
    for name, ws in policy.workspaces.items():
        if may_approve(policy, person, name, None):
            out.append((name, None))
        out += [(name, t) for t in ws.teams if may_approve(policy, person, name, t)]
    return out


def key_grants(policy: Policy | None, groups: Iterable[str]) -> list[PersonalKeyGrant]:
    """The personal-key grants `groups` hold."""
    if policy is None:
        return []
    held = frozenset(groups)
    return [g for g in policy.console.personal_keys if g.groups & held]


def personal_key_days(
    policy: Policy | None, groups: Iterable[str], workspace: str, service: str
) -> int | None:
    """The longest a personal key for (workspace, service) may live for `groups`, in days;
    None when no grant covers it."""
    days = [
        g.max_days
        for g in key_grants(policy, groups)
        if g.workspace == workspace and service in g.services
    ]
    return max(days) if days else None


def key_choices(policy: Policy | None, groups: Iterable[str]) -> dict[tuple[str, str], int]:
    """(workspace, service) -> the longest lifetime in days of each personal key `groups`
    may mint."""
    out: dict[tuple[str, str], int] = {}
    for grant in key_grants(policy, groups):
        for service in grant.services:
            here = (grant.workspace, service)
            out[here] = max(out.get(here, 0), grant.max_days)
    return out


def has_access(policy: Policy | None, person: Person) -> bool:
    """Whether the console lets `person` in at all: a role, a key grant or a scope to approve."""
    return bool(
        roles_of(policy, person.groups)
        or key_grants(policy, person.groups)
        or approver_scopes(policy, person)
    )
