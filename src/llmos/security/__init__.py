"""Users and permissions: API keys (stored hashed), scopes, and safe handling of secrets."""

from llmos.security.keys import SCOPES, ApiKeyInfo, KeyStore

__all__ = ["SCOPES", "ApiKeyInfo", "KeyStore"]
