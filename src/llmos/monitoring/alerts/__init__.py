"""Alerting on the platform's own metrics, without a Prometheus server: rules (``rules.py``, their
metrics checked by ``catalog.py``), a window of sampled metrics (``window.py``) and what a
condition computes from it (``functions.py``, ``drift.py``), alert states (``evaluator.py``), their
history and the API's rules in the database (``history.py``), notifications (``payload.py``,
``notify.py``), and the service that runs it all (``service.py``). See docs/alerts.md."""
