"""The reference core's request rules that need no storage: errors, roles, ids, paging.

What each call checks against the stored rooms is chatgateway.devcore.model's; these
are the pieces it shares between calls.
"""

import base64
import binascii
import json
import re

import grpc

OWNER, ADMIN, MEMBER = "owner", "admin", "member"
ROLES = (OWNER, ADMIN, MEMBER)
DEFAULT_PAGE = 50
MAX_PAGE = 500

# Client room ids name bus channels.
ROOM_ID = re.compile(r"[A-Za-z0-9._~@:+-]{1,128}")

_Code = grpc.StatusCode


class CoreError(Exception):
    """A refused call, with the gRPC status it is answered with."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def require_caller(caller):
    if not caller:
        raise CoreError(_Code.UNAUTHENTICATED, "no caller")


def normalize_roles(roles):
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise CoreError(_Code.INVALID_ARGUMENT, f"unknown roles {unknown}: use owner, admin, member")
    return [role for role in ROLES if role in roles]


def rank(roles):
    """3 owner, 2 admin, 1 member: what the roles allow."""
    if OWNER in roles:
        return 3
    if ADMIN in roles:
        return 2
    return 1


def page_limit(value, name):
    """A request's page size or limit: defaulted when 0, capped; INVALID_ARGUMENT when negative."""
    if value < 0:
        raise CoreError(_Code.INVALID_ARGUMENT, f"{name} must not be negative")
    return min(value or DEFAULT_PAGE, MAX_PAGE)


def encode_cursor(**fields):
    return base64.urlsafe_b64encode(json.dumps(fields, sort_keys=True).encode()).decode()


def decode_cursor(cursor, kind, scope, position_type):
    """The position a cursor of ``kind`` within ``scope`` names; INVALID_ARGUMENT otherwise."""
    try:
        fields = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
        valid = (
            isinstance(fields, dict)
            and fields.get("k") == kind
            and fields.get("s") == scope
            and type(fields.get("p")) is position_type
        )
    except (ValueError, UnicodeError, binascii.Error):
        valid = False
    if not valid:
        raise CoreError(_Code.INVALID_ARGUMENT, "bad cursor")
    return fields["p"]
