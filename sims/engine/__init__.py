"""Patches to Flower's simulation engine and Ray's local node, installed by ``sims.run``.

* :mod:`~sims.engine.vce_sweep`: Flower's message delivery in one pass over its
  store per sweep, woken when a message or reply is stored.
* :mod:`~sims.engine.vce_actors`: Flower's Ray actor pool with the next client
  queued at each actor while it trains one.
* :mod:`~sims.engine.ray_node`: the local Ray node without the daemons a
  simulation never uses.

Each changes this process's Flower or Ray and nothing else; what a client
computes is unchanged. Deployment (``flwr run`` on a SuperLink) uses none of them.
"""

from sims.engine import ray_node, vce_actors, vce_sweep

__all__ = ["ray_node", "vce_actors", "vce_sweep"]
