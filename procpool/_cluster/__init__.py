"""Cluster mode: the queue, leases, attempts and results in PostgreSQL (see ``store``)."""
