"""k8s/examples/grafana: the dashboard's queries name only metrics a real app exposes (with
the labels they group by), its panels do not overlap, and the kustomization renders it
unchanged into a ConfigMap that Grafana's sidecar loads."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.settings import DEMO_BUNDLES_DIR
from tests.helpers.deploy_checks import K8S_DIR, one
from tests.helpers.images import upload
from tests.helpers.serving import serving

DASHBOARD = K8S_DIR / "examples" / "grafana" / "hornet-serve-dashboard.json"
METRIC = re.compile(r"\bhornet_[a-z_]+\b")
GROUPED = re.compile(r"by \(([a-z_, ]+)\)")
# Labels Prometheus adds when it scrapes a pod, and histograms' bucket bound.
SCRAPE_LABELS = {"namespace", "pod", "le"}


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_every_query_names_metrics_and_labels_the_server_exposes() -> None:
    import numpy as np

    from tests.helpers.images import encode

    image = encode(np.full((120, 160, 3), 90, dtype=np.uint8), "JPEG")
    async with serving([DEMO_BUNDLES_DIR / "shapes_classify"]) as client:
        assert (await client.post("/classify", files=upload(image))).status_code == 200
        exposed = (await client.get("/metrics")).text
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposed):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    queries = expressions()
    assert len(queries) >= 10
    for query in queries:
        names = METRIC.findall(query)
        assert names, query
        for name in names:
            assert name in labels, f"{name} is not exposed: {query}"
        for grouped in GROUPED.findall(query):
            wanted = {label.strip() for label in grouped.split(",")} - SCRAPE_LABELS
            have = set().union(*(labels[name] for name in names))
            assert wanted <= have, f"grouped by {wanted - have}, which {names} lack: {query}"


def test_the_panels_do_not_overlap_and_every_query_filters_the_namespace() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert grid["x"] + grid["w"] <= 24 and not covered & cells, panel["title"]
        cells |= covered
    assert len({p["id"] for p in panels}) == len(panels)
    for query in expressions():
        for selector in re.findall(r"hornet_[a-z_]+(\{[^}]*\})?", query):
            assert selector == '{namespace="$namespace"}', query


def test_the_kustomization_renders_the_dashboard_for_grafanas_sidecar(rendered) -> None:
    config_map = one(rendered("examples/grafana"), "ConfigMap")
    assert config_map["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert config_map["metadata"]["name"] == "hornet-serve-dashboard"  # no hash suffix
    data = config_map["data"]["hornet-serve-dashboard.json"]
    assert json.loads(data) == json.loads(DASHBOARD.read_text())
