"""tests/iam_eval.py against the examples of AWS's documentation: each policy below is one of the IAM User Guide's
or the EC2 User Guide's examples (names and values as there, shortened where marked), each expected decision the
one the documentation states for that request."""

from __future__ import annotations

import pytest

from tests.iam_eval import ALLOW, EXPLICIT_DENY, IMPLICIT_DENY, arn_matches, decide


def policy(*statements: dict) -> list[dict]:
    return [{"Version": "2012-10-17", "Statement": list(statements)}]


ALLOW_ALL = {"Effect": "Allow", "Action": "*", "Resource": "*"}


# IAM User Guide, "Multivalued context key examples": deny IAM tagging unless every tag key starts with key1.
@pytest.mark.parametrize("tag_keys, expected", [
    (["key1:legal"], ALLOW),                      # every key starts with key1: the Deny does not apply
    (["key1:legal", "key1:hr"], ALLOW),
    (["key1:legal", "key2:audit"], ALLOW),       # not every key is unlike key1*: ForAllValues:StringNotLike is false
    (["key2:audit", "key3:it"], EXPLICIT_DENY),
    (None, EXPLICIT_DENY),                        # no aws:TagKeys: ForAllValues is true for an absent key
])
def test_for_all_values_string_not_like(tag_keys, expected):
    deny = {"Sid": "DenyRestrictedTags", "Effect": "Deny", "Action": ["iam:Tag*", "iam:UnTag*"], "Resource": ["*"],
            "Condition": {"ForAllValues:StringNotLike": {"aws:TagKeys": "key1*"}}}
    context = {} if tag_keys is None else {"aws:TagKeys": tag_keys}
    assert decide(policy(deny, ALLOW_ALL), "iam:TagUser", "arn:aws:iam::123456789012:user/alice", context) == expected


# The same page: ForAllValues:StringLike with a Null guard, so an absent key does not trigger the Deny.
@pytest.mark.parametrize("tag_keys, expected", [
    (["key1:legal"], EXPLICIT_DENY),
    (["key2:audit", "key3:it"], EXPLICIT_DENY),
    (["key1:legal", "key4:other"], ALLOW),  # key4 matches no pattern: not all values match
    (None, ALLOW),                          # the Null "false" guard: the key must be present
])
def test_for_all_values_string_like_with_null_guard(tag_keys, expected):
    deny = {"Sid": "DenyRestrictedTags", "Effect": "Deny", "Action": ["iam:Tag*", "iam:UnTag*"], "Resource": ["*"],
            "Condition": {"Null": {"aws:TagKeys": "false"},
                          "ForAllValues:StringLike": {"aws:TagKeys": ["key1*", "key2*", "key3*"]}}}
    context = {} if tag_keys is None else {"aws:TagKeys": tag_keys}
    assert decide(policy(deny, ALLOW_ALL), "iam:UntagRole", "arn:aws:iam::123456789012:role/r", context) == expected


# The same page: deny snapshots tagged with any of environment or webserver (ForAnyValue).
@pytest.mark.parametrize("tag_keys, expected", [
    (["environment"], EXPLICIT_DENY),
    (["webserver", "owner"], EXPLICIT_DENY),
    (["owner"], ALLOW),
    (None, ALLOW),  # ForAnyValue is false for an absent key
])
def test_for_any_value_string_equals(tag_keys, expected):
    deny = {"Effect": "Deny", "Action": "ec2:CreateSnapshot", "Resource": "arn:aws:ec2:*:*:snapshot/*",
            "Condition": {"ForAnyValue:StringEquals": {"aws:TagKeys": ["environment", "webserver"]}}}
    context = {} if tag_keys is None else {"aws:TagKeys": tag_keys}
    assert decide(policy(deny, ALLOW_ALL), "ec2:CreateSnapshot", "arn:aws:ec2:us-east-1:123456789012:snapshot/*",
                  context) == expected


# IAM User Guide, "Condition operators", ...IfExists: instance types t1.*, t2.*, m3.*, or no type in the request.
@pytest.mark.parametrize("context, expected", [
    ({"ec2:InstanceType": "t2.micro"}, ALLOW),
    ({"ec2:InstanceType": "m3.large"}, ALLOW),
    ({"ec2:InstanceType": "m5.large"}, IMPLICIT_DENY),
    ({}, ALLOW),
])
def test_string_like_if_exists(context, expected):
    allow = {"Effect": "Allow", "Action": "ec2:*", "Resource": "*",
             "Condition": {"StringLikeIfExists": {"ec2:InstanceType": ["t1.*", "t2.*", "m3.*"]}}}
    assert decide(policy(allow), "ec2:RunInstances", "arn:aws:ec2:us-east-1:1:instance/*", context) == expected


def test_bool_secure_transport_and_absent_keys_of_positive_and_negated_operators():
    """"Condition operators": Bool on aws:SecureTransport; a key absent from the request matches no positive
    operator, and every negated one ("...the condition is true" for StringNotLike, ArnNotLike)."""
    deny_http = {"Effect": "Deny", "Action": "s3:*", "Resource": "*", "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
    s3 = ("s3:GetObject", "arn:aws:s3:::amzn-s3-demo-bucket/key")
    assert decide(policy(deny_http, ALLOW_ALL), *s3, {"aws:SecureTransport": "false"}) == EXPLICIT_DENY
    assert decide(policy(deny_http, ALLOW_ALL), *s3, {"aws:SecureTransport": "true"}) == ALLOW
    assert decide(policy(deny_http, ALLOW_ALL), *s3, {}) == ALLOW
    # A JSON boolean in the policy reads as its string.
    deny_http["Condition"] = {"Bool": {"aws:SecureTransport": False}}
    assert decide(policy(deny_http, ALLOW_ALL), *s3, {"aws:SecureTransport": "false"}) == EXPLICIT_DENY

    for operator, value, negated in [("StringEquals", "x", False), ("StringLike", "x*", False),
                                     ("ArnLike", "arn:aws:sns:*:*:t", False), ("StringNotEquals", "x", True),
                                     ("StringNotLike", "x*", True), ("ArnNotLike", "arn:aws:sns:*:*:t", True)]:
        allow = {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*", "Condition": {operator: {"aws:SourceArn": value}}}
        assert (decide(policy(allow), *s3, {}) == ALLOW) is negated, operator
        assert decide(policy({**allow, "Condition": {operator + "IfExists": {"aws:SourceArn": value}}}), *s3, {}) == ALLOW


def test_null_condition_key_present_or_absent():
    """"Condition operators", Null: {"aws:TokenIssueTime": "true"} holds for long-term credentials (no key)."""
    allow = {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "*", "Condition": {"Null": {"aws:TokenIssueTime": "true"}}}
    request = ("s3:ListBucket", "arn:aws:s3:::amzn-s3-demo-bucket")
    assert decide(policy(allow), *request, {}) == ALLOW
    assert decide(policy(allow), *request, {"aws:TokenIssueTime": "2026-12-06T07:00:00Z"}) == IMPLICIT_DENY


def test_string_equals_is_case_sensitive_and_the_key_name_is_not():
    allow = {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*",
             "Condition": {"StringEquals": {"aws:RequestTag/Team": "Blue"}}}
    request = ("ec2:RunInstances", "arn:aws:ec2:us-east-1:1:instance/*")
    assert decide(policy(allow), *request, {"AWS:requesttag/Team": "Blue"}) == ALLOW
    assert decide(policy(allow), *request, {"aws:RequestTag/Team": "blue"}) == IMPLICIT_DENY
    ignore_case = {**allow, "Condition": {"StringEqualsIgnoreCase": {"aws:RequestTag/Team": "Blue"}}}
    assert decide(policy(ignore_case), *request, {"aws:RequestTag/Team": "blue"}) == ALLOW


def test_not_action_and_not_resource():
    """"IAM JSON policy elements: NotAction" (allow everything but IAM) and "NotResource" (deny all S3 but the
    HRBucket's Payroll folder)."""
    allow_but_iam = {"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"}
    assert decide(policy(allow_but_iam), "s3:ListAllMyBuckets", "*") == ALLOW
    assert decide(policy(allow_but_iam), "IAM:CreateUser", "arn:aws:iam::1:user/x") == IMPLICIT_DENY  # actions ignore case

    deny_but_payroll = {"Effect": "Deny", "Action": "s3:*",
                        "NotResource": ["arn:aws:s3:::HRBucket/Payroll", "arn:aws:s3:::HRBucket/Payroll/*"]}
    both = policy(deny_but_payroll, ALLOW_ALL)
    assert decide(both, "s3:GetObject", "arn:aws:s3:::HRBucket/Payroll/2026.csv") == ALLOW
    assert decide(both, "s3:GetObject", "arn:aws:s3:::HRBucket/Other/2026.csv") == EXPLICIT_DENY
    assert decide(both, "s3:GetObject", "arn:aws:s3:::hrbucket/Payroll/2026.csv") == EXPLICIT_DENY  # ARNs keep case


def test_explicit_deny_wins_and_nothing_is_allowed_by_default():
    """"Policy evaluation logic": an explicit Deny overrides any Allow; no Allow is an implicit deny."""
    allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::amzn-s3-demo-bucket/*"}
    deny = {"Effect": "Deny", "Action": "s3:DeleteObject", "Resource": "*"}
    obj = "arn:aws:s3:::amzn-s3-demo-bucket/a"
    assert decide(policy(allow, deny), "s3:PutObject", obj) == ALLOW
    assert decide(policy(allow, deny), "s3:DeleteObject", obj) == EXPLICIT_DENY
    assert decide(policy(allow, deny), "s3:PutObject", "arn:aws:s3:::other-bucket/a") == IMPLICIT_DENY
    assert decide([], "s3:PutObject", obj) == IMPLICIT_DENY


# EC2 User Guide, "Example policies to control access to the Amazon EC2 API": launch only m1.small (shortened to
# a list here), only from AMIs owned by Amazon, only into subnet-1a2b3c4d, only with IMDSv2 ("Require the use of
# IMDSv2", a Deny on ec2:MetadataHttpTokens).
EC2_EXAMPLE = policy(
    {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "arn:aws:ec2:sa-east-1:111122223333:instance/*",
     "Condition": {"StringEquals": {"ec2:InstanceType": ["m1.small"]}}},
    {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "arn:aws:ec2:sa-east-1::image/ami-*",
     "Condition": {"StringEquals": {"ec2:Owner": "amazon"}}},
    {"Effect": "Allow", "Action": "ec2:RunInstances",
     "Resource": ["arn:aws:ec2:sa-east-1:111122223333:subnet/subnet-1a2b3c4d",
                  "arn:aws:ec2:sa-east-1:111122223333:network-interface/*"]},
    {"Sid": "RequireImdsV2", "Effect": "Deny", "Action": "ec2:RunInstances", "Resource": "arn:aws:ec2:*:*:instance/*",
     "Condition": {"StringNotEquals": {"ec2:MetadataHttpTokens": "required"}}},
)


@pytest.mark.parametrize("resource, context, expected", [
    ("arn:aws:ec2:sa-east-1:111122223333:instance/*", {"ec2:InstanceType": "m1.small", "ec2:MetadataHttpTokens": "required"}, ALLOW),
    ("arn:aws:ec2:sa-east-1:111122223333:instance/*", {"ec2:InstanceType": "m1.large", "ec2:MetadataHttpTokens": "required"}, IMPLICIT_DENY),
    ("arn:aws:ec2:sa-east-1:111122223333:instance/*", {"ec2:InstanceType": "m1.small", "ec2:MetadataHttpTokens": "optional"}, EXPLICIT_DENY),
    ("arn:aws:ec2:sa-east-1:111122223333:instance/*", {"ec2:InstanceType": "m1.small"}, EXPLICIT_DENY),  # negated, key absent
    ("arn:aws:ec2:sa-east-1::image/ami-0abcdef1234567890", {"ec2:Owner": "amazon"}, ALLOW),
    ("arn:aws:ec2:sa-east-1::image/ami-0abcdef1234567890", {"ec2:Owner": "444455556666"}, IMPLICIT_DENY),
    ("arn:aws:ec2:us-east-1::image/ami-0abcdef1234567890", {"ec2:Owner": "amazon"}, IMPLICIT_DENY),  # another region
    ("arn:aws:ec2:sa-east-1:111122223333:subnet/subnet-1a2b3c4d", {}, ALLOW),
    ("arn:aws:ec2:sa-east-1:111122223333:subnet/subnet-9f9f9f9f", {}, IMPLICIT_DENY),
])
def test_ec2_launch_example(resource, context, expected):
    assert decide(EC2_EXAMPLE, "ec2:RunInstances", resource, context) == expected


def test_arn_wildcards_stay_inside_their_segment_except_the_resource():
    assert arn_matches("arn:aws:ec2:*:*:instance/*", "arn:aws:ec2:us-east-1:123456789012:instance/i-1")
    assert arn_matches("arn:aws:ssm:*::parameter/aws/service/*", "arn:aws:ssm:eu-west-1::parameter/aws/service/a/b:c")
    assert not arn_matches("arn:aws:ec2:*:*:instance/*", "arn:aws:ec2:us-east-1:1:volume/vol-1")
    assert not arn_matches("arn:aws:s3:::bucket*", "arn:aws:s3:us-east-1::bucket")  # the region segment is empty
    assert not arn_matches("arn:aws:iam::*:role/ldm-ray-worker", "arn:aws:iam::1:role/ldm-ray-worker-admin")


def test_what_it_does_not_implement_is_refused_loudly():
    request = ("s3:GetObject", "arn:aws:s3:::b/k")
    for statement in (
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*", "Condition": {"NumericLessThan": {"s3:max-keys": "10"}}},
        {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::b/${aws:username}/*"},
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*", "Principal": "*"},
    ):
        with pytest.raises(ValueError, match="not implemented"):
            decide(policy(statement), *request, {"s3:max-keys": "5"})
