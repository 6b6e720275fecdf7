import sys

from granite_train.doctor.run import main

sys.exit(main())
