"""Prefect flows: audit (one teacher), watch (scheduled audits of an incoming location)."""
