"""Who may read the operator's status: a verified token that carries the admin scope.

The scope is ``chatgateway:admin`` (docs/console.md#the-admin-claim), found either in the
OAuth2 ``scope`` claim (a space-separated string, RFC 8693 / RFC 9068) or in a ``roles``
claim (a list of strings, as several identity providers issue it). Nothing else grants it.
"""

ADMIN_SCOPE = "chatgateway:admin"


def is_admin(claims):
    """Whether the verified ``claims`` (a dict of the token's payload) carry ADMIN_SCOPE."""
    scope = claims.get("scope")
    if isinstance(scope, str) and ADMIN_SCOPE in scope.split():
        return True
    roles = claims.get("roles")
    return isinstance(roles, list) and ADMIN_SCOPE in (r for r in roles if isinstance(r, str))
