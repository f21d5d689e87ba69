"""The ``fdcache`` command line (typer): parse, call one library function, print."""
