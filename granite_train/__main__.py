import sys

from granite_train.cli import main

sys.exit(main())
