"""Talking to one cluster: submit, poll, logs, stop."""
