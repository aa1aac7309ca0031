"""Who a device is: JWT verification, development tokens, the gateway's own OAuth2 token."""
