"""egress-guard for people who already run mitmproxy:

    mitmdump -s addons/egress_guard_addon.py --set egress_policies=policies \
             --set egress_data_dir=/var/lib/egress-guard

Every ``egress_*`` option is listed by ``mitmdump -s addons/egress_guard_addon.py --options``.
"""

import sys
from pathlib import Path

try:
    import egress_guard  # noqa: F401  (installed with pip)
except ImportError:  # a plain checkout: the package sits next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from egress_guard.runtime.addon import make_addons

addons = make_addons()
