"""Offline datasets and how they are partitioned across clients."""
