"""`python -m hal.cli`: the twincache command line."""
import sys

from hal.cli.main import main

sys.exit(main())
