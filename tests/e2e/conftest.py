"""Fixtures for the end-to-end tests: Orthanc as the PACS, wired both ways to a node process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dicom_node.testing.orthanc import OrthancPacs
from tests.peers import NodeProcess

#: The autorouting script shipped for sites, tested as shipped.
AUTOROUTE_LUA = Path(__file__).resolve().parents[2] / "examples" / "orthanc" / "autoroute.lua"


@dataclass
class PacsAndNode:
    """An Orthanc that knows the node as modality ``node``, and a node whose one destination
    (``orthanc``) is that Orthanc."""

    pacs: OrthancPacs
    node: NodeProcess


@pytest.fixture
def pacs_and_node(tmp_path: Path) -> Iterator[Callable[..., PacsAndNode]]:
    """Make an Orthanc + node pair on free loopback ports; both are stopped at the end.

    ``make(start_node=True, lua=False, stable_age=60, **node_settings)``: ``lua`` loads
    ``examples/orthanc/autoroute.lua``; ``node_settings`` are config sections for the node (merged
    over the test defaults of :class:`tests.peers.NodeProcess`, e.g. ``study={...}``).
    """
    made: list[PacsAndNode] = []

    def make(
        *,
        start_node: bool = True,
        lua: bool = False,
        stable_age: int = 60,
        **node_settings: Any,
    ) -> PacsAndNode:
        n = len(made)
        node = NodeProcess(root=tmp_path / f"node-{n}", settings=dict(node_settings))
        pacs = OrthancPacs(
            root=tmp_path / f"orthanc-{n}",
            node_port=node.port,
            node_aet="DICOM_NODE",
            lua_scripts=[AUTOROUTE_LUA] if lua else [],
            stable_age=stable_age,
        )
        pair = PacsAndNode(pacs=pacs, node=node)
        made.append(pair)
        pacs.start()
        node.settings["destinations"] = [pacs.destination("orthanc")]
        if start_node:
            node.start()
        return pair

    yield make
    for pair in made:
        if pair.node.proc is not None:
            pair.node.kill()
        pair.pacs.kill()  # throw-away data; a graceful stop costs ~3.5 s a test
