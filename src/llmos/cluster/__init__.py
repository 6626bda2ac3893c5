"""Ray cluster mode (docs/scaling.md, ADR 0029): engine replicas as Ray actors across a cluster's nodes.

``engine.RayEngine`` is the ``EngineClient`` the API talks to in this mode; ``pool`` places,
routes to and replaces the replicas (``replica.EngineReplica``); ``routing`` holds the pure
placement and routing rules; ``connect`` joins or starts the cluster with token authentication;
``wire`` is what crosses to a replica; ``view`` is what ``/v1/admin/cluster`` shows and
``machine`` that view of this one machine when Ray is off. Only
``engine``, ``pool`` and ``connect`` import Ray (the ``ray`` extra).
"""
