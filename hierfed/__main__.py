import sys

from hierfed.cli import main

sys.exit(main())
