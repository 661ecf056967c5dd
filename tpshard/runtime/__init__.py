"""Runtimes: the one GPT built for the ranks a process hosts (models.py), processes started and
joined into a group (launch.py), and what each rank runs for generate and verify (programs.py)."""
