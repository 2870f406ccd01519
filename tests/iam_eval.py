"""A small evaluator of AWS IAM identity policies: what a role's policies decide for one request.

Used by tests/test_infra.py to show what infra/aws/iam/*.json refuse, not only what they allow. Written here
because no evaluator on PyPI runs offline on this project's Pythons: principalmapper (the one local simulator
with condition operators) fails to import on Python >= 3.10 (`from collections import Mapping`), and the rest
either lint or expand policies (parliament, policyuniverse, policy-sentry, cloudsplaining, iam-ape, policyglass)
or call AWS's own simulator API (aws-why, sibyl-aws). tests/test_iam_eval.py checks it against the examples of
AWS's IAM documentation.

What it implements, from the IAM User Guide ("Policy evaluation logic", "IAM JSON policy elements: Condition
operators", "Single-valued vs. multivalued context keys"), for identity policies of one account:

* an explicit Deny in any statement wins over every Allow; without an Allow the request is implicitly denied;
* Action / NotAction (case-insensitive, `*` and `?` wildcards), Resource / NotResource (ARNs compared segment by
  segment, case-sensitive, wildcards within a segment; the last segment, the resource, may hold `:` and `/`);
* Condition: every operator block and every key in it must match (AND), any of a key's policy values may match
  (OR); condition key names are case-insensitive;
* operators String(Not)Equals(IgnoreCase), String(Not)Like, Arn(Not)Equals, Arn(Not)Like, Bool, Null, each
  with `...IfExists`, and the set prefixes ForAllValues: / ForAnyValue:;
* a key absent from the request: a positive operator does not match, a negated one (`...Not...`) does, an
  `...IfExists` one does; ForAllValues matches, ForAnyValue does not; Null "true" matches.

Anything else (another operator, a policy variable `${...}`, Principal elements) raises, so a policy that
outgrows the evaluator fails its test instead of being judged wrongly.
"""

from __future__ import annotations

import re
from typing import Iterable

ALLOW, EXPLICIT_DENY, IMPLICIT_DENY = "Allow", "ExplicitDeny", "ImplicitDeny"
Context = dict[str, "str | list[str]"]

_OPERATORS = {
    "StringEquals", "StringNotEquals", "StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase", "StringLike",
    "StringNotLike", "ArnEquals", "ArnNotEquals", "ArnLike", "ArnNotLike", "Bool", "Null",
}


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _wildcard(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    """IAM's `*` (any run of characters) and `?` (one character); nothing else is special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.S | (re.I if ignore_case else 0)) is not None


def arn_matches(pattern: str, arn: str) -> bool:
    """ARN matching of Resource elements and the Arn* operators: the six colon-separated parts are compared one
    by one, each with wildcards; `*` alone matches every resource."""
    if pattern == "*":
        return True
    want, got = pattern.split(":", 5), arn.split(":", 5)
    if len(want) != 6 or len(got) != 6:
        return False
    return all(_wildcard(w, g) for w, g in zip(want, got))


def _value_matches(operator: str, policy_value: str, value: str) -> bool:
    """One policy value against one request value for the positive form of `operator`."""
    if operator == "StringEquals":
        return policy_value == value
    if operator == "StringEqualsIgnoreCase":
        return policy_value.lower() == value.lower()
    if operator == "StringLike":
        return _wildcard(policy_value, value)
    if operator in ("ArnEquals", "ArnLike"):  # identical in IAM: both take wildcards
        return arn_matches(policy_value, value)
    if operator == "Bool":
        return policy_value.lower() == value.lower()
    raise AssertionError(operator)


def _positive(operator: str) -> tuple[str, bool]:
    """(the positive operator, whether `operator` is its negation): StringNotLike -> (StringLike, True)."""
    if "Not" in operator:
        return operator.replace("Not", "", 1), True
    return operator, False


def condition_matches(block: str, key: str, policy_values, context: Context) -> bool:
    """Whether one `"Operator": {"key": values}` entry holds for the request context."""
    set_operator, _, operator = block.rpartition(":")
    if_exists = operator.endswith("IfExists")
    operator = operator.removesuffix("IfExists")
    if operator not in _OPERATORS or set_operator not in ("", "ForAllValues", "ForAnyValue"):
        raise ValueError(f"condition operator {block!r} is not implemented")
    policy_values = [str(v).lower() if isinstance(v, bool) else str(v) for v in _as_list(policy_values)]
    found = {k.lower(): v for k, v in context.items()}.get(key.lower())
    values = [] if found is None else _as_list(found)
    if operator == "Null" or set_operator:
        values = [v for v in values if v != ""]  # an empty value is a null data set for these (and "absent")

    if operator == "Null":
        return (not values) == (policy_values[0].lower() == "true")
    if not values:
        if set_operator:
            return set_operator == "ForAllValues"
        return if_exists or "Not" in operator
    positive, negated = _positive(operator)

    def holds(value: str) -> bool:
        hit = any(_value_matches(positive, p, value) for p in policy_values)
        return hit != negated

    if set_operator == "ForAllValues":
        return all(holds(v) for v in values)
    if set_operator == "ForAnyValue":
        return any(holds(v) for v in values)
    # A single-valued key: IAM documents no set operator; several values are read as "any of them".
    if negated:
        return all(holds(v) for v in values)
    return any(holds(v) for v in values)


def _statement_applies(st: dict, action: str, resource: str, context: Context) -> bool:
    unknown = set(st) - {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource", "Condition"}
    if unknown:
        raise ValueError(f"statement {st.get('Sid')}: {sorted(unknown)} not implemented")
    if ("Action" in st) == ("NotAction" in st) or ("Resource" in st) == ("NotResource" in st):
        raise ValueError(f"statement {st.get('Sid')}: needs exactly one of Action/NotAction and Resource/NotResource")
    for element in ("Resource", "NotResource"):
        if any("${" in r for r in _as_list(st.get(element, []))):
            raise ValueError(f"statement {st.get('Sid')}: policy variables are not implemented")
    if "Action" in st:
        if not any(_wildcard(a, action, ignore_case=True) for a in _as_list(st["Action"])):
            return False
    elif any(_wildcard(a, action, ignore_case=True) for a in _as_list(st["NotAction"])):
        return False
    if "Resource" in st:
        if not any(arn_matches(r, resource) for r in _as_list(st["Resource"])):
            return False
    elif any(arn_matches(r, resource) for r in _as_list(st["NotResource"])):
        return False
    return all(condition_matches(block, key, values, context)
               for block, entries in st.get("Condition", {}).items() for key, values in entries.items())


def statements_of(policies: Iterable[dict]) -> list[dict]:
    """The statements of policy documents (a document's Statement may be one object or a list)."""
    return [st for doc in policies for st in _as_list(doc["Statement"])]


def decide(policies: Iterable[dict], action: str, resource: str, context: Context | None = None) -> str:
    """ALLOW, EXPLICIT_DENY or IMPLICIT_DENY for one request (action, resource ARN, request context) under these
    identity policy documents, all attached to the same principal."""
    applying = [st for st in statements_of(policies) if _statement_applies(st, action, resource, context or {})]
    if any(st["Effect"] == "Deny" for st in applying):
        return EXPLICIT_DENY
    if any(st["Effect"] == "Allow" for st in applying):
        return ALLOW
    return IMPLICIT_DENY
