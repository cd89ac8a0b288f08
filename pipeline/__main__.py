"""`python -m pipeline COMMAND`: the data commands (pipeline/commands.py)."""
import sys

from pipeline.commands import main

sys.exit(main())
