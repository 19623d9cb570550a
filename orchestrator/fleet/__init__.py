"""The clusters a controller may use: their description, the local fleet, and their state."""
