"""The ready children's own ``/metrics``, merged into swapper's: one Prometheus target for the fleet.

Why: a Prometheus job that scraped llama-server (``llamacpp:prompt_tokens_total``, ...) would lose
those series behind swapper, whose ``/metrics`` is its own. So ``GET /metrics`` also scrapes every
ready child (llama-server started with ``--metrics``), all at once with a short timeout each, and
adds their families with a ``model="<id>"`` label.

Owns: nothing mutable; ``scrape`` is one scrape's work, ``merge`` a pure function of the texts.

Rules:
* Only ready children are asked, straight at their address: a scrape is no request, so it never
  loads a model, holds one from eviction or counts as activity for its TTL.
* A child without a metrics endpoint (404, or llama-server's 501 without ``--metrics``) adds
  nothing. One that does not answer in time, answers another status, or answers text that is not
  Prometheus's is a *scrape error* (``swapper_child_scrape_errors_total{model}``); the scrape of
  swapper itself never fails for it.
* Families are parsed and written by ``prometheus_client`` (never by hand). Families of the same
  name from several children become one family (the format allows one ``TYPE`` per name); a
  child's ``model`` label is replaced by swapper's. A family in swapper's own namespaces
  (``swapper_*``, ``process_*``, ``python_*``) is dropped: two families of one name would make the
  page invalid.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["SCRAPE_TIMEOUT", "Scraped", "merge", "scrape"]

SCRAPE_TIMEOUT: Final = 2.0  # seconds per child; Prometheus's own default scrape timeout is 10 s
_NO_METRICS: Final = frozenset({404, 501})
_RESERVED: Final = ("swapper_", "process_", "python_")  # swapper's own families


@dataclass(slots=True)
class Scraped:
    """One scrape of the children: their merged families and the models that failed."""

    families: list[Metric] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


async def scrape(
    session: aiohttp.ClientSession,
    targets: Mapping[str, str],
    within: float = SCRAPE_TIMEOUT,
) -> Scraped:
    """Fetches ``targets`` (model id → its ``/metrics`` URL) concurrently and merges the answers."""
    if not targets:
        return Scraped()
    models = list(targets)
    texts = await asyncio.gather(*(_fetch(session, targets[m], within) for m in models))
    answered = {m: text for m, text in zip(models, texts, strict=True) if text}
    merged = merge(answered)
    merged.failed[:0] = [m for m, text in zip(models, texts, strict=True) if text is None]
    return merged


async def _fetch(session: aiohttp.ClientSession, url: str, within: float) -> str | None:
    """The child's exposition text; ``""`` when it has none to give; None when it failed."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=within)) as resp:
            if resp.status in _NO_METRICS:
                return ""
            if resp.status != 200:
                return None
            return await resp.text(errors="replace")
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


def merge(texts: Mapping[str, str]) -> Scraped:
    """The families of ``texts`` (model id → exposition text), each sample labelled ``model``."""
    out = Scraped()
    families: dict[str, Metric] = {}
    for model, text in sorted(texts.items()):
        try:
            parsed = list(text_string_to_metric_families(text))
        except (ValueError, IndexError, TypeError):  # what the parser raises for text it can't read
            out.failed.append(model)
            continue
        for fam in parsed:
            if fam.name.startswith(_RESERVED):
                continue
            into = families.get(fam.name)
            if into is None:
                into = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            elif into.type != fam.type:
                continue  # two children disagree on a family's type: keep the first's
            into.samples.extend(s._replace(labels={**s.labels, "model": model}) for s in fam.samples)
    out.families = list(families.values())
    return out
