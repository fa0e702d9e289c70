"""medstream: xapisim, a XenAPI server that behaves like a real XenServer pool.

    from xapisim import SimServer, SimConfig
    with SimServer(SimConfig(hosts=3)) as sim:
        session = sim.session()          # a real XenAPI.Session, TLS verified against sim.ca_file
"""

from .errors import ConfigError, UnknownHost, XapisimError, XenAPIError
from .server import HostInfo, SimConfig, SimServer

__all__ = ["ConfigError", "HostInfo", "SimConfig", "SimServer", "UnknownHost", "XapisimError", "XenAPIError"]
