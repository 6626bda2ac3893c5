"""Notifications leave on their own thread: the evaluator only queues a payload, and each receiver
(a webhook, or e-mail through SMTP) is tried with exponential backoff until it accepts or the
attempts run out. A receiver is logged by its scheme and host only: a webhook's path or query
often carries its token, and SMTP credentials are never written anywhere."""

from __future__ import annotations

import logging
import queue
import smtplib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)


class Receiver(ABC):
    @property
    @abstractmethod
    def name(self) -> str:
        """How the receiver appears in logs and answers: nothing secret."""

    @abstractmethod
    def send(self, payload: dict[str, Any]) -> None:
        """Deliver once; raise on any failure."""


class WebhookReceiver(Receiver):
    def __init__(self, url: str, timeout_s: float) -> None:
        self._url = url
        self._timeout_s = timeout_s

    @property
    def name(self) -> str:
        parts = urlsplit(self._url)
        return f"webhook {parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"

    def send(self, payload: dict[str, Any]) -> None:
        # A fresh client per delivery: no connection outlives a notification, no proxy from the
        # environment sees the alert, and redirects are not followed to another host.
        with httpx.Client(timeout=self._timeout_s, trust_env=False, follow_redirects=False) as client:
            response = client.post(self._url, json=payload)
        if not response.is_success:
            raise RuntimeError(f"answered HTTP {response.status_code}")


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    username: str | None = None
    password: str | None = None
    starttls: bool = True
    timeout_s: float = 10.0


class EmailReceiver(Receiver):
    def __init__(self, smtp: SmtpSettings) -> None:
        self._smtp = smtp

    @property
    def name(self) -> str:
        return f"smtp {self._smtp.host}:{self._smtp.port}"

    def send(self, payload: dict[str, Any]) -> None:
        message = EmailMessage()
        message["Subject"] = subject(payload)
        message["From"] = self._smtp.sender
        message["To"] = ", ".join(self._smtp.recipients)
        message.set_content(email_body(payload))
        with smtplib.SMTP(self._smtp.host, self._smtp.port, timeout=self._smtp.timeout_s) as server:
            if self._smtp.starttls:
                server.starttls()
            if self._smtp.username:
                server.login(self._smtp.username, self._smtp.password or "")
            server.send_message(message)


def subject(payload: dict[str, Any]) -> str:
    """Alertmanager's default subject: ``[FIRING:2] HighErrorRate``."""
    return f"[{payload['status'].upper()}:{len(payload['alerts'])}] {payload['groupLabels'].get('alertname', '')}"


def email_body(payload: dict[str, Any]) -> str:
    lines = []
    for alert in payload["alerts"]:
        lines.append(f"{alert['status'].upper()} since {alert['startsAt']}")
        lines += [f"  {k} = {v}" for k, v in sorted(alert["labels"].items())]
        lines += [f"  {k}: {v}" for k, v in sorted(alert["annotations"].items())]
        lines.append(f"  source: {alert['generatorURL']}")
    return "\n".join(lines) + "\n"


class Notifier:
    """A bounded queue of payloads and the one thread that delivers them to every receiver."""

    def __init__(self, receivers: list[Receiver], *, attempts: int, backoff_s: float, max_queued: int = 1000) -> None:
        self.receivers = receivers
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.delivered = 0
        self.failed = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(max_queued)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.receivers and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="alert-notifier", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the delivery in hand (queued notifications are dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)
            self._thread = None

    def submit(self, payload: dict[str, Any]) -> None:
        """Queue a notification; never blocks (a full queue drops it, with a warning)."""
        if not self.receivers:
            return
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            log.warning("alert notification dropped: %d are waiting already", self._queue.qsize())

    def wait_idle(self, timeout_s: float) -> bool:
        """True once every queued notification was delivered or given up (tests, shutdown)."""
        done = threading.Event()

        def join() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=join, daemon=True).start()
        return done.wait(timeout_s)

    def deliver_once(self, payload: dict[str, Any]) -> dict[str, str]:
        """Send to every receiver once, now, on the caller's thread: what each answered."""
        results = {}
        for receiver in self.receivers:
            try:
                receiver.send(payload)
                results[receiver.name] = "delivered"
            except Exception as exc:  # any failure of a receiver is reported, not raised
                results[receiver.name] = f"failed: {_reason(exc)}"
        return results

    def _run(self) -> None:
        while not self._stop.is_set():
            payload = self._queue.get()
            try:
                if payload is not None:
                    for receiver in self.receivers:
                        self._deliver(receiver, payload)
            finally:
                self._queue.task_done()

    def _deliver(self, receiver: Receiver, payload: dict[str, Any]) -> None:
        for attempt in range(self.attempts):
            try:
                receiver.send(payload)
                self.delivered += 1
                return
            except Exception as exc:  # retried whatever it was: a receiver's failure is not ours
                reason = _reason(exc)
            delay = self.backoff_s * 2**attempt
            last = attempt + 1 == self.attempts
            log.warning(
                "alert notification to %s failed (attempt %d of %d): %s%s",
                receiver.name, attempt + 1, self.attempts, reason, "" if last else f"; retrying in {delay:g}s",
            )  # fmt: skip
            if last or self._stop.wait(delay):
                break
        self.failed += 1


def _reason(exc: Exception) -> str:
    """A failure in words without the request's URL (httpx puts it in its messages)."""
    if isinstance(exc, httpx.HTTPError):
        return type(exc).__name__
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{type(exc).__name__} {exc.smtp_code}"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or ''}"
    return type(exc).__name__ if isinstance(exc, smtplib.SMTPException) else str(exc)[:200]
