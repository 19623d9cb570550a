"""A user's own config group file, for the tests of SPILLWAY_CONFIG_DIR and of a wheel install."""

# model=huge: not one of Spillway's models, small enough to compose and validate on a CPU.
HUGE_MODEL = """\
name: huge
dim: 128
n_layers: 2
n_heads: 4
n_kv_heads: 2
vocab_size: 256
ffn_hidden_dim: 352
max_seq_len: 256
"""
