"""egress-guard for people who already run mitmproxy:

    mitmdump -s addons/egress_guard_addon.py --set egress_policies=policies \
             --set egress_data_dir=/var/lib/egress-guard

The ``egress_*`` options are those of ``egress-guard run`` (see ``egress-guard run --help``
and the README); mitmdump loads scripts after it lists its own options.
"""

import sys
from pathlib import Path

try:
    import egress_guard  # noqa: F401  (installed with pip)
except ImportError:  # a plain checkout: the package sits next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from egress_guard.runtime.addon import make_addons

addons = make_addons()
