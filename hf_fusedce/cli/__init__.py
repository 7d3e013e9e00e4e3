"""The `hf-fusedce` command line: thin subcommands over the library."""
