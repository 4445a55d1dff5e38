"""``python -m dsnet_command``: the ``dsnet`` console script."""
import sys

from dsnet_command import main

sys.exit(main())
