"""The budget policy: who may spend how much, on which models, from one YAML file.

Owns: the policy's data model (`model`), reading and validating YAML into it (`check`,
`load`, `routing_config`), and hot reload (`watch`). May import: `extproc.metering.prices`
(model names and prices are checked against the price table) and the standard library.
Everything else imports the names below from here, never from a submodule.
"""

from extproc.governance.policy.load import load_policy, parse_policy, parse_policy_text
from extproc.governance.policy.model import (
    ALERT_EVENTS,
    CONSOLE_ROLES,
    CONTEXT_ACTIONS,
    DEFAULT_MODEL,
    EFFORTS,
    ENDPOINT_NAMES,
    NAME_PATTERN,
    PERIODS,
    Approvers,
    ConsoleAccess,
    Overdraft,
    PersonalKeyGrant,
    Policy,
    PolicyError,
    RateLimits,
    Routing,
    RoutingSettings,
    Rule,
    RuleChanges,
    RuleMatch,
    Service,
    Team,
    Upstream,
    UpstreamRoute,
    Webhook,
    Workspace,
    model_key,
)
from extproc.governance.policy.watch import PolicyWatcher

__all__ = [
    "ALERT_EVENTS",
    "CONSOLE_ROLES",
    "CONTEXT_ACTIONS",
    "DEFAULT_MODEL",
    "EFFORTS",
    "ENDPOINT_NAMES",
    "NAME_PATTERN",
    "PERIODS",
    "Approvers",
    "ConsoleAccess",
    "Overdraft",
    "PersonalKeyGrant",
    "Policy",
    "PolicyError",
    "PolicyWatcher",
    "RateLimits",
    "Routing",
    "RoutingSettings",
    "Rule",
    "RuleChanges",
    "RuleMatch",
    "Service",
    "Team",
    "Upstream",
    "UpstreamRoute",
    "Webhook",
    "Workspace",
    "load_policy",
    "model_key",
    "parse_policy",
    "parse_policy_text",
]
