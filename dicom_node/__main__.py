"""``python -m dicom_node``: the ``dicom-node`` command."""

import sys

from dicom_node.cli import main

sys.exit(main())
