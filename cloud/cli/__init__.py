"""The `fleet` command line (Typer): one module per noun."""
