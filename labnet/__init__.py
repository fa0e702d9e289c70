"""labnet: lab hosts (network namespaces with sshd and a private filesystem view) on a bridge,
with htb rate shaping. See labnet/README.md and docs/INTERFACES.md.

    from labnet import Lab
    with Lab.create() as lab:
        h = lab.add_host("node-01")
        h.run(["hostname"])
"""

from .cleanup import cleanup_dead, list_labs, teardown
from .errors import LabError
from .lab import OVERLAY_DIRS, Host, Lab
from .shaping import NETEM_MISSING, PROFILES, REGIMES, Shape

__all__ = ["NETEM_MISSING", "OVERLAY_DIRS", "PROFILES", "REGIMES", "Host", "Lab", "LabError",
           "Shape", "cleanup_dead", "list_labs", "teardown"]
