"""`python -m pipelines.demo`: run the demo (see pipelines/demo/run.py)."""
import sys

from pipelines.demo.run import main

sys.exit(main())
