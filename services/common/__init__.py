"""Shared server plumbing: settings, interceptors (errors, auth, metrics), health, reflection, shutdown."""
