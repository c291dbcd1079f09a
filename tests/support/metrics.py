"""Reading Prometheus metrics in tests: one sample of a text exposition, or of a bridge's
``GET /metrics``."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scraped(text: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent) in a Prometheus text exposition."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def bridge_metric(http: httpx.AsyncClient, name: str, **labels: str) -> float:
    """One sample of the bridge's own metrics (scraping is never refused, even overloaded)."""
    response = await http.get("/metrics")
    assert response.status_code == 200
    return scraped(response.text, name, **labels)
