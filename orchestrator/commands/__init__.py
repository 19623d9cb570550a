"""One module per group of `spillway` commands; cli.py only parses."""
