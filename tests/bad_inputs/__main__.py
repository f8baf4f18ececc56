"""Write the bad-input table into README.md: ``python -m tests.bad_inputs``."""

from . import README, update_readme

print(f"{README}: {'updated' if update_readme() else 'already current'}")
