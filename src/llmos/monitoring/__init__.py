"""The platform's own metrics: Prometheus objects, what feeds them, and what reads them back.

``metrics.py`` defines every metric (names, labels, units, buckets) in one place, registered in
prometheus_client's default ``REGISTRY``; the engine, the API and the samplers only observe them.
"""
