"""The controller's HTTP API: the server (on the home head, beside the reconcile loop) and the
client the CLI uses. Nothing here is imported by the other side: the client never loads the
controller, the server never loads the CLI."""
