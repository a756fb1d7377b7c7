"""Commands and their helpers, outside the library: bench, demo, the local process spawner, the CLI parser."""
