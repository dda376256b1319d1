"""Topologies: which MPI rank is the cloud, an edge or a device, and how they are linked.

    topo = load_topology("topologies/default.yaml")   # schema.py: YAML -> validated Topology
    placement = topo.placement()                       # placement.py: rank -> Role, edges, clients

Pure: no MPI, no torch. Everything a run decides from the topology is decided here, once.
"""

from hierfed.topology.placement import (
    DEFAULT_LINKS,
    DEFAULT_MEMORY_GB,
    DEFAULT_SPEED,
    Behaviour,
    DeviceGroup,
    DeviceSpec,
    EdgeGroup,
    EdgeSpec,
    LinkModel,
    Placement,
    Role,
    Topology,
)
from hierfed.topology.schema import DEFAULT_DIR, EMBEDDED_DEFAULT, load_topology, parse_topology

__all__ = [
    "DEFAULT_DIR", "DEFAULT_LINKS", "DEFAULT_MEMORY_GB", "DEFAULT_SPEED", "EMBEDDED_DEFAULT",
    "Behaviour", "DeviceGroup", "DeviceSpec", "EdgeGroup", "EdgeSpec", "LinkModel", "Placement", "Role", "Topology",
    "load_topology", "parse_topology",
]
