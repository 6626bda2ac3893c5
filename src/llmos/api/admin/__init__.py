"""Native administration endpoints under /v1/admin (admin scope)."""
