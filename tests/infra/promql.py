"""Which metrics a PromQL expression reads, and which of them a daemon does not export: the check
that keeps a dashboard (or an alert rule) from naming a metric that does not exist, which
Prometheus itself answers with an empty result, never an error."""

from __future__ import annotations

import re
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

# Series Prometheus writes itself for every target it scrapes.
PROMETHEUS_OWN = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)
# Words of PromQL that look like a metric name where they stand (operators, modifiers, values).
KEYWORDS = frozenset(
    {"and", "or", "unless", "atan2", "bool", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([^"\\]+)"')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[\w$]+")
# A name not glued to a number (1e3), a variable ($job) or a field (.5); a function if "(" follows.
_IDENT = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Every metric name ``expr`` selects, bare (``rate(x_total[5m])``) or as
    ``{__name__="x"}``; label names, functions, keywords and Grafana variables are not names."""
    names = set(_NAME_MATCHER.findall(expr))
    rest = _STRING.sub('""', expr)
    rest = _MATCHERS.sub(" ", rest)
    rest = _RANGE.sub(" ", rest)
    rest = _GROUPING.sub(" ", rest)
    rest = _OFFSET.sub(" ", rest)
    for m in _IDENT.finditer(rest):
        word = m.group()
        if word.lower() in KEYWORDS or rest[m.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


# Sample names a family of each type exposes, from the family's name (the text parser drops a
# counter's _total and an info metric's _info from the family name).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_names(exposition: str) -> set[str]:
    """Every series name a /metrics page (Prometheus text format) can carry: the samples it has,
    and those of each family it declares, even one without a sample yet."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(exposition):
        names.update(s.name for s in fam.samples)
        names.update(fam.name + suffix for suffix in _SUFFIXES.get(fam.type, ("",)))
    return names


def unknown_metrics(exprs: Iterable[str], exported: set[str]) -> dict[str, set[str]]:
    """For each expression naming a metric that is neither in ``exported`` nor one Prometheus
    writes itself, those names."""
    out: dict[str, set[str]] = {}
    for expr in exprs:
        unknown = metric_names(expr) - exported - PROMETHEUS_OWN
        if unknown:
            out[expr] = unknown
    return out
