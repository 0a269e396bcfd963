"""Runnable examples of ttlstore in services."""
