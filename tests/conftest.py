"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.peers import NodeProcess, StoreSCP, node_starter
from tests.peers import dciodvfy as run_dciodvfy

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start ``dicom-node serve`` subprocesses; every one still running is killed at the end."""
    yield from node_starter(lambda name: tmp_path / name)


@pytest.fixture
def write_study(tmp_path: Path) -> Callable[..., list[Path]]:
    """Write a small synthetic CT series (the project's own writer) and return its files."""
    from dicom_node.training.ctseries import SeriesSpec, StudyIdentity, write_ct_series

    counter = iter(range(1, 1000))

    def make(
        *,
        study: Any = None,
        slices: int = 8,
        size: int = 32,
        series_number: int = 1,
        seed: int = 0,
        out: Path | None = None,
    ) -> list[Path]:
        n = next(counter)
        study = study or StudyIdentity.random(seed)
        rng = np.random.default_rng(seed + n)
        volume = rng.integers(-1000, 400, size=(slices, size, size), dtype=np.int16)
        series = SeriesSpec(series_number=series_number)
        return write_ct_series(
            volume,
            out or tmp_path / f"study-{n}",
            spacing_mm=(2.0, 1.0, 1.0),
            study=study,
            series=series,
        )

    return make


@dataclass
class InProcessReceiver:
    """The node's receiver in this process, on its own job store and spool."""

    receiver: Any
    store: Any
    spool: Any
    completion: Any

    @property
    def port(self) -> int:
        return int(self.receiver.port)


@pytest.fixture
def receiver_in_process(tmp_path: Path) -> Iterator[Callable[..., InProcessReceiver]]:
    """Start the real C-STORE receiver (real sockets, job store and spool) inside the test
    process, where a test can reach its parts to time a fault exactly; stopped at the end.
    ``make(**settings)`` takes overrides of the configuration's sections."""
    from dicom_node.config import load_config
    from dicom_node.receive.scp import Receiver
    from dicom_node.store.jobs import JobStore
    from dicom_node.store.spool import Spool
    from dicom_node.study.completion import Completion
    from dicom_node.testing.orthanc import free_port

    started: list[Any] = []

    def make(**settings: Any) -> InProcessReceiver:
        overrides = {
            **settings,
            "node": {"port": free_port(), "host": "127.0.0.1", **settings.get("node", {})},
            "storage": {
                "data_dir": str(tmp_path / "var"),
                "min_free_disk_mb": 0,
                **settings.get("storage", {}),
            },
        }
        config = load_config(None, overrides=overrides)
        store = JobStore(tmp_path / "var" / "jobs.sqlite")
        spool = Spool(tmp_path / "var" / "spool", min_free_bytes=0)
        completion = Completion(store, config.study)
        receiver = Receiver(config, spool=spool, store=store, completion=completion)
        receiver.start()
        started.append(receiver)
        return InProcessReceiver(receiver, store, spool, completion)

    yield make
    for receiver in started:
        receiver.stop(drain_seconds=1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder of the tiny randomly initialised network (tests/analysis/lungct_tiny.py).

    A test double for trained weights: the product's ResNet50 at 512² costs ~0.6 s a slice on
    these CPUs, so whole-node tests run the same code path on a ResNet18 at 64² with random
    weights. They check the machinery, never what a trained model finds.
    """
    import torch

    from dicom_node.analysis.weights import save_model
    from tests.analysis.lungct_tiny import make_card, make_network

    path = tmp_path_factory.mktemp("models") / "lung-ct-tiny"
    save_model(make_network(), make_card(), path, dtype=torch.float32)
    return path


@pytest.fixture
def phantom_series(tmp_path: Path) -> Callable[..., list[Path]]:
    """A small synthetic chest CT (the project's phantom generator) written as a DICOM series."""
    from dicom_node.training.phantom import generate_phantom, write_phantom_dicom

    def make(*, seed: int = 1, slices: int = 24, size: int = 96, tumour: bool = True) -> list[Path]:
        phantom = generate_phantom(
            seed=seed,
            shape_zyx=(slices, size, size),
            spacing_mm=(2.0, 3.5, 3.5),
            tumour_probability=1.0 if tumour else 0.0,
        )
        return write_phantom_dicom(phantom, tmp_path / f"phantom-{seed}-{slices}-{size}")

    return make


@pytest.fixture
def dciodvfy() -> Callable[[Path], tuple[list[str], list[str]]]:
    """Run dicom3tools' dciodvfy on a file; returns its (errors, warnings) lines."""
    return run_dciodvfy


@pytest.fixture
def scps(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Start dcmtk storescp peers (``scps("name", *options, port=...)``); all stop after."""
    started: list[StoreSCP] = []

    def make(name: str, *options: str, port: int | None = None) -> StoreSCP:
        scp = StoreSCP(tmp_path / name, options)
        if port is not None:
            scp.port = port
        started.append(scp)
        return scp.start()

    yield make
    for scp in started:
        scp.stop()
