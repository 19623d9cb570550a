"""What runs on a cluster: the driver of one attempt and its rank actors."""
