"""Command-line interface (installed as rwkvcpu.cli): thin click commands over the library."""
