"""The controller: durable job state and the loop that places, watches and recovers jobs."""
