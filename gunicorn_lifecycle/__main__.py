"""``python -m gunicorn_lifecycle status``."""

import sys

from .cli import main

sys.exit(main())
