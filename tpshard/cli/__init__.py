"""The command-line face of tpshard: parse, call the core, render. main.py is the entry point; app.py
holds what every command shares; one module per command group."""
