"""What every recipe shares with whatever runs it."""
